//! lb-probe: the traffic tool of lb's integration tests. Servers that answer with their identity, and clients that
//! report, one JSON line per exchange, which backend answered and what the socket API showed the client.
//!
//! ```text
//! lb-probe serve --id <ID> [--tcp-port P]... [--udp-port P]... [--addr ::]
//!   {"event":"listening","proto":"tcp","port":P}        one per port, then
//!   {"event":"ready","id":"<ID>"}                        once every port is bound
//!   {"event":"tcp","port":P,"peer":"<client ip:port>"}   per connection (IPv4-mapped peers printed as IPv4)
//!   {"event":"udp","port":P,"peer":"<client ip:port>"}   per datagram
//!   TCP: reads up to the first newline, 1 KiB or EOF; a request starting with "GET " gets an HTTP/1.0 200 with body
//!   "<ID>\n", anything else gets "<ID>\n"; then the server closes. UDP: each datagram gets "<ID>" back.
//!
//! lb-probe serve ... [--echo-port P]...
//!   Also: TCP ports that echo every byte back until the client closes (bulk transfers through the datapath).
//!
//! lb-probe echo --to <IP:PORT> [--rounds N] [--size S] [--pause-ms X] [--timeout-ms 5000]
//!   One TCP connection: N rounds of sending S bytes (a pattern that differs per round and offset) and reading the
//!   S bytes back, compared byte for byte, pausing X ms between rounds. One line at the end:
//!   {"ok":true,"i":<rounds done>,"local":"<getsockname()>"} or {"ok":false,"i":<round>,"error":...,"stage":...}
//!   (stage `verify` when the bytes came back different).
//!
//! lb-probe tcp --to <IP:PORT> [--count N] [--hold-ms X] [--timeout-ms 2000]
//!   N sequential connections: connect, hold X ms, send "lb-probe\n", read the reply to EOF. Per connection:
//!   {"ok":true,"i":n,"backend":"<ID>","peer":"<getpeername()>","local":"<getsockname()>"}
//!   {"ok":false,"i":n,"error":"ECONNREFUSED","errno":111,"stage":"connect"}
//!
//! lb-probe udp --to <IP:PORT> [--count N] [--sockets S] [--connected] [--timeout-ms 1000]
//!   S sockets, one after the other, each sending N datagrams and waiting for each reply. Per datagram:
//!   {"ok":true,"socket":k,"i":n,"backend":"<ID>","from":"<recvfrom() source, or getpeername() if connected>",
//!    "local":"<getsockname()>"}
//!   {"ok":false,"socket":k,"i":n,"error":"ECONNREFUSED","errno":111,"stage":"recv"}
//!
//! lb-probe udp-sticky --to <IP:PORT> --sockets S --rounds R --pause-file <PATH> [--timeout-ms 1000]
//!                     [--pause-timeout-ms 120000]
//!   S unconnected sockets kept open for all rounds. Each round sends one datagram per socket and prints
//!   {"round":r,"ok":true,"socket":k,"backend":"<ID>","from":"...","local":"..."} (or an error line), then
//!   {"round":r,"event":"round-done"}; before the next round it waits for PATH to exist and deletes it.
//! ```
//!
//! Every exchange prints exactly one line, failures included, so a test can count lines. Timeouts are reported as
//! `"error":"ETIMEDOUT","errno":110` whatever the socket call returned (EAGAIN for a receive timeout). stage is where
//! the failure happened: `socket`, `connect`, `getpeername`, `send` or `recv`. A failure that has no errno (an empty
//! TCP reply) has errno 0.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "lb-probe",
    about = "Identity servers and reporting clients for lb's integration tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer on TCP and UDP ports with an identity.
    Serve(ServeArgs),
    /// Make sequential TCP connections and report who answered.
    Tcp(TcpArgs),
    /// Send UDP datagrams from one or more sockets and report who answered.
    Udp(UdpArgs),
    /// Keep UDP sockets open across rounds, pausing between rounds until a file appears.
    UdpSticky(UdpStickyArgs),
    /// Send data over one TCP connection to an echo port and check that it comes back unchanged.
    Echo(EchoArgs),
}

#[derive(Args)]
struct EchoArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Bytes per round.
    #[arg(long, default_value_t = 65536)]
    size: usize,
    /// Pause between rounds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct ServeArgs {
    /// The identity to answer with.
    #[arg(long)]
    id: String,
    #[arg(long = "tcp-port")]
    tcp_ports: Vec<u16>,
    #[arg(long = "udp-port")]
    udp_ports: Vec<u16>,
    /// TCP ports that echo everything back until EOF.
    #[arg(long = "echo-port")]
    echo_ports: Vec<u16>,
    /// Address to bind; `::` also accepts IPv4 (IPV6_V6ONLY is turned off).
    #[arg(long, default_value = "::")]
    addr: IpAddr,
}

#[derive(Args)]
struct TcpArgs {
    /// Destination, e.g. 10.96.0.10:80 or [fd00::10]:80.
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Keep each connection open this long after connecting, before the request.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Connect, send and receive timeout.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Send an HTTP/1.0 GET and report the response body (the backend's identity).
    #[arg(long)]
    http: bool,
}

#[derive(Args)]
struct UdpArgs {
    /// Destination, e.g. 10.96.0.10:80 or [fd00::10]:80.
    #[arg(long)]
    to: SocketAddr,
    /// Datagrams per socket.
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long, default_value_t = 1)]
    sockets: usize,
    /// connect() each socket and use send/recv instead of sendto/recvfrom.
    #[arg(long)]
    connected: bool,
    /// How long to wait for each reply.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct UdpStickyArgs {
    /// Destination, e.g. 10.96.0.10:80 or [fd00::10]:80.
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    sockets: usize,
    #[arg(long)]
    rounds: usize,
    /// Created by the test to start the next round; deleted by lb-probe.
    #[arg(long)]
    pause_file: PathBuf,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Give up (exit 2) if the pause file does not appear within this time.
    #[arg(long, default_value_t = 120_000)]
    pause_timeout_ms: u64,
    /// connect() each socket once, as DNS resolvers do: the socket LB then translates only at connect time.
    #[arg(long)]
    connected: bool,
}

/// One output line. Absent fields are left out, so each subcommand prints only what it documents.
#[derive(Serialize, Default)]
struct Line<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    round: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proto: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    i: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
}

impl Line<'_> {
    fn print(&self) {
        // stdout is line-buffered, and println! holds its lock for the whole line, so concurrent server threads
        // never interleave inside a line and a test reading the file sees whole lines as they happen.
        match serde_json::to_string(self) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("lb-probe: cannot encode a line: {e}"),
        }
    }

    fn failure(mut self, f: &Failure) -> Self {
        self.ok = Some(false);
        self.error = Some(f.error.clone());
        self.errno = Some(f.errno);
        self.stage = Some(f.stage);
        self
    }
}

/// A failed socket call, reduced to what is printed (io::Error is not Clone, and a socket's failure is printed for
/// each of its datagrams).
#[derive(Clone, Debug)]
struct Failure {
    stage: &'static str,
    error: String,
    errno: i32,
}

impl Failure {
    fn new(stage: &'static str, e: &io::Error) -> Failure {
        let (error, errno) = match (e.kind(), e.raw_os_error()) {
            // connect_timeout's own timeout has no errno, and a receive timeout is EAGAIN: both mean "no answer".
            (ErrorKind::TimedOut | ErrorKind::WouldBlock, _) => {
                ("ETIMEDOUT".to_owned(), libc::ETIMEDOUT)
            }
            (_, Some(n)) => (errno_name(n), n),
            (kind, None) => (format!("{kind:?}"), 0),
        };
        Failure {
            stage,
            error,
            errno,
        }
    }
}

fn at(stage: &'static str) -> impl Fn(io::Error) -> Failure {
    move |e| Failure::new(stage, &e)
}

fn errno_name(n: i32) -> String {
    let name = match n {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EAGAIN => "EAGAIN",
        libc::EPIPE => "EPIPE",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOENT => "ENOENT",
        libc::ENOBUFS => "ENOBUFS",
        libc::EPROTO => "EPROTO",
        _ => return format!("E{n}"),
    };
    name.to_owned()
}

/// IPv4 clients of a dual-stack socket appear as ::ffff:a.b.c.d; print them as the IPv4 address they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Tcp(args) => {
            tcp(args);
            Ok(())
        }
        Command::Udp(args) => {
            udp(args);
            Ok(())
        }
        Command::UdpSticky(args) => udp_sticky(args),
        Command::Echo(args) => {
            echo(args);
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("lb-probe: {e:#}");
        std::process::exit(2);
    }
}

// ---- serve ----

fn serve(args: ServeArgs) -> Result<()> {
    if args.tcp_ports.is_empty() && args.udp_ports.is_empty() && args.echo_ports.is_empty() {
        bail!("give at least one --tcp-port, --udp-port or --echo-port");
    }
    let id: Arc<str> = Arc::from(args.id.as_str());
    // Bind everything before reporting ready, so that a test that waited for "ready" never gets ECONNREFUSED.
    let mut tcp = Vec::new();
    for &port in &args.tcp_ports {
        let addr = SocketAddr::new(args.addr, port);
        let fd = bound_socket(addr, libc::SOCK_STREAM)
            .with_context(|| format!("cannot bind tcp {addr}"))?;
        // SAFETY: fd is a bound stream socket we own; a backlog of 1024 is within somaxconn's range.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot listen on {addr}"));
        }
        tcp.push((port, TcpListener::from(fd)));
        Line {
            event: Some("listening"),
            proto: Some("tcp"),
            port: Some(port),
            ..Line::default()
        }
        .print();
    }
    let mut echo = Vec::new();
    for &port in &args.echo_ports {
        let addr = SocketAddr::new(args.addr, port);
        let fd = bound_socket(addr, libc::SOCK_STREAM)
            .with_context(|| format!("cannot bind tcp {addr}"))?;
        // SAFETY: fd is a bound stream socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("cannot listen on {addr}"));
        }
        echo.push(TcpListener::from(fd));
        Line {
            event: Some("listening"),
            proto: Some("echo"),
            port: Some(port),
            ..Line::default()
        }
        .print();
    }
    let mut udp = Vec::new();
    for &port in &args.udp_ports {
        let addr = SocketAddr::new(args.addr, port);
        let fd = bound_socket(addr, libc::SOCK_DGRAM)
            .with_context(|| format!("cannot bind udp {addr}"))?;
        udp.push((port, UdpSocket::from(fd)));
        Line {
            event: Some("listening"),
            proto: Some("udp"),
            port: Some(port),
            ..Line::default()
        }
        .print();
    }
    Line {
        event: Some("ready"),
        id: Some(&id),
        ..Line::default()
    }
    .print();

    let mut threads = Vec::new();
    for (port, listener) in tcp {
        let id = id.clone();
        threads.push(std::thread::spawn(move || {
            accept_loop(port, &listener, &id)
        }));
    }
    for listener in echo {
        threads.push(std::thread::spawn(move || echo_accept_loop(&listener)));
    }
    for (port, socket) in udp {
        let id = id.clone();
        threads.push(std::thread::spawn(move || udp_echo(port, &socket, &id)));
    }
    // The loops run until the process is killed; if one fails, so does the server, so a test sees it exit.
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => bail!("a server thread panicked"),
        }
    }
    Ok(())
}

/// A socket of `ty` bound to `addr` with SO_REUSEADDR (a restarted server must not wait out TIME_WAIT), and for
/// IPv6 with IPV6_V6ONLY off, so that `::` also serves IPv4. std binds before any option can be set, hence libc.
fn bound_socket(addr: SocketAddr, ty: libc::c_int) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain syscall; the result is checked before use.
    let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    // SAFETY: zeroed sockaddr_storage is a valid (unspecified) address of every family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for every sockaddr type.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: storage holds a sockaddr of `len` bytes for the socket's family.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn accept_loop(port: u16, listener: &TcpListener, id: &Arc<str>) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            // A connection reset before accept, or a momentary lack of descriptors, is not the server's end.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::EINTR)
                ) =>
            {
                eprintln!("lb-probe: accept on {port}: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("accept on tcp port {port}")),
        };
        Line {
            event: Some("tcp"),
            port: Some(port),
            peer: Some(canonical(peer).to_string()),
            ..Line::default()
        }
        .print();
        let id = id.clone();
        // A thread per connection: a slow or silent client must not hold up the next one.
        std::thread::spawn(move || {
            if let Err(e) = answer_tcp(stream, &id) {
                eprintln!("lb-probe: tcp connection from {peer}: {e}");
            }
        });
    }
}

fn answer_tcp(mut stream: TcpStream, id: &str) -> io::Result<()> {
    const MAX_REQUEST: usize = 1024;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0u8; MAX_REQUEST];
    while !request.contains(&b'\n') && request.len() < MAX_REQUEST {
        match stream.read(&mut chunk[..MAX_REQUEST - request.len()]) {
            Ok(0) => break,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
            // A client that sends nothing still gets the identity, after the timeout.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        }
    }
    let body = format!("{id}\n");
    let reply = if request.starts_with(b"GET ") {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    };
    stream.write_all(reply.as_bytes())?;
    // Half-close, then drain until the client closes: closing with unread request bytes (the rest of an HTTP
    // request's headers) would send a RST, which can make the client lose the reply.
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

fn udp_echo(port: u16, socket: &UdpSocket, id: &str) -> Result<()> {
    let mut buf = [0u8; 65536];
    loop {
        let (_, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            // ICMP errors from earlier replies surface here on Linux only with IP_RECVERR; EINTR is harmless.
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("recvfrom on udp port {port}")),
        };
        Line {
            event: Some("udp"),
            port: Some(port),
            peer: Some(canonical(peer).to_string()),
            ..Line::default()
        }
        .print();
        if let Err(e) = socket.send_to(id.as_bytes(), peer) {
            eprintln!("lb-probe: udp reply to {peer}: {e}");
        }
    }
}

// ---- tcp ----

fn tcp(args: TcpArgs) {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    for i in 0..args.count {
        let line = Line {
            i: Some(i),
            ..Line::default()
        };
        match tcp_once(
            args.to,
            Duration::from_millis(args.hold_ms),
            timeout,
            args.http,
        ) {
            Ok((backend, peer, local)) => Line {
                ok: Some(true),
                backend: Some(backend),
                peer: Some(peer.to_string()),
                local: Some(local.to_string()),
                ..line
            }
            .print(),
            Err(f) => line.failure(&f).print(),
        }
    }
}

/// One connection: returns the identity, getpeername() and getsockname().
fn tcp_once(
    to: SocketAddr,
    hold: Duration,
    timeout: Duration,
    http: bool,
) -> Result<(String, SocketAddr, SocketAddr), Failure> {
    let mut stream = TcpStream::connect_timeout(&to, timeout).map_err(at("connect"))?;
    let peer = stream.peer_addr().map_err(at("getpeername"))?;
    let local = stream.local_addr().map_err(at("getsockname"))?;
    if !hold.is_zero() {
        std::thread::sleep(hold);
    }
    stream
        .set_read_timeout(Some(timeout))
        .map_err(at("socket"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(at("socket"))?;
    let request: &[u8] = if http {
        b"GET / HTTP/1.0\r\nHost: lb-demo\r\n\r\n"
    } else {
        b"lb-probe\n"
    };
    stream.write_all(request).map_err(at("send"))?;
    let mut reply = Vec::new();
    (&mut stream)
        .take(4096)
        .read_to_end(&mut reply)
        .map_err(at("recv"))?;
    let reply = String::from_utf8_lossy(&reply);
    // An HTTP response carries the identity as its body, after the blank line.
    let body = if http {
        reply.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    } else {
        &reply
    };
    let backend = body.trim().to_owned();
    if backend.is_empty() {
        return Err(Failure::new(
            "recv",
            &io::Error::new(ErrorKind::UnexpectedEof, "empty reply"),
        ));
    }
    Ok((backend, peer, local))
}

// ---- udp ----

fn udp_socket(to: SocketAddr, connected: bool, timeout: Duration) -> Result<UdpSocket, Failure> {
    let any: SocketAddr = if to.is_ipv4() {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    };
    let socket = UdpSocket::bind(any).map_err(at("socket"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(at("socket"))?;
    if connected {
        socket.connect(to).map_err(at("connect"))?;
    }
    Ok(socket)
}

/// One datagram and its reply: returns the identity, the reply's source (or getpeername()) and getsockname().
fn udp_exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    connected: bool,
    payload: &str,
) -> Result<(String, SocketAddr, SocketAddr), Failure> {
    discard_stale_replies(socket);
    let mut buf = [0u8; 2048];
    let (n, from) = if connected {
        socket.send(payload.as_bytes()).map_err(at("send"))?;
        let n = socket.recv(&mut buf).map_err(at("recv"))?;
        (n, socket.peer_addr().map_err(at("getpeername"))?)
    } else {
        socket.send_to(payload.as_bytes(), to).map_err(at("send"))?;
        socket.recv_from(&mut buf).map_err(at("recv"))?
    };
    let local = socket.local_addr().map_err(at("getsockname"))?;
    Ok((
        String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
        from,
        local,
    ))
}

/// Drops replies that arrived after an earlier exchange timed out, so they are not taken for this one's.
fn discard_stale_replies(socket: &UdpSocket) {
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 2048];
    // Stops at EAGAIN; a pending ICMP error (ECONNREFUSED on a connected socket) is consumed here too, which is
    // right: it belongs to the earlier exchange.
    while socket.recv(&mut buf).is_ok() {}
    let _ = socket.set_nonblocking(false);
}

fn udp(args: UdpArgs) {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    for k in 0..args.sockets {
        let socket = udp_socket(args.to, args.connected, timeout);
        for i in 0..args.count {
            let line = Line {
                socket: Some(k),
                i: Some(i),
                ..Line::default()
            };
            let result = socket.as_ref().map_err(Failure::clone).and_then(|s| {
                udp_exchange(s, args.to, args.connected, &format!("lb-probe {k} {i}"))
            });
            print_udp_result(line, result);
        }
    }
}

fn print_udp_result(line: Line<'_>, result: Result<(String, SocketAddr, SocketAddr), Failure>) {
    match result {
        Ok((backend, from, local)) => Line {
            ok: Some(true),
            backend: Some(backend),
            from: Some(from.to_string()),
            local: Some(local.to_string()),
            ..line
        }
        .print(),
        Err(f) => line.failure(&f).print(),
    }
}

// ---- udp-sticky ----

fn udp_sticky(args: UdpStickyArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let sockets: Vec<_> = (0..args.sockets)
        .map(|_| udp_socket(args.to, args.connected, timeout))
        .collect();
    for round in 1..=args.rounds {
        for (k, socket) in sockets.iter().enumerate() {
            let line = Line {
                round: Some(round),
                socket: Some(k),
                ..Line::default()
            };
            let result = socket.as_ref().map_err(Failure::clone).and_then(|s| {
                udp_exchange(s, args.to, args.connected, &format!("lb-probe {round} {k}"))
            });
            print_udp_result(line, result);
        }
        Line {
            round: Some(round),
            event: Some("round-done"),
            ..Line::default()
        }
        .print();
        if round < args.rounds {
            wait_for_file(
                &args.pause_file,
                Duration::from_millis(args.pause_timeout_ms),
            )?;
        }
    }
    Ok(())
}

/// Waits for the test to create `path`, then deletes it so the next pause waits for a new one.
fn wait_for_file(path: &PathBuf, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            bail!(
                "pause file {} did not appear within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot delete pause file {}", path.display()))
}

// ---- echo ----

fn echo_accept_loop(listener: &TcpListener) -> Result<()> {
    loop {
        let (stream, _) = listener.accept().context("accept on an echo port")?;
        std::thread::spawn(move || {
            let _ = echo_copy(stream);
        });
    }
}

fn echo_copy(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// The byte at `offset` of round `round`: differs per round and position, so a misplaced or stale segment shows.
fn pattern(round: usize, offset: usize) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(round.wrapping_mul(7)) % 251) as u8
}

fn echo(args: EchoArgs) {
    let timeout = Duration::from_millis(args.timeout_ms);
    let fail = |i: usize, f: Failure| {
        Line {
            i: Some(i),
            ..Line::default()
        }
        .failure(&f)
        .print()
    };
    let stream = match TcpStream::connect_timeout(&args.to, timeout) {
        Ok(s) => s,
        Err(e) => return fail(0, Failure::new("connect", &e)),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let local = stream.local_addr().ok().map(|a| canonical(a).to_string());
    let mut reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => return fail(0, Failure::new("socket", &e)),
    };
    for round in 0..args.rounds {
        if round > 0 && args.pause_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.pause_ms));
        }
        let data: Vec<u8> = (0..args.size).map(|o| pattern(round, o)).collect();
        // Written from another thread while this one reads: a large round would otherwise fill both directions'
        // buffers and stall.
        let mut writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return fail(round, Failure::new("socket", &e)),
        };
        let sender = std::thread::spawn(move || writer.write_all(&data));
        let mut back = vec![0u8; args.size];
        let read = reader.read_exact(&mut back);
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sender panicked")));
        if let Err(e) = sent {
            return fail(round, Failure::new("send", &e));
        }
        if let Err(e) = read {
            return fail(round, Failure::new("recv", &e));
        }
        if let Some(o) = (0..args.size).find(|&o| back[o] != pattern(round, o)) {
            return fail(
                round,
                Failure {
                    stage: "verify",
                    error: format!("byte {o} of round {round} came back different"),
                    errno: 0,
                },
            );
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    Line {
        ok: Some(true),
        i: Some(args.rounds),
        local,
        ..Line::default()
    }
    .print();
}
