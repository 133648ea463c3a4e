//! Socket creation: the setsockopt/bind/listen sequences behind the Python constructors.
//!
//! Everything here hands back a raw file descriptor owned by the caller (Python wraps it in a
//! `socket.socket`). On every error path the half-built socket is dropped, which closes it.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use pyo3::prelude::*;
#[cfg(test)]
use socket2::{Domain, Protocol, Type};
use socket2::{SockAddr, Socket};

use crate::errors::{Error, Result};

pub const REUSE_ADDR: u32 = 1;
pub const REUSE_PORT: u32 = 1 << 1;
pub const V6ONLY: u32 = 1 << 2;
pub const DUALSTACK: u32 = 1 << 3;
pub const BIND_NO_PORT: u32 = 1 << 4;
pub const NO_BIND: u32 = 1 << 5;
const ALL_FLAGS: u32 = (1 << 6) - 1;

/// What the Python layer asks for, already validated there; validated again here so that no
/// input can make the native side misbehave.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub family: i32,
    pub sotype: i32,
    pub ip: &'a str,
    pub port: u16,
    pub scope_id: u32,
    pub flags: u32,
    /// `listen()` backlog; negative means "do not listen".
    pub backlog: i32,
    pub multicast_group: Option<&'a str>,
}

fn parse_addr(family: i32, ip: &str, port: u16, scope_id: u32) -> Result<SocketAddr> {
    let addr: IpAddr = ip.parse().map_err(|_| Error::Invalid(format!("host {ip:?} is not an IP address")))?;
    match (family, addr) {
        (libc::AF_INET, IpAddr::V4(a)) => Ok(SocketAddr::from((a, port))),
        (libc::AF_INET6, IpAddr::V6(a)) => Ok(SocketAddr::V6(SocketAddrV6::new(a, port, 0, scope_id))),
        (libc::AF_INET, IpAddr::V6(_)) => Err(Error::Invalid(format!("host {ip:?} is IPv6 but family is AF_INET"))),
        (libc::AF_INET6, IpAddr::V4(_)) => Err(Error::Invalid(format!("host {ip:?} is IPv4 but family is AF_INET6"))),
        _ => Err(Error::Invalid(format!("unsupported address family {family}"))),
    }
}

fn describe(addr: &SocketAddr) -> String {
    addr.to_string()
}

/// Apply the reuse options of `flags` to an existing socket.
pub fn apply_flags(sock: &Socket, family: i32, flags: u32) -> Result<()> {
    if flags & !ALL_FLAGS != 0 {
        return Err(Error::Invalid(format!("unknown flag bits {:#x}", flags & !ALL_FLAGS)));
    }
    if family == libc::AF_INET6 && flags & (V6ONLY | DUALSTACK) != 0 {
        sock.set_only_v6(flags & DUALSTACK == 0).map_err(|e| Error::os(e, "setsockopt(IPV6_V6ONLY)"))?;
    }
    if flags & REUSE_ADDR != 0 {
        sock.set_reuse_address(true).map_err(|e| Error::os(e, "setsockopt(SO_REUSEADDR)"))?;
    }
    if flags & REUSE_PORT != 0 {
        sock.set_reuse_port(true).map_err(|e| Error::os(e, "setsockopt(SO_REUSEPORT)"))?;
    }
    if flags & BIND_NO_PORT != 0 {
        nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(|e| Error::Os { errno: e as i32, what: "setsockopt(IP_BIND_ADDRESS_NO_PORT)".into() })?;
    }
    Ok(())
}

fn join_group(sock: &Socket, group: &str) -> Result<()> {
    let addr: IpAddr =
        group.parse().map_err(|_| Error::Invalid(format!("multicast group {group:?} is not an IP address")))?;
    if !addr.is_multicast() {
        return Err(Error::Invalid(format!("{group} is not a multicast address")));
    }
    match addr {
        IpAddr::V4(g) => sock
            .join_multicast_v4(&g, &std::net::Ipv4Addr::UNSPECIFIED)
            .map_err(|e| Error::os(e, format!("join multicast group {g}"))),
        IpAddr::V6(g) => sock.join_multicast_v6(&g, 0).map_err(|e| Error::os(e, format!("join multicast group {g}"))),
    }
}

/// Configure, bind (and optionally listen on) a socket the caller created.
pub fn configure(sock: &Socket, req: &Request<'_>) -> Result<()> {
    if !matches!(req.family, libc::AF_INET | libc::AF_INET6) {
        return Err(Error::Invalid(format!("unsupported address family {}", req.family)));
    }
    if !matches!(req.sotype, libc::SOCK_STREAM | libc::SOCK_DGRAM) {
        return Err(Error::Invalid(format!("unsupported socket type {}", req.sotype)));
    }
    if req.backlog >= 0 && req.sotype != libc::SOCK_STREAM {
        return Err(Error::Invalid("only stream sockets can listen".into()));
    }
    let addr =
        if req.flags & NO_BIND == 0 { Some(parse_addr(req.family, req.ip, req.port, req.scope_id)?) } else { None };
    apply_flags(sock, req.family, req.flags)?;
    if let Some(group) = req.multicast_group {
        join_group(sock, group)?;
    }
    if let Some(addr) = addr {
        sock.bind(&SockAddr::from(addr)).map_err(|e| Error::os(e, format!("bind {}", describe(&addr))))?;
        if req.backlog >= 0 {
            sock.listen(req.backlog).map_err(|e| Error::os(e, format!("listen {}", describe(&addr))))?;
        }
    }
    Ok(())
}

/// Borrow a descriptor owned by a live Python socket object without taking ownership.
fn with_borrowed<T>(fd: i32, f: impl FnOnce(&Socket) -> Result<T>) -> Result<T> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    if fd < 0 {
        return Err(Error::Invalid(format!("invalid file descriptor {fd}")));
    }
    // SAFETY: the caller's socket object owns `fd` for the duration of this call; ownership is
    // handed back with `into_raw_fd` below, so the descriptor is never closed here.
    let sock = std::mem::ManuallyDrop::new(unsafe { Socket::from_raw_fd(fd) });
    let out = f(&sock);
    let _ = std::mem::ManuallyDrop::into_inner(sock).into_raw_fd();
    out
}

/// Native entry point: configure and bind the socket behind `fd` (owned by the caller, who closes it
/// on error).
#[pyfunction]
#[pyo3(signature = (fd, family, sotype, ip, port, scope_id, flags, backlog, multicast_group=None))]
#[allow(clippy::too_many_arguments)]
pub fn bind_socket(
    fd: i32,
    family: i32,
    sotype: i32,
    ip: &str,
    port: u16,
    scope_id: u32,
    flags: u32,
    backlog: i32,
    multicast_group: Option<&str>,
) -> PyResult<()> {
    let req = Request { family, sotype, ip, port, scope_id, flags, backlog, multicast_group };
    with_borrowed(fd, |sock| configure(sock, &req))?;
    Ok(())
}

/// Bind a throw-away socket (never listening) with `flags` and report the result: 0, or the errno of the
/// refusal. In the network namespace at `netns` when given (a short-lived thread joins it).
#[pyfunction]
#[pyo3(signature = (family, sotype, ip, port, flags, netns=None))]
pub fn probe_bind(
    py: Python<'_>,
    family: i32,
    sotype: i32,
    ip: String,
    port: u16,
    flags: u32,
    netns: Option<String>,
) -> PyResult<i32> {
    let outcome = py.detach(move || {
        crate::netns::run(netns, move || {
            let sock = socket2::Socket::new(socket2::Domain::from(family), socket2::Type::from(sotype).cloexec(), None)
                .map_err(|e| Error::os(e, "socket"))?;
            let req = Request { family, sotype, ip: &ip, port, scope_id: 0, flags, backlog: -1, multicast_group: None };
            Ok(match configure(&sock, &req) {
                Ok(()) => 0,
                Err(Error::Os { errno, .. }) => errno,
                Err(other) => return Err(other),
            })
        })
    })?;
    Ok(outcome)
}

/// Apply reuse flags to a socket that is not bound yet.
/// Raises ValueError naming the address when the socket is already bound.
#[pyfunction]
pub fn make_reusable(fd: i32, flags: u32) -> PyResult<()> {
    with_borrowed(fd, |sock| {
        let local = sock.local_addr().map_err(|e| Error::os(e, "getsockname"))?;
        let Some(addr) = local.as_socket() else {
            return Err(Error::Invalid("sock must be an AF_INET or AF_INET6 socket".into()));
        };
        if addr.port() != 0 {
            return Err(Error::Invalid(format!(
                "sock is already bound to {addr}: reuse options must be set before bind() to have any effect \
                 (set them first, then bind)"
            )));
        }
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        apply_flags(sock, family, flags)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ip: &str, flags: u32, backlog: i32) -> Request<'_> {
        Request {
            family: libc::AF_INET,
            sotype: libc::SOCK_STREAM,
            ip,
            port: 0,
            scope_id: 0,
            flags,
            backlog,
            multicast_group: None,
        }
    }

    fn open(r: &Request<'_>) -> Result<Socket> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(|e| Error::os(e, "socket"))?;
        configure(&sock, r)?;
        Ok(sock)
    }

    #[test]
    fn rejects_bad_addresses() {
        for ip in ["", "nope", "1.2.3", "::1", "256.0.0.1"] {
            assert!(matches!(open(&req(ip, 0, -1)), Err(Error::Invalid(_))), "{ip}");
        }
    }

    #[test]
    fn rejects_unknown_flags_and_families() {
        assert!(matches!(open(&req("127.0.0.1", 1 << 20, -1)), Err(Error::Invalid(_))));
        let mut r = req("127.0.0.1", 0, -1);
        r.family = 12345;
        assert!(matches!(open(&r), Err(Error::Invalid(_))));
        r.family = libc::AF_INET;
        r.sotype = 999;
        assert!(matches!(open(&r), Err(Error::Invalid(_))));
        r.sotype = libc::SOCK_DGRAM;
        r.backlog = 5;
        assert!(matches!(open(&r), Err(Error::Invalid(_))));
    }

    #[test]
    fn binds_with_reuseaddr() {
        let s = open(&req("127.0.0.1", REUSE_ADDR, 8)).expect("bind on loopback");
        assert!(s.reuse_address().expect("getsockopt"));
        let local = s.local_addr().expect("getsockname").as_socket().expect("inet");
        assert_ne!(local.port(), 0);
    }

    #[test]
    fn unbound_socket_when_asked() {
        let s = open(&req("", NO_BIND, -1)).expect("socket");
        let local = s.local_addr().expect("getsockname").as_socket().expect("inet");
        assert_eq!(local.port(), 0);
    }

    #[test]
    fn borrowed_descriptor_stays_open() {
        use std::os::fd::AsRawFd;
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
        let fd = s.as_raw_fd();
        with_borrowed(fd, |b| apply_flags(b, libc::AF_INET, REUSE_PORT)).expect("flags");
        assert!(s.reuse_port().expect("still open"));
        assert!(matches!(with_borrowed(-1, |_| Ok(())), Err(Error::Invalid(_))));
    }
}
