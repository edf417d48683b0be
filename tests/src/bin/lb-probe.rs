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
//! lb-probe echo --to <IP:PORT> [--rounds N] [--size S] [--pause-ms X] [--timeout-ms 5000] [--pause-file PATH]
//!   One TCP connection: N rounds of sending S bytes (a pattern that differs per round and offset) and reading the
//!   S bytes back, compared byte for byte, pausing X ms between rounds. With --pause-file, each round but the first
//!   waits for PATH to exist (and deletes it), and each round prints {"round":r,"ok":true,"event":"round-done"}.
//!   One line at the end:
//!   {"ok":true,"i":<rounds done>,"local":"<getsockname()>"} or {"ok":false,"i":<round>,"error":...,"stage":...}
//!   (stage `verify` when the bytes came back different).
//!
//! lb-probe tcp --to <IP:PORT> [--count N] [--hold-ms X] [--linger-ms Y] [--timeout-ms 2000]
//!   N sequential connections: connect, hold X ms, send "lb-probe\n", read the reply to EOF (the server's FIN),
//!   wait Y ms half-closed, close. Per connection:
//!   {"ok":true,"i":n,"backend":"<ID>","peer":"<getpeername()>","local":"<getsockname()>"}
//!   {"ok":false,"i":n,"error":"ECONNREFUSED","errno":111,"stage":"connect"}
//!   With --reset, each connection is ended with a RST right after the hold (SO_LINGER 0, close), and the line has
//!   "peer" and "local" but no "backend".
//!
//! lb-probe udp --to <IP:PORT> [--also <IP:PORT>]... [--count N] [--sockets S] [--connected] [--sport P]
//!   [--timeout-ms 1000]
//!   S sockets, one after the other, each sending N datagrams and waiting for each reply. Per datagram:
//!   {"ok":true,"socket":k,"i":n,"backend":"<ID>","from":"<recvfrom() source, or getpeername() if connected>",
//!    "local":"<getsockname()>"}
//!   {"ok":false,"socket":k,"i":n,"error":"ECONNREFUSED","errno":111,"stage":"recv"}
//!
//!   With --size N, each datagram is "lb-probe-echo\n" followed by N pattern bytes (N up to 60000, so it is
//!   fragmented over a 1500-byte MTU); the server answers "<ID>\n" followed by the same N bytes, and the line gets
//!   "len":N when the echoed bytes are intact, or ok false with "error":"ECORRUPT" when they are not.
//!
//! lb-probe sctp-serve --id <ID> --port P
//!   Raw-socket SCTP (for kernels without an SCTP stack: no association, only packets): answers every SCTP packet
//!   to port P whose CRC32c is right with an INIT-ACK from P to the sender's port, carrying <ID> as its state
//!   cookie; per packet {"event":"sctp","port":P,"peer":"<src ip:port>","ok":<CRC32c right>}. IPv4 and IPv6.
//!
//! lb-probe sctp --to <IP:PORT> [--count N] [--sport S] [--timeout-ms 1000]
//!   N INIT packets from source ports S, S+1, ... (raw socket, CRC32c computed here); per packet
//!   {"ok":true,"i":n,"backend":"<ID>","from":"<reply's src ip:port>","port":<reply's destination port>} when an
//!   INIT-ACK with a right CRC32c and the INIT's tag comes back, else ok false (ETIMEDOUT, or EPROTO for a reply
//!   with a wrong CRC32c).
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
    /// Answer SCTP INIT packets on a raw socket (no SCTP stack needed).
    SctpServe(SctpServeArgs),
    /// Send SCTP INIT packets on a raw socket and report who answered.
    Sctp(SctpArgs),
    /// Send data over one TCP connection to an echo port and check that it comes back unchanged.
    Echo(EchoArgs),
}

#[derive(Args)]
struct SctpServeArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    port: u16,
}

#[derive(Args)]
struct SctpArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Source port of the first packet; packet n uses sport + n.
    #[arg(long, default_value_t = 40000)]
    sport: u16,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
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
    /// Before each round but the first, wait for this file to exist and delete it; print a line after each round.
    /// One connection held across whatever the test does between rounds.
    #[arg(long)]
    pause_file: Option<PathBuf>,
    #[arg(long, default_value_t = 120_000)]
    pause_timeout_ms: u64,
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
    /// Keep each connection open this long after the reply's end (the server's FIN), before closing: the connection
    /// stays half-closed meanwhile.
    #[arg(long, default_value_t = 0)]
    linger_ms: u64,
    /// Connect, send and receive timeout.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Send an HTTP/1.0 GET and report the response body (the backend's identity).
    #[arg(long)]
    http: bool,
    /// After connecting (and holding), end the connection with a RST (SO_LINGER 0) instead of a request; the line
    /// then has no backend.
    #[arg(long)]
    reset: bool,
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
    /// Send N pattern bytes after an echo header and check that the reply echoes them intact.
    #[arg(long)]
    size: Option<usize>,
    /// Bind every socket to this source port (SO_REUSEADDR), as `nc -u -p PORT` does: consecutive runs then send
    /// the same 5-tuple.
    #[arg(long, default_value_t = 0)]
    sport: u16,
    /// More destinations for unconnected sockets: datagram i of a socket goes to the i-th of (--to, --also...),
    /// round robin, so one socket talks to several services.
    #[arg(long)]
    also: Vec<SocketAddr>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<usize>,
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
        self.len = None;
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
        Command::SctpServe(args) => sctp_serve(args),
        Command::Sctp(args) => {
            sctp(args);
            Ok(())
        }
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
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            // ICMP errors from earlier replies surface here on Linux only with IP_RECVERR; EINTR is harmless.
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("recvfrom on udp port {port}")),
        };
        let echo = buf[..n].strip_prefix(ECHO_HEADER);
        Line {
            event: Some("udp"),
            port: Some(port),
            peer: Some(canonical(peer).to_string()),
            len: echo.map(<[u8]>::len),
            ..Line::default()
        }
        .print();
        let reply = match echo {
            Some(body) => [id.as_bytes(), b"\n", body].concat(),
            None => id.as_bytes().to_vec(),
        };
        if let Err(e) = socket.send_to(&reply, peer) {
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
        if args.reset {
            match tcp_reset(args.to, Duration::from_millis(args.hold_ms), timeout) {
                Ok((peer, local)) => Line {
                    ok: Some(true),
                    peer: Some(peer.to_string()),
                    local: Some(local.to_string()),
                    ..line
                }
                .print(),
                Err(f) => line.failure(&f).print(),
            }
            continue;
        }
        match tcp_once(
            args.to,
            Duration::from_millis(args.hold_ms),
            timeout,
            args.http,
            Duration::from_millis(args.linger_ms),
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

/// One connection ended by a RST: SO_LINGER with a zero timeout makes close() abort it. Returns getpeername()
/// and getsockname().
fn tcp_reset(
    to: SocketAddr,
    hold: Duration,
    timeout: Duration,
) -> Result<(SocketAddr, SocketAddr), Failure> {
    let stream = TcpStream::connect_timeout(&to, timeout).map_err(at("connect"))?;
    let peer = stream.peer_addr().map_err(at("getpeername"))?;
    let local = stream.local_addr().map_err(at("getsockname"))?;
    if !hold.is_zero() {
        std::thread::sleep(hold);
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: linger is a valid struct for the length given; the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Failure::new("socket", &io::Error::last_os_error()));
    }
    drop(stream);
    Ok((peer, local))
}

/// One connection: returns the identity, getpeername() and getsockname().
fn tcp_once(
    to: SocketAddr,
    hold: Duration,
    timeout: Duration,
    http: bool,
    linger: Duration,
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
    if !linger.is_zero() {
        std::thread::sleep(linger);
    }
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
    udp_socket_from(to, 0, connected, timeout)
}

/// A UDP socket bound to `sport` (0: any), with SO_REUSEADDR so that a run right after another binds it again.
fn udp_socket_from(
    to: SocketAddr,
    sport: u16,
    connected: bool,
    timeout: Duration,
) -> Result<UdpSocket, Failure> {
    let any: SocketAddr = if to.is_ipv4() {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), sport)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), sport)
    };
    let socket = if sport == 0 {
        UdpSocket::bind(any).map_err(at("socket"))?
    } else {
        let domain = if to.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket() has no memory arguments; the fd is owned at once.
        let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Failure::new("socket", &io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh socket owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a pointer to a c_int with its size.
        let rc = unsafe {
            libc::setsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Failure::new("socket", &io::Error::last_os_error()));
        }
        let socket = UdpSocket::from(owned);
        bind_udp(&socket, any).map_err(at("socket"))?;
        socket
    };
    socket
        .set_read_timeout(Some(timeout))
        .map_err(at("socket"))?;
    if connected {
        socket.connect(to).map_err(at("connect"))?;
    }
    Ok(socket)
}

/// The prefix of a datagram the server echoes (`udp --size`).
const ECHO_HEADER: &[u8] = b"lb-probe-echo\n";

/// `n` bytes that differ between datagrams (`seed`) and along the datagram, so a fragment put in the wrong place
/// or taken from another datagram shows.
fn pattern(seed: usize, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i.wrapping_mul(31) ^ seed.wrapping_mul(131) ^ (i >> 8)) & 0xff) as u8)
        .collect()
}

/// One datagram and its reply: returns the identity, the reply's source (or getpeername()) and getsockname().
/// With `echo`, the datagram carries these bytes after [`ECHO_HEADER`] and the reply must echo them after the
/// identity line.
fn udp_exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    connected: bool,
    payload: &str,
    echo: Option<&[u8]>,
) -> Result<(String, SocketAddr, SocketAddr), Failure> {
    discard_stale_replies(socket);
    let datagram = match echo {
        Some(body) => [ECHO_HEADER, body].concat(),
        None => payload.as_bytes().to_vec(),
    };
    let mut buf = vec![0u8; 65536];
    let (n, from) = if connected {
        socket.send(&datagram).map_err(at("send"))?;
        let n = socket.recv(&mut buf).map_err(at("recv"))?;
        (n, socket.peer_addr().map_err(at("getpeername"))?)
    } else {
        socket.send_to(&datagram, to).map_err(at("send"))?;
        socket.recv_from(&mut buf).map_err(at("recv"))?
    };
    let local = socket.local_addr().map_err(at("getsockname"))?;
    let reply = &buf[..n];
    let Some(body) = echo else {
        return Ok((
            String::from_utf8_lossy(reply).trim().to_owned(),
            from,
            local,
        ));
    };
    let split = reply
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(reply.len());
    let (id, rest) = reply.split_at(split);
    if rest.get(1..) != Some(body) {
        return Err(Failure {
            stage: "recv",
            error: "ECORRUPT".to_owned(),
            errno: 0,
        });
    }
    Ok((String::from_utf8_lossy(id).trim().to_owned(), from, local))
}

/// Drops replies that arrived after an earlier exchange timed out, so they are not taken for this one's.
fn discard_stale_replies(socket: &UdpSocket) {
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; 65536];
    // Stops at EAGAIN; a pending ICMP error (ECONNREFUSED on a connected socket) is consumed here too, which is
    // right: it belongs to the earlier exchange.
    while socket.recv(&mut buf).is_ok() {}
    let _ = socket.set_nonblocking(false);
}

/// bind(2) for an already created UDP socket (std has no bind on an existing socket).
fn bind_udp(socket: &UdpSocket, addr: SocketAddr) -> io::Result<()> {
    // SAFETY: sockaddr_storage is plain data, zeroed is a valid value; each branch writes the variant it casts to.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned for it.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: a valid socket, and a sockaddr of `len` bytes that lives across the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn udp(args: UdpArgs) {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    for k in 0..args.sockets {
        let socket = udp_socket_from(args.to, args.sport, args.connected, timeout);
        for i in 0..args.count {
            let line = Line {
                socket: Some(k),
                i: Some(i),
                ..Line::default()
            };
            let body = args.size.map(|n| pattern(k * 1000 + i, n));
            let line = Line {
                len: args.size,
                ..line
            };
            let result = socket.as_ref().map_err(Failure::clone).and_then(|s| {
                let to = if args.connected || i % (args.also.len() + 1) == 0 {
                    args.to
                } else {
                    args.also[i % (args.also.len() + 1) - 1]
                };
                udp_exchange(
                    s,
                    to,
                    args.connected,
                    &format!("lb-probe {k} {i}"),
                    body.as_deref(),
                )
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
                udp_exchange(
                    s,
                    args.to,
                    args.connected,
                    &format!("lb-probe {round} {k}"),
                    None,
                )
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

// ---- sctp (raw sockets) ----

const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_COMMON_HEADER: usize = 12;

/// CRC32c (Castagnoli, reflected 0x82F63B78), bit by bit: SCTP's checksum (RFC 9260 appendix A). Written out here
/// rather than shared with the datapath's code, so the probe checks the datapath's incremental update independently.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Whether an SCTP packet's checksum field (stored little-endian, as RFC 9260 appendix A puts the CRC's bytes) is
/// the CRC32c of the packet with that field zeroed.
fn sctp_crc_ok(packet: &[u8]) -> bool {
    if packet.len() < SCTP_COMMON_HEADER {
        return false;
    }
    let stored = u32::from_le_bytes([packet[8], packet[9], packet[10], packet[11]]);
    let mut copy = packet.to_vec();
    copy[8..12].fill(0);
    crc32c(&copy) == stored
}

/// An SCTP packet: common header (ports, verification tag, CRC32c) and one chunk of `chunk_type` whose value is
/// `body` (padded to 4 bytes).
fn sctp_packet(sport: u16, dport: u16, vtag: u32, chunk_type: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(SCTP_COMMON_HEADER + 4 + body.len() + 3);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.push(chunk_type);
    p.push(0);
    let chunk_len = u16::try_from(4 + body.len()).unwrap_or(u16::MAX);
    p.extend_from_slice(&chunk_len.to_be_bytes());
    p.extend_from_slice(body);
    while p.len() % 4 != 0 {
        p.push(0);
    }
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// INIT's fixed part (RFC 9260 3.3.2): initiate tag, a_rwnd, streams, initial TSN.
fn init_body(tag: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&tag.to_be_bytes());
    b.extend_from_slice(&65536u32.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&tag.to_be_bytes());
    b
}

/// INIT-ACK: the fixed part, then a State Cookie parameter (type 7) carrying the server's identity.
fn init_ack_body(tag: u32, id: &str) -> Vec<u8> {
    let mut b = init_body(tag);
    let param_len = u16::try_from(4 + id.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&7u16.to_be_bytes());
    b.extend_from_slice(&param_len.to_be_bytes());
    b.extend_from_slice(id.as_bytes());
    b
}

/// The state cookie of an INIT-ACK chunk starting at `chunk` (after the common header).
fn init_ack_cookie(chunk: &[u8]) -> Option<String> {
    // Chunk header (4) + fixed part (16), then the parameter's type and length.
    let param = chunk.get(20..)?;
    if param.get(0..2)? != 7u16.to_be_bytes() {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*param.get(2)?, *param.get(3)?]));
    let value = param.get(4..len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// A raw SCTP socket of the address's family. IPv4 raw sockets receive the IP header too, IPv6 ones do not.
fn raw_sctp_socket(v6: bool, timeout: Option<Duration>) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(t) = timeout {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval for the length given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn sockaddr_of(addr: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        IpAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

fn ip_of(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(std::net::Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const *ss).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

fn raw_send(fd: &OwnedFd, to: IpAddr, packet: &[u8]) -> io::Result<()> {
    let (ss, len) = sockaddr_of(to);
    // SAFETY: packet and ss are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const ss).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One received SCTP packet (without the IPv4 header) and its source address.
fn raw_recv(fd: &OwnedFd, v6: bool, buf: &mut [u8]) -> io::Result<(IpAddr, usize, usize)> {
    // SAFETY: zeroed sockaddr_storage is valid; recvfrom writes at most `len` bytes into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf, ss and len are valid for recvfrom to write.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut ss).cast(),
            &mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let from = ip_of(&ss).ok_or_else(|| io::Error::other("recvfrom: unknown family"))?;
    let start = if v6 {
        0
    } else {
        usize::from(buf.first().copied().unwrap_or(0x45) & 0x0f) * 4
    };
    Ok((from, start.min(n), n))
}

fn port_pair(p: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    )
}

fn sctp_serve(args: SctpServeArgs) -> Result<()> {
    let v4 = raw_sctp_socket(false, None).context("raw IPv4 SCTP socket")?;
    let v6 = raw_sctp_socket(true, None).context("raw IPv6 SCTP socket")?;
    Line {
        event: Some("ready"),
        id: Some(&args.id),
        ..Line::default()
    }
    .print();
    let id: Arc<str> = Arc::from(args.id.as_str());
    let port = args.port;
    let threads: Vec<_> = [(v4, false), (v6, true)]
        .into_iter()
        .map(|(fd, is_v6)| {
            let id = id.clone();
            std::thread::spawn(move || sctp_answer_loop(&fd, is_v6, port, &id))
        })
        .collect();
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => bail!("a server thread panicked"),
        }
    }
    Ok(())
}

fn sctp_answer_loop(fd: &OwnedFd, v6: bool, port: u16, id: &str) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (from, start, n) = match raw_recv(fd, v6, &mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("recvfrom on the raw SCTP socket"),
        };
        let packet = &buf[start..n];
        if packet.len() < SCTP_COMMON_HEADER + 20 {
            continue;
        }
        let (sport, dport) = port_pair(packet);
        if dport != port || packet[SCTP_COMMON_HEADER] != SCTP_INIT {
            continue;
        }
        let crc_ok = sctp_crc_ok(packet);
        let peer = SocketAddr::new(from, sport);
        Line {
            event: Some("sctp"),
            port: Some(port),
            peer: Some(canonical(peer).to_string()),
            ok: Some(crc_ok),
            ..Line::default()
        }
        .print();
        if !crc_ok {
            // A receiver drops a packet with a wrong checksum (RFC 9260 6.8).
            continue;
        }
        let chunk = &packet[SCTP_COMMON_HEADER..];
        let tag = u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        let reply = sctp_packet(port, sport, tag, SCTP_INIT_ACK, &init_ack_body(tag, id));
        if let Err(e) = raw_send(fd, from, &reply) {
            eprintln!("lb-probe: sctp reply to {peer}: {e}");
        }
    }
}

fn sctp(args: SctpArgs) {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let v6 = args.to.is_ipv6();
    let fd = raw_sctp_socket(v6, Some(timeout)).map_err(at("socket"));
    for i in 0..args.count {
        let line = Line {
            i: Some(i),
            ..Line::default()
        };
        let sport = args.sport.wrapping_add(u16::try_from(i).unwrap_or(0));
        let result = fd
            .as_ref()
            .map_err(Failure::clone)
            .and_then(|fd| sctp_once(fd, args.to, sport, 0x1b00_0000 | i as u32, timeout));
        match result {
            Ok((backend, from, port)) => Line {
                ok: Some(true),
                backend: Some(backend),
                from: Some(from.to_string()),
                port: Some(port),
                ..line
            }
            .print(),
            Err(f) => line.failure(&f).print(),
        }
    }
}

/// One INIT and its INIT-ACK: returns the state cookie (the server's identity), the reply's source and its
/// destination port.
fn sctp_once(
    fd: &OwnedFd,
    to: SocketAddr,
    sport: u16,
    tag: u32,
    timeout: Duration,
) -> Result<(String, SocketAddr, u16), Failure> {
    let init = sctp_packet(sport, to.port(), 0, SCTP_INIT, &init_body(tag));
    raw_send(fd, to.ip(), &init).map_err(at("send"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        if Instant::now() >= deadline {
            return Err(Failure::new("recv", &io::Error::from(ErrorKind::TimedOut)));
        }
        let (from, start, n) = raw_recv(fd, to.is_ipv6(), &mut buf).map_err(at("recv"))?;
        let packet = &buf[start..n];
        if packet.len() < SCTP_COMMON_HEADER + 20 {
            continue;
        }
        let (src, dst) = port_pair(packet);
        let vtag = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        // Replies to other probes' packets (or to earlier ones of this run) are skipped by tag.
        if packet[SCTP_COMMON_HEADER] != SCTP_INIT_ACK || vtag != tag {
            continue;
        }
        if !sctp_crc_ok(packet) {
            return Err(Failure {
                stage: "recv",
                error: "EPROTO".to_owned(),
                errno: libc::EPROTO,
            });
        }
        let backend = init_ack_cookie(&packet[SCTP_COMMON_HEADER..]).unwrap_or_default();
        return Ok((backend, SocketAddr::new(from, src), dst));
    }
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
fn echo_pattern(round: usize, offset: usize) -> u8 {
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
        if round > 0
            && let Some(path) = &args.pause_file
            && let Err(e) = wait_for_file(path, Duration::from_millis(args.pause_timeout_ms))
        {
            return fail(
                round,
                Failure {
                    stage: "pause",
                    error: format!("{e:#}"),
                    errno: 0,
                },
            );
        }
        let data: Vec<u8> = (0..args.size).map(|o| echo_pattern(round, o)).collect();
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
        if let Some(o) = (0..args.size).find(|&o| back[o] != echo_pattern(round, o)) {
            return fail(
                round,
                Failure {
                    stage: "verify",
                    error: format!("byte {o} of round {round} came back different"),
                    errno: 0,
                },
            );
        }
        if args.pause_file.is_some() {
            Line {
                round: Some(round),
                ok: Some(true),
                event: Some("round-done"),
                ..Line::default()
            }
            .print();
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
