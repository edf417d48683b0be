//! The load generators and the server they talk to, run by `lb-bench` inside the benchmark's namespaces. Every loop
//! is bounded in time and in count.
//!
//! Server protocol on one TCP port: a connection whose first byte is `B` is a bulk upload (read to EOF, answer the
//! byte count as 8 bytes, close); anything else is a TCP_CRR exchange (read 100 bytes, answer 100 bytes, close).
//! On one UDP port: `R` resets the datagram counter and is answered `ok`; `S` is answered with the count since the
//! reset; anything else is counted.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::stats::{Summary, summarize};

pub const REQUEST: usize = 100;

/// Serves TCP on `port` (0.0.0.0) and UDP on `port` of each of `udp_addrs` until killed.
///
/// UDP gets one socket per address: a socket bound to 0.0.0.0 answers from the interface's primary address, not
/// from the one the datagram was sent to, and a reply from another address matches neither the NAT's conntrack
/// entry nor the client's connected socket.
#[expect(
    clippy::infinite_loop,
    reason = "the bench's server: it serves until the bench kills its process"
)]
pub fn serve(port: u16, udp_addrs: &[std::net::Ipv4Addr]) -> Result<()> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding TCP {port}"))?;
    let count = Arc::new(AtomicU64::new(0));
    for &addr in udp_addrs {
        let udp =
            UdpSocket::bind((addr, port)).with_context(|| format!("binding UDP {addr}:{port}"))?;
        let count = Arc::clone(&count);
        std::thread::spawn(move || udp_counter(&udp, &count));
    }
    let listener = Arc::new(listener);
    // Two acceptors: the machine has two cores and the client one busy thread.
    for _ in 0..2 {
        let l = Arc::clone(&listener);
        std::thread::spawn(move || {
            loop {
                if let Ok((s, _)) = l.accept() {
                    let _ = answer(s);
                }
            }
        });
    }
    println!("{{\"event\":\"ready\"}}");
    loop {
        std::thread::park();
    }
}

#[expect(
    clippy::infinite_loop,
    reason = "a server thread: it counts until the bench kills its process"
)]
fn udp_counter(udp: &UdpSocket, count: &AtomicU64) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        match buf.first() {
            Some(b'R') if n == 1 => {
                count.store(0, Ordering::Relaxed);
                let _ = udp.send_to(b"ok", from);
            }
            Some(b'S') if n == 1 => {
                let _ = udp.send_to(count.load(Ordering::Relaxed).to_string().as_bytes(), from);
            }
            _ => {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    if first[0] == b'B' {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 1u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_all(&total.to_be_bytes())?;
        return Ok(());
    }
    let mut rest = [0u8; REQUEST - 1];
    s.read_exact(&mut rest)?;
    s.write_all(&[b'a'; REQUEST])?;
    // The client closes first, so TIME_WAIT stays on its side. Were it the server's, a NAT on the path (kube-proxy's
    // masquerade picks random ports) would reuse a server-side TIME_WAIT tuple with an unrelated sequence number,
    // the SYN would be answered with a stale ACK, and the client would wait a second to retry: a benchmark
    // artefact, seen in the first runs.
    let mut end = [0u8; 1];
    let _ = s.read(&mut end)?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrrResult {
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub conns_per_sec: f64,
    /// Per connection: connect, 100-byte request, 100-byte reply, close (microseconds).
    pub latency_us: Summary,
}

/// TCP_CRR against `targets` (round robin) for `duration` or `max` connections, whichever comes first.
pub fn crr(targets: &[SocketAddr], duration: Duration, max: u64) -> Result<CrrResult> {
    if targets.is_empty() {
        bail!("no target");
    }
    let mut lat = Vec::with_capacity(100_000);
    let (mut errors, mut first_error) = (0u64, None);
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < duration && (lat.len() as u64 + errors) < max {
        let to = targets[i % targets.len()];
        i += 1;
        let t = Instant::now();
        match crr_once(to) {
            Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{to}: {e}"));
                // A refused or timed-out connection must not turn the loop into a busy spin.
                if errors > 100 {
                    break;
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(CrrResult {
        connections: lat.len() as u64,
        errors,
        first_error,
        seconds,
        conns_per_sec: lat.len() as f64 / seconds,
        latency_us: summarize(&mut lat),
    })
}

fn crr_once(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    s.write_all(&[b'q'; REQUEST])?;
    let mut reply = [0u8; REQUEST];
    s.read_exact(&mut reply)?;
    // Dropping the stream closes it (FIN); the server then closes its side.
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpResult {
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
    /// Datagrams the server received per second.
    pub received_per_sec: f64,
    pub payload_bytes: usize,
}

/// Sends `payload`-byte datagrams on one connected socket for `duration` (at most `max`), then asks the server
/// how many arrived.
pub fn udp_flood(
    to: SocketAddr,
    payload: usize,
    duration: Duration,
    max: u64,
) -> Result<UdpResult> {
    let s = UdpSocket::bind("0.0.0.0:0").context("binding")?;
    s.connect(to).context("connecting")?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    control(&s, b"R")?;
    let data = vec![b'd'; payload.max(2)];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < max {
        // Check the clock every 64 datagrams: a syscall per datagram is what is measured, not the clock.
        if sent.is_multiple_of(64) && started.elapsed() >= duration {
            break;
        }
        if s.send(&data).is_ok() {
            sent += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Let queued datagrams drain before asking.
    std::thread::sleep(Duration::from_millis(200));
    let reply = control(&s, b"S")?;
    let received: u64 = reply
        .trim()
        .parse()
        .with_context(|| format!("bad count {reply:?}"))?;
    Ok(UdpResult {
        sent,
        received,
        seconds,
        received_per_sec: received as f64 / seconds,
        payload_bytes: data.len(),
    })
}

/// Sends a one-byte control datagram until it is answered (datagrams may be lost under load); at most 50 tries.
fn control(s: &UdpSocket, msg: &[u8]) -> Result<String> {
    let mut buf = [0u8; 64];
    for _ in 0..50 {
        s.send(msg)?;
        if let Ok(n) = s.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            // A late answer to an earlier try of the same request reads the same; a stale "ok" is skipped.
            if msg == b"S" && text == "ok" {
                continue;
            }
            return Ok(text);
        }
    }
    bail!("no answer to a control datagram")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkResult {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_sec: f64,
}

/// One TCP connection writing 64 KiB chunks for `duration`; the rate is what the server says it received.
pub fn tcp_bulk(to: SocketAddr, duration: Duration) -> Result<BulkResult> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).context("connecting")?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"B")?;
    let chunk = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    while started.elapsed() < duration {
        s.write_all(&chunk).context("writing")?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .context("reading the server's count")?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(count);
    Ok(BulkResult {
        bytes,
        seconds,
        gbit_per_sec: bytes as f64 * 8.0 / seconds / 1e9,
    })
}
