//! NETLINK_SOCK_DIAG: dump requests (with inet_diag bytecode), the reply decoder, and the socket.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::{AF_INET, Filter, Proto, Query, Record};
use crate::errors::{Error, Result};

const NETLINK_SOCK_DIAG: i32 = 4;
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The original inet_diag request (TCPDIAG_GETSOCK): its dumps cover both families in one walk.
pub const TCPDIAG_GETSOCK: u16 = 18;
/// `family` value asking for that one-walk dump of both TCP families.
pub const BOTH: u8 = libc::AF_UNSPEC as u8;
const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
/// Set by the kernel on dump messages when the table changed during the walk.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_HDRLEN: usize = 16;
pub const DIAG_MSG_LEN: usize = 72;
/// INET_DIAG_SKV6ONLY: a u8 attribute the kernel adds to IPv6 sockets in LISTEN or CLOSE.
const INET_DIAG_SKV6ONLY: u16 = 11;
/// Netlink dump datagrams are at most 32 KiB (the kernel caps its dump allocations there).
pub const RECV_BUF: usize = 64 * 1024;
/// No single receive of a dump may wait longer than this; the kernel answers within milliseconds.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

pub(crate) fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn addr16(b: &[u8], at: usize) -> Option<[u8; 16]> {
    b.get(at..at + 16).and_then(|s| s.try_into().ok())
}

// ------------------------------------------------------------------------------------------ requests

pub const BC_S_GE: u8 = 2;
pub const BC_S_LE: u8 = 3;
pub const INET_DIAG_REQ_BYTECODE: u16 = 1;

fn bc_op(out: &mut Vec<u8>, code: u8, yes: u8, no: u16) {
    out.push(code);
    out.push(yes);
    out.extend_from_slice(&no.to_ne_bytes());
}

/// A port comparison (8 bytes) whose failure jumps `no` bytes ahead.
fn bc_cmp(out: &mut Vec<u8>, code: u8, port: u16, no: u16) {
    bc_op(out, code, 8, no);
    bc_op(out, 0, 0, port);
}

/// Bytecode for a filter; empty for `All`. Every `yes` falls through to the next op, as the kernel's
/// audit requires; `no` jumps to a later op, or 4 bytes past the end to reject.
pub fn bytecode(filter: Filter) -> Vec<u8> {
    let mut bc = Vec::new();
    if let Filter::LocalPort(p) = filter {
        bc_cmp(&mut bc, BC_S_GE, p, 16 + 4);
        bc_cmp(&mut bc, BC_S_LE, p, 8 + 4);
    }
    bc
}

/// A dump request's nlmsghdr; its length is fixed up once the message is complete.
fn request_header(kind: u16, seq: u32, capacity: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(capacity);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

/// `struct inet_diag_sockid` matching any socket: ports, addresses and interface 0, no cookie.
fn any_sockid(m: &mut Vec<u8>) {
    m.extend_from_slice(&[0u8; 4 + 32 + 4]); // sport, dport, src, dst, if
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
}

fn set_length(m: &mut [u8]) {
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// The TCPDIAG_GETSOCK dump request (nlmsghdr + struct inet_diag_req): the kernel answers it for
/// both families from a single walk of the established hash (`sdiag_family = AF_UNSPEC`).
pub fn build_both_request(states: u32, seq: u32) -> Vec<u8> {
    let mut m = request_header(TCPDIAG_GETSOCK, seq, NLMSG_HDRLEN + 60);
    m.extend_from_slice(&[AF_INET, 0, 0, 0]); // family (ignored by dumps), src/dst len, ext
    any_sockid(&mut m);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_dbs
    set_length(&mut m);
    m
}

/// The SOCK_DIAG_BY_FAMILY dump request (nlmsghdr + inet_diag_req_v2).
pub fn build_request(family: u8, proto: Proto, states: u32, seq: u32) -> Vec<u8> {
    let ipproto = match proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    };
    let mut m = request_header(SOCK_DIAG_BY_FAMILY, seq, NLMSG_HDRLEN + 56);
    m.extend_from_slice(&[family, ipproto, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    any_sockid(&mut m);
    set_length(&mut m);
    m
}

/// The dump request for `family` (or the one-walk TCP request for `BOTH`), with the filter's bytecode.
pub fn build_filtered_request(family: u8, proto: Proto, states: u32, seq: u32, filter: Filter) -> Vec<u8> {
    let bc = bytecode(filter);
    let mut m = if family == BOTH && proto == Proto::Tcp {
        build_both_request(states, seq)
    } else {
        build_request(family, proto, states, seq)
    };
    if !bc.is_empty() {
        let nla_len = (4 + bc.len()) as u16;
        m.extend_from_slice(&nla_len.to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(&bc);
        set_length(&mut m);
    }
    m
}

// ------------------------------------------------------------------------------------------ replies

/// Decode one `struct inet_diag_msg` and the attributes that follow it.
pub fn decode_diag_msg(p: &[u8]) -> Result<Record> {
    if p.len() < DIAG_MSG_LEN {
        return Err(Error::Malformed(format!("inet_diag_msg of {} bytes (need {DIAG_MSG_LEN})", p.len())));
    }
    let bad = || Error::Malformed("truncated inet_diag_msg".into());
    Ok(Record {
        family: p[0],
        state: p[1],
        timer: p[2],
        retrans: p[3],
        v6only: v6only_attr(&p[DIAG_MSG_LEN..]),
        sport: u16_be(p, 4).ok_or_else(bad)?,
        dport: u16_be(p, 6).ok_or_else(bad)?,
        src: addr16(p, 8).ok_or_else(bad)?,
        dst: addr16(p, 24).ok_or_else(bad)?,
        expires_ms: u32_ne(p, 52).ok_or_else(bad)?,
        uid: u32_ne(p, 64).ok_or_else(bad)?,
        inode: u64::from(u32_ne(p, 68).ok_or_else(bad)?),
    })
}

/// INET_DIAG_SKV6ONLY among the route attributes after the message; None when absent or malformed.
fn v6only_attr(mut attrs: &[u8]) -> Option<bool> {
    while attrs.len() >= 4 {
        let len = usize::from(u16_ne(attrs, 0)?);
        let kind = u16_ne(attrs, 2)?;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_SKV6ONLY {
            return attrs.get(4).map(|&b| b != 0);
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

/// What one received datagram held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// The dump ended (NLMSG_DONE, or an error reply of 0).
    pub done: bool,
    /// A message carried NLM_F_DUMP_INTR: the table changed while the kernel walked it.
    pub interrupted: bool,
}

/// Walk the netlink messages of one datagram, calling `each` with the payload of every diag message.
pub fn walk_messages(buf: &[u8], seq: u32, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<Batch> {
    let mut batch = Batch::default();
    let mut off = 0usize;
    while off < buf.len() {
        let rest = &buf[off..];
        let bad = || Error::Malformed(format!("netlink header truncated ({} bytes)", rest.len()));
        if rest.len() < NLMSG_HDRLEN {
            return Err(bad());
        }
        let len = u32_ne(rest, 0).ok_or_else(bad)? as usize;
        let kind = u16_ne(rest, 4).ok_or_else(bad)?;
        let flags = u16_ne(rest, 6).ok_or_else(bad)?;
        let msg_seq = u32_ne(rest, 8).ok_or_else(bad)?;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(Error::Malformed(format!("netlink message length {len} out of bounds ({} left)", rest.len())));
        }
        if msg_seq != seq {
            return Err(Error::Malformed(format!("netlink reply for sequence {msg_seq}, expected {seq}")));
        }
        batch.interrupted |= flags & NLM_F_DUMP_INTR != 0;
        let payload = &rest[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => {
                batch.done = true;
                return Ok(batch);
            }
            NLMSG_ERROR => {
                let code = u32_ne(payload, 0).map(|v| v as i32).ok_or_else(bad)?;
                if code == 0 {
                    batch.done = true;
                    return Ok(batch);
                }
                return Err(Error::Os { errno: code.saturating_neg(), what: "sock_diag dump".into() });
            }
            // Replies carry the request's type: SOCK_DIAG_BY_FAMILY, or TCPDIAG_GETSOCK for one-walk dumps.
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => each(payload)?,
            _ => {} // e.g. NLMSG_NOOP: ignore
        }
        // NLMSG_ALIGN(len), clamped to the buffer.
        off = off.saturating_add((len + 3) & !3);
    }
    Ok(batch)
}

// ------------------------------------------------------------------------------------------ socket

static SEQ: AtomicU32 = AtomicU32::new(1);

fn open_socket(timeout: Duration) -> Result<Socket> {
    let sock =
        Socket::new(Domain::from(libc::AF_NETLINK), Type::DGRAM.cloexec(), Some(Protocol::from(NETLINK_SOCK_DIAG)))
            .map_err(|e| Error::os(e, "socket(AF_NETLINK, NETLINK_SOCK_DIAG)"))?;
    // A larger buffer only saves wake-ups; a refusal is harmless.
    let _ = sock.set_recv_buffer_size(1 << 20);
    sock.set_read_timeout(Some(timeout)).map_err(|e| Error::os(e, "setsockopt(SO_RCVTIMEO)"))?;
    Ok(sock)
}

/// Send the dump request of `family` and hand every received datagram (with the request's sequence
/// number) to `on_datagram`, until it reports the end of the dump. `on_datagram` may take the buffer
/// (a new one is allocated then) to pass it on without a copy.
pub fn recv_loop(family: u8, q: &Query, on_datagram: impl FnMut(&mut Vec<u8>, u32) -> Result<Batch>) -> Result<()> {
    let sock = open_socket(RECV_TIMEOUT)?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let req = build_filtered_request(family, q.proto, q.kernel_states, seq, q.filter);
    // Unaddressed, a netlink datagram goes to the kernel (port id 0).
    sock.send(&req).map_err(|e| Error::os(e, "send(sock_diag request)"))?;
    receive(&sock, seq, on_datagram)
}

/// Receive the datagrams of one dump until `on_datagram` reports its end. Every receive is bounded by
/// the socket's timeout: a dump whose end never comes is an ETIMEDOUT error, not a hang.
fn receive(sock: &Socket, seq: u32, mut on_datagram: impl FnMut(&mut Vec<u8>, u32) -> Result<Batch>) -> Result<()> {
    let timeout = sock.read_timeout().ok().flatten().unwrap_or(RECV_TIMEOUT);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() < RECV_BUF {
            buf = Vec::with_capacity(RECV_BUF); // first datagram, or a callback that took the buffer
        }
        buf.clear();
        let spare: &mut [MaybeUninit<u8>] = &mut buf.spare_capacity_mut()[..RECV_BUF];
        let n = match sock.recv(spare) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(Error::Os {
                    errno: libc::ETIMEDOUT,
                    what: format!("sock_diag dump: no reply for {:.1} s", timeout.as_secs_f64()),
                });
            }
            Err(e) => return Err(Error::os(e, "recv(sock_diag)")),
        };
        if n == 0 {
            return Err(Error::Malformed("sock_diag socket closed before NLMSG_DONE".into()));
        }
        // SAFETY: recv initialised the first n bytes of the spare capacity (n <= RECV_BUF). Zeroing
        // 64 KiB per datagram instead would add a memset per ~300 sockets to the hot path.
        unsafe { buf.set_len(n) };
        if on_datagram(&mut buf, seq)?.done {
            return Ok(());
        }
    }
}

/// Count the messages of a dump without decoding them: the kernel's own cost, for benchmarks.
pub fn discard(proto: Proto, states: u32, one_walk: bool) -> Result<u64> {
    let mut count = 0u64;
    let families: &[u8] = if one_walk && proto == Proto::Tcp { &[BOTH] } else { &super::FAMILIES };
    let q = Query::new(proto, states, super::Source::Netlink, Filter::All);
    for &family in families {
        recv_loop(family, &q, |data, seq| {
            walk_messages(data, seq, |_| {
                count += 1;
                Ok(())
            })
        })?;
    }
    Ok(count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::{LISTEN, TIME_WAIT, format_ip};
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_msg() -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = AF_INET;
        p[1] = TIME_WAIT;
        p[2] = 3;
        p[4..6].copy_from_slice(&9600u16.to_be_bytes());
        p[6..8].copy_from_slice(&44900u16.to_be_bytes());
        p[8..12].copy_from_slice(&[127, 0, 0, 1]);
        p[24..28].copy_from_slice(&[127, 0, 0, 1]);
        p[52..56].copy_from_slice(&59600u32.to_ne_bytes());
        p
    }

    pub(crate) fn frame(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn a_dump_whose_end_never_comes_times_out() {
        // No request is sent, so nothing ever arrives: the receive must give up, not block forever.
        let sock = open_socket(Duration::from_millis(200)).expect("netlink socket");
        let started = std::time::Instant::now();
        let err = receive(&sock, 1, |_, _| Ok(Batch::default())).expect_err("nothing to receive");
        assert!(matches!(err, Error::Os { errno: libc::ETIMEDOUT, .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn request_layout() {
        let r = build_request(libc::AF_INET6 as u8, Proto::Tcp, 1 << 6, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_ne(&r, 0), Some(72));
        assert_eq!(u16_ne(&r, 4), Some(20));
        assert_eq!(u16_ne(&r, 6), Some(0x301));
        assert_eq!(u32_ne(&r, 8), Some(7));
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(r[17], 6);
        assert_eq!(u32_ne(&r, 20), Some(0x40));
        assert_eq!(&r[64..72], &[0xff; 8]);
    }

    /// Run bytecode the way the kernel does (inet_diag_bc_run, ports only).
    fn run_bc(bc: &[u8], sport: u16) -> bool {
        let mut len = bc.len() as i64;
        let mut at = 0usize;
        while len > 0 {
            let (code, yes, no) = (bc[at], bc[at + 1] as usize, u16_ne(bc, at + 2).expect("op") as usize);
            let port = u16_ne(bc, at + 6).unwrap_or(0);
            let ok = match code {
                BC_S_GE => sport >= port,
                BC_S_LE => sport <= port,
                _ => panic!("unexpected op {code}"),
            };
            let step = if ok { yes } else { no };
            len -= step as i64;
            at += step;
        }
        len == 0
    }

    /// The kernel's audit: `yes` walks every op in order and `no` lands on an op or just past the end.
    fn audit(bc: &[u8]) -> bool {
        let mut boundaries = vec![0usize];
        let mut at = 0usize;
        while at < bc.len() {
            let yes = bc[at + 1] as usize;
            if yes < 4 || yes % 4 != 0 {
                return false;
            }
            at += yes;
            boundaries.push(at);
        }
        let mut at = 0usize;
        while at < bc.len() {
            let no = u16_ne(bc, at + 2).expect("op") as usize;
            let target = at + no;
            if no % 4 != 0 || (target != bc.len() + 4 && !boundaries.contains(&target)) {
                return false;
            }
            at += bc[at + 1] as usize;
        }
        at == bc.len()
    }

    #[test]
    fn bytecode_filters_select_the_right_sockets() {
        let port = bytecode(Filter::LocalPort(8080));
        assert!(audit(&port));
        assert!(run_bc(&port, 8080));
        assert!(!run_bc(&port, 8079));
        assert!(!run_bc(&port, 8081));
        assert!(bytecode(Filter::All).is_empty());
        let req = build_filtered_request(2, Proto::Tcp, 1, 1, Filter::LocalPort(1));
        assert_eq!(u32_ne(&req, 0), Some(req.len() as u32));
    }

    #[test]
    fn one_walk_request_layout() {
        let r = build_filtered_request(BOTH, Proto::Tcp, 1 << 6, 9, Filter::LocalPort(80));
        assert_eq!(u32_ne(&r, 0), Some(r.len() as u32));
        assert_eq!(u16_ne(&r, 4), Some(TCPDIAG_GETSOCK));
        assert_eq!(u32_ne(&r, 16 + 52), Some(1 << 6), "idiag_states follows the 48-byte sockid");
        assert_eq!(u16_ne(&r, 16 + 60 + 2), Some(INET_DIAG_REQ_BYTECODE));
        // UDP has no one-walk request: BOTH falls back to the v2 layout (which the kernel refuses).
        assert_eq!(u16_ne(&build_filtered_request(BOTH, Proto::Udp, 1, 1, Filter::All), 4), Some(20));
    }

    #[test]
    fn decodes_time_wait_message() {
        let r = decode_diag_msg(&sample_msg()).expect("valid");
        assert_eq!((r.state, r.timer, r.sport, r.dport, r.expires()), (6, 3, 9600, 44900, Some(59600)));
        assert_eq!(format_ip(r.family, &r.src), "127.0.0.1");
        assert_eq!((r.uid, r.inode, r.v6only, r.retrans), (0, 0, None, 0));
        let mut orphan = sample_msg();
        (orphan[1], orphan[2], orphan[3]) = (4, 1, 5); // FIN_WAIT1, retransmit timer, 5 retransmissions
        assert_eq!(decode_diag_msg(&orphan).expect("valid").retrans, 5);
    }

    #[test]
    fn decodes_the_v6only_attribute() {
        let mut p = sample_msg();
        p[0] = libc::AF_INET6 as u8;
        p[1] = LISTEN;
        p.extend_from_slice(&[8, 0, 8, 0, 0, 0, 0, 0]); // INET_DIAG_SHUTDOWN, padded
        p.extend_from_slice(&5u16.to_ne_bytes());
        p.extend_from_slice(&INET_DIAG_SKV6ONLY.to_ne_bytes());
        p.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(decode_diag_msg(&p).expect("valid").v6only, Some(true));
        let n = p.len();
        p[n - 4] = 0;
        assert_eq!(decode_diag_msg(&p).expect("valid").v6only, Some(false));
        p.truncate(n - 6); // attribute cut short: unknown, not an error
        assert_eq!(decode_diag_msg(&p).expect("valid").v6only, None);
    }

    #[test]
    fn walks_messages_until_done() {
        let mut buf = frame(SOCK_DIAG_BY_FAMILY, 2, 5, &sample_msg());
        buf.extend(frame(SOCK_DIAG_BY_FAMILY, 2, 5, &sample_msg()));
        let mut n = 0;
        let batch = walk_messages(&buf, 5, |_| {
            n += 1;
            Ok(())
        })
        .expect("ok");
        assert_eq!((batch.done, batch.interrupted, n), (false, false, 2));
        buf.extend(frame(NLMSG_DONE, 2 | NLM_F_DUMP_INTR, 5, &[0, 0, 0, 0]));
        assert_eq!(walk_messages(&buf, 5, |_| Ok(())).expect("ok"), Batch { done: true, interrupted: true });
        assert!(walk_messages(&buf, 6, |_| Ok(())).is_err(), "wrong sequence");
        let err = frame(NLMSG_ERROR, 0, 5, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(walk_messages(&err, 5, |_| Ok(())), Err(Error::Os { errno, .. }) if errno == libc::EPERM));
    }

    proptest! {
        #[test]
        fn walker_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), seq in any::<u32>()) {
            let _ = walk_messages(&data, seq, |p| decode_diag_msg(p).map(|_| ()));
        }

        #[test]
        fn truncated_frames_are_errors(cut in 0usize..88) {
            let buf = frame(SOCK_DIAG_BY_FAMILY, 2, 1, &sample_msg());
            let short = &buf[..cut.min(buf.len())];
            let r = walk_messages(short, 1, |p| decode_diag_msg(p).map(|_| ()));
            prop_assert!(short.is_empty() || r.is_err());
        }

        #[test]
        fn mutated_frames_never_panic(pos in 0usize..120, byte in any::<u8>(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut msg = sample_msg();
            msg.extend(tail);
            let mut buf = frame(SOCK_DIAG_BY_FAMILY, 2, 1, &msg);
            if let Some(b) = buf.get_mut(pos) { *b = byte; }
            let _ = walk_messages(&buf, 1, |p| decode_diag_msg(p).map(|_| ()));
        }
    }
}
