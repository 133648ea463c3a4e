//! The socket table: NETLINK_SOCK_DIAG dumps (what `ss` uses), a /proc/net fallback giving the
//! same records, streaming aggregation, and the inode -> process mapping behind `who_holds`.
//!
//! Parsers are pure functions over byte slices / strings that return errors on malformed input;
//! they never index out of bounds.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};

use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::{Error, Result};

pub const TIME_WAIT: u8 = 6;
pub const LISTEN: u8 = 10;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The original inet_diag request (TCPDIAG_GETSOCK): its dumps cover both families in one walk.
const TCPDIAG_GETSOCK: u16 = 18;
/// `family` value asking for that one-walk dump of both TCP families.
pub const BOTH: u8 = libc::AF_UNSPEC as u8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const DIAG_MSG_LEN: usize = 72;
/// Netlink dump datagrams are at most 32 KiB (the kernel caps its dump allocations there).
const RECV_BUF: usize = 64 * 1024;

/// One socket as the kernel reports it. Addresses are raw network-order bytes (IPv4 in the first 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Record {
    pub family: u8,
    pub state: u8,
    pub timer: u8,
    pub src: [u8; 16],
    pub sport: u16,
    pub dst: [u8; 16],
    pub dport: u16,
    /// Remaining timer in ms; meaningful only when `timer != 0`.
    pub expires_ms: u32,
    pub uid: u32,
    pub inode: u64,
}

impl Record {
    pub fn expires(&self) -> Option<u32> {
        (self.timer != 0).then_some(self.expires_ms)
    }
}

pub fn format_addr(family: u8, addr: &[u8; 16]) -> String {
    if i32::from(family) == libc::AF_INET {
        Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    } else {
        Ipv6Addr::from(*addr).to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(Error::Invalid(format!("protocol must be 'tcp' or 'udp', got {other:?}"))),
        }
    }

    fn ipproto(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    fn proc_name(self, family: u8) -> &'static str {
        match (self, i32::from(family) == libc::AF_INET) {
            (Proto::Tcp, true) => "/proc/net/tcp",
            (Proto::Tcp, false) => "/proc/net/tcp6",
            (Proto::Udp, true) => "/proc/net/udp",
            (Proto::Udp, false) => "/proc/net/udp6",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Auto,
    Netlink,
    Proc,
}

impl Source {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Source::Auto),
            "netlink" => Ok(Source::Netlink),
            "proc" => Ok(Source::Proc),
            other => Err(Error::Invalid(format!("source must be 'auto', 'netlink' or 'proc', got {other:?}"))),
        }
    }
}

// ------------------------------------------------------------------------------------------ netlink

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn addr16(b: &[u8], at: usize) -> Option<[u8; 16]> {
    let s = b.get(at..at + 16)?;
    let mut out = [0u8; 16];
    out.copy_from_slice(s);
    Some(out)
}

/// A kernel-side filter, compiled to inet_diag bytecode (so filtered-out sockets cost no copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    /// Local port equals this.
    LocalPort(u16),
}

const BC_S_GE: u8 = 2;
const BC_S_LE: u8 = 3;
const INET_DIAG_REQ_BYTECODE: u16 = 1;

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
    match filter {
        Filter::All => {}
        Filter::LocalPort(p) => {
            bc_cmp(&mut bc, BC_S_GE, p, 16 + 4);
            bc_cmp(&mut bc, BC_S_LE, p, 8 + 4);
        }
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

/// Build the TCPDIAG_GETSOCK dump request (nlmsghdr + struct inet_diag_req): the kernel answers it
/// for both families from a single walk of the established hash (`sdiag_family = AF_UNSPEC`).
pub fn build_both_request(states: u32, seq: u32) -> Vec<u8> {
    let mut m = request_header(TCPDIAG_GETSOCK, seq, NLMSG_HDRLEN + 60);
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]); // family (ignored by dumps), src/dst len, ext
    any_sockid(&mut m);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_dbs
    set_length(&mut m);
    m
}

/// Build the dump request (nlmsghdr + inet_diag_req_v2, or the one-walk TCP request for `BOTH`),
/// with the filter's bytecode attached.
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

/// Build the SOCK_DIAG_BY_FAMILY dump request (nlmsghdr + inet_diag_req_v2).
pub fn build_request(family: u8, proto: Proto, states: u32, seq: u32) -> Vec<u8> {
    let mut m = request_header(SOCK_DIAG_BY_FAMILY, seq, NLMSG_HDRLEN + 56);
    m.extend_from_slice(&[family, proto.ipproto(), 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    any_sockid(&mut m);
    set_length(&mut m);
    m
}

/// Decode the fixed part of one `struct inet_diag_msg`.
pub fn decode_diag_msg(p: &[u8]) -> Result<Record> {
    if p.len() < DIAG_MSG_LEN {
        return Err(Error::Malformed(format!("inet_diag_msg of {} bytes (need {DIAG_MSG_LEN})", p.len())));
    }
    let bad = || Error::Malformed("truncated inet_diag_msg".into());
    Ok(Record {
        family: p[0],
        state: p[1],
        timer: p[2],
        sport: u16_be(p, 4).ok_or_else(bad)?,
        dport: u16_be(p, 6).ok_or_else(bad)?,
        src: addr16(p, 8).ok_or_else(bad)?,
        dst: addr16(p, 24).ok_or_else(bad)?,
        expires_ms: u32_ne(p, 52).ok_or_else(bad)?,
        uid: u32_ne(p, 64).ok_or_else(bad)?,
        inode: u64::from(u32_ne(p, 68).ok_or_else(bad)?),
    })
}

/// What one received datagram held.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    More,
    Done,
}

/// Walk the netlink messages of one datagram, calling `each` with the payload of every diag message.
pub fn walk_messages(buf: &[u8], seq: u32, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<Batch> {
    let mut off = 0usize;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(Error::Malformed(format!("netlink header truncated ({} bytes)", rest.len())));
        }
        let bad = || Error::Malformed("netlink header truncated".into());
        let len = u32_ne(rest, 0).ok_or_else(bad)? as usize;
        let kind = u16_ne(rest, 4).ok_or_else(bad)?;
        let msg_seq = u32_ne(rest, 8).ok_or_else(bad)?;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(Error::Malformed(format!("netlink message length {len} out of bounds ({} left)", rest.len())));
        }
        if msg_seq != seq {
            return Err(Error::Malformed(format!("netlink reply for sequence {msg_seq}, expected {seq}")));
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(Batch::Done),
            NLMSG_ERROR => {
                let code = u32_ne(payload, 0).map(|v| v as i32).ok_or_else(bad)?;
                if code == 0 {
                    return Ok(Batch::Done);
                }
                return Err(Error::Os { errno: -code, what: "sock_diag dump".into() });
            }
            // Replies carry the request's type: SOCK_DIAG_BY_FAMILY, or TCPDIAG_GETSOCK for one-walk dumps.
            SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => each(payload)?,
            _ => {} // e.g. NLMSG_NOOP: ignore
        }
        // NLMSG_ALIGN(len), clamped to the buffer.
        off = off.saturating_add((len + 3) & !3);
    }
    Ok(Batch::More)
}

struct NetlinkSocket(i32);

impl Drop for NetlinkSocket {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor and close it exactly once.
        unsafe { libc::close(self.0) };
    }
}

fn open_netlink() -> Result<NetlinkSocket> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(Error::last_os("socket(AF_NETLINK, NETLINK_SOCK_DIAG)"));
    }
    let sock = NetlinkSocket(fd);
    let size: libc::c_int = 1 << 20;
    // SAFETY: valid fd, option value is a c_int on the stack. A failure only means a smaller buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(sock)
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Dump one family over netlink, handing each raw diag payload to `each`.
fn netlink_dump_raw(
    family: u8,
    proto: Proto,
    states: u32,
    filter: Filter,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    netlink_recv_loop(family, proto, states, filter, |data, seq| walk_messages(data, seq, &mut each))
}

/// Send the dump request and hand every received datagram (with the request's sequence number) to
/// `on_batch`, until it reports the end of the dump. `on_batch` may take the buffer (a new one is
/// allocated then) to pass it on without a copy.
fn netlink_recv_loop(
    family: u8,
    proto: Proto,
    states: u32,
    filter: Filter,
    mut on_batch: impl FnMut(&mut Vec<u8>, u32) -> Result<Batch>,
) -> Result<()> {
    let sock = open_netlink()?;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let req = build_filtered_request(family, proto, states, seq, filter);
    // SAFETY: sockaddr_nl is plain data; zeroed means "the kernel".
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: buffer and address are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(
            sock.0,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(Error::last_os("sendto(sock_diag request)"));
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() < RECV_BUF {
            buf = Vec::with_capacity(RECV_BUF); // the previous one was handed on by `on_batch`
        }
        // SAFETY: the spare capacity is valid for RECV_BUF bytes; recv writes at most that many.
        let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr().cast(), RECV_BUF, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::os(err, "recv(sock_diag)"));
        }
        if n == 0 {
            return Err(Error::Malformed("sock_diag socket closed before NLMSG_DONE".into()));
        }
        // SAFETY: the kernel initialised the first n bytes (n <= RECV_BUF <= capacity).
        unsafe { buf.set_len(n as usize) };
        if on_batch(&mut buf, seq)? == Batch::Done {
            return Ok(());
        }
    }
}

/// Count the messages of a dump without decoding them: the kernel's own cost, for benchmarks.
pub fn netlink_discard(proto: Proto, states: u32, one_walk: bool) -> Result<u64> {
    let mut count = 0u64;
    let families: &[u8] = if one_walk && proto == Proto::Tcp { &[BOTH] } else { &FAMILIES };
    for &family in families {
        netlink_dump_raw(family, proto, states, Filter::All, |_| {
            count += 1;
            Ok(())
        })?;
    }
    Ok(count)
}

// ------------------------------------------------------------------------------------------ /proc

fn hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_proc_addr(field: &str, family: u8) -> Option<([u8; 16], u16)> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    let words = if i32::from(family) == libc::AF_INET { 1 } else { 4 };
    if ip.len() != words * 8 || !ip.is_ascii() {
        return None;
    }
    for w in 0..words {
        // Each 32-bit word is printed with %08X as a native integer.
        let v = hex_u32(ip.get(w * 8..w * 8 + 8)?)?;
        out[w * 4..w * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    Some((out, port))
}

/// Parse one data line of /proc/net/{tcp,tcp6,udp,udp6}.
pub fn parse_proc_line(line: &str, family: u8) -> Result<Record> {
    let bad =
        || Error::Malformed(format!("unexpected /proc/net line: {:?}", line.chars().take(160).collect::<String>()));
    let mut it = line.split_ascii_whitespace();
    let _sl = it.next().ok_or_else(bad)?;
    let (src, sport) = parse_proc_addr(it.next().ok_or_else(bad)?, family).ok_or_else(bad)?;
    let (dst, dport) = parse_proc_addr(it.next().ok_or_else(bad)?, family).ok_or_else(bad)?;
    let state = u8::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    let _queues = it.next().ok_or_else(bad)?;
    let (tr, when) = it.next().ok_or_else(bad)?.split_once(':').ok_or_else(bad)?;
    let timer = u8::from_str_radix(tr, 16).map_err(|_| bad())?;
    // tm->when is in USER_HZ (1/100 s) ticks; it can be negative-looking for expired timers.
    let ticks = u64::from_str_radix(when, 16).map_err(|_| bad())?;
    let _retrnsmt = it.next().ok_or_else(bad)?;
    let uid = it.next().ok_or_else(bad)?.parse::<u32>().map_err(|_| bad())?;
    let _timeout = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?.parse::<u64>().map_err(|_| bad())?;
    let expires_ms = if ticks > u64::from(u32::MAX) / 10 { 0 } else { (ticks * 10) as u32 };
    Ok(Record { family, state, timer, src, sport, dst, dport, expires_ms, uid, inode })
}

fn matches(filter: Filter, r: &Record) -> bool {
    match filter {
        Filter::All => true,
        Filter::LocalPort(p) => r.sport == p,
    }
}

fn proc_dump(family: u8, proto: Proto, states: u32, filter: Filter, each: &mut impl FnMut(&Record)) -> Result<()> {
    let path = proto.proc_name(family);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // No IPv6 (or no UDP) in this kernel: nothing to report for that family.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::os(e, format!("read {path}"))),
    };
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let rec = parse_proc_line(line, family)?;
        if rec.state < 32 && states & (1 << rec.state) != 0 && matches(filter, &rec) {
            each(&rec);
        }
    }
    Ok(())
}

fn netlink_refused(e: &Error) -> bool {
    matches!(e, Error::Os { errno, .. }
        if [libc::EPERM, libc::EACCES, libc::EPROTONOSUPPORT, libc::EAFNOSUPPORT, libc::ENOENT, libc::EOPNOTSUPP]
            .contains(errno))
}

const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// What a producer thread hands to the consumer: raw netlink datagrams, or parsed /proc records.
enum Chunk {
    /// Several datagrams at a time: each hand-off wakes the consumer, so fewer are cheaper.
    Netlink {
        seq: u32,
        data: Vec<Vec<u8>>,
    },
    Records(Vec<Record>),
}

/// Chunks in flight between the kernel-facing threads and the consumer; bounds memory (a few
/// datagrams of at most 32 KiB each) whatever the size of the table.
const CHANNEL_DEPTH: usize = 4;
/// Datagrams (at most 32 KiB each) per hand-off.
const DATAGRAMS_PER_CHUNK: usize = 8;

/// One family, as chunks sent to `tx` (netlink datagrams are checked before they are sent, so a
/// refusal is seen before anything reached the consumer and can fall back to /proc).
fn produce_family(
    family: u8,
    proto: Proto,
    states: u32,
    source: Source,
    filter: Filter,
    tx: &std::sync::mpsc::SyncSender<Chunk>,
) -> Result<()> {
    let from_proc = || -> Result<()> {
        let mut records = Vec::new();
        proc_dump(family, proto, states, filter, &mut |r| records.push(*r))?;
        // A closed channel means the consumer stopped (after an error it reports itself).
        let _ = tx.send(Chunk::Records(records));
        Ok(())
    };
    let from_netlink = || {
        let mut pending: Vec<Vec<u8>> = Vec::new();
        netlink_recv_loop(family, proto, states, filter, |data, seq| {
            let batch = walk_messages(data, seq, |_| Ok(()))?;
            pending.push(std::mem::take(data));
            if (pending.len() >= DATAGRAMS_PER_CHUNK || batch == Batch::Done)
                && tx.send(Chunk::Netlink { seq, data: std::mem::take(&mut pending) }).is_err()
            {
                return Ok(Batch::Done);
            }
            Ok(batch)
        })
    };
    match source {
        _ if family == BOTH => from_netlink(), // its caller falls back to per-family dumps
        Source::Proc => from_proc(),
        Source::Netlink => from_netlink(),
        Source::Auto => match from_netlink() {
            Err(e) if netlink_refused(&e) => from_proc(),
            other => other,
        },
    }
}

/// Stream both families through `each`. Every sock_diag dump walks the whole established hash
/// (shared by both families) and the walk, not the copy, dominates its cost; so TCP uses the one
/// request that covers both families in a single walk, on its own thread while the calling thread
/// decodes and aggregates. Where the kernel refuses that request, and for UDP, one dump per family
/// runs, each on its own thread.
pub fn stream(proto: Proto, states: u32, source: Source, filter: Filter, mut each: impl FnMut(&Record)) -> Result<()> {
    if proto == Proto::Tcp && source != Source::Proc {
        let mut delivered = false;
        let one_walk = stream_families(&[BOTH], proto, states, source, filter, |r| {
            delivered = true;
            each(r);
        });
        match one_walk {
            Err(Error::Os { .. }) if !delivered => {} // not offered by this kernel: per-family dumps
            other => return other,
        }
    }
    stream_families(&FAMILIES, proto, states, source, filter, each)
}

/// Dump `families` (one producer thread each), decoding in the calling thread.
fn stream_families(
    families: &[u8],
    proto: Proto,
    states: u32,
    source: Source,
    filter: Filter,
    mut each: impl FnMut(&Record),
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(CHANNEL_DEPTH);
    std::thread::scope(|scope| {
        let producers: Vec<_> = families
            .iter()
            .map(|&family| {
                let tx = tx.clone();
                scope.spawn(move || produce_family(family, proto, states, source, filter, &tx))
            })
            .collect();
        drop(tx);
        let mut consumed: Result<()> = Ok(());
        for chunk in rx.iter() {
            if consumed.is_err() {
                continue; // keep draining so that no producer blocks
            }
            consumed = match chunk {
                Chunk::Netlink { seq, data } => data.iter().try_for_each(|datagram| {
                    walk_messages(datagram, seq, |payload| {
                        let rec = decode_diag_msg(payload)?;
                        if rec.state < 32 && states & (1 << rec.state) != 0 && matches(filter, &rec) {
                            each(&rec);
                        }
                        Ok(())
                    })
                    .map(|_| ())
                }),
                Chunk::Records(records) => {
                    records.iter().for_each(&mut each);
                    Ok(())
                }
            };
        }
        for p in producers {
            p.join().unwrap_or_else(|_| Err(Error::Malformed("dump thread panicked".into())))?;
        }
        consumed
    })
}

// ------------------------------------------------------------------------------------------ aggregation

/// A small multiplicative hasher for the aggregation maps: their keys are a few integers and bytes
/// chosen by the kernel, not by an attacker who could aim for collisions, and SipHash would cost more
/// than the rest of the per-socket work.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_ne_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Counts gathered while the dump streams; memory grows with distinct keys only.
#[derive(Default, Debug)]
pub struct Summary {
    pub total: u64,
    pub by_state: [u64; 32],
    pub local_ports: FastMap<(u8, u16), u64>,
    pub remotes: FastMap<(u8, u8, [u8; 16], u16), u64>,
    /// TIME-WAIT remaining time in 10 s buckets: 0-10, ..., 50-60, >= 60 s.
    pub tw_hist: [u64; 7],
}

impl Summary {
    pub fn add(&mut self, r: &Record) {
        self.total += 1;
        if let Some(slot) = self.by_state.get_mut(usize::from(r.state)) {
            *slot += 1;
        }
        *self.local_ports.entry((r.state, r.sport)).or_insert(0) += 1;
        if r.dport != 0 || r.dst != [0; 16] {
            *self.remotes.entry((r.state, r.family, r.dst, r.dport)).or_insert(0) += 1;
        }
        if r.state == TIME_WAIT {
            let bucket = (r.expires_ms / 10_000).min(6) as usize;
            self.tw_hist[bucket] += 1;
        }
    }
}

fn top_n<K: Copy + Ord>(map: &FastMap<K, u64>, state_of: impl Fn(&K) -> u8, n: usize) -> Vec<(K, u64)> {
    let mut per_state: HashMap<u8, Vec<(K, u64)>> = HashMap::new();
    for (k, v) in map {
        per_state.entry(state_of(k)).or_default().push((*k, *v));
    }
    let mut out = Vec::new();
    let mut states: Vec<u8> = per_state.keys().copied().collect();
    states.sort_unstable();
    for s in states {
        if let Some(mut items) = per_state.remove(&s) {
            items.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            items.truncate(n);
            out.extend(items);
        }
    }
    out
}

/// Per-destination use of ephemeral ports: key (family, local ip, remote ip, remote port).
pub type UsageKey = (u8, [u8; 16], [u8; 16], u16);

pub fn ephemeral_counts(
    proto: Proto,
    lo: u16,
    hi: u16,
    reserved: &[(u16, u16)],
    source: Source,
) -> Result<FastMap<UsageKey, (u64, u64)>> {
    let mut map: FastMap<UsageKey, (u64, u64)> = FastMap::default();
    // Connections accepted by a listener share its port and consume no ephemeral port.
    let mut listening: HashSet<u16> = HashSet::new();
    stream(proto, 1 << LISTEN, source, Filter::All, |r| {
        listening.insert(r.sport);
    })?;
    let states = !(1u32 << LISTEN);
    stream(proto, states, source, Filter::All, |r| {
        if r.sport < lo || r.sport > hi || r.dport == 0 || listening.contains(&r.sport) {
            return;
        }
        if reserved.iter().any(|&(a, b)| a <= r.sport && r.sport <= b) {
            return;
        }
        let e = map.entry((r.family, r.src, r.dst, r.dport)).or_insert((0, 0));
        if r.state == TIME_WAIT {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    })?;
    Ok(map)
}

// ------------------------------------------------------------------------------------------ owners

/// Parse the target of a /proc/PID/fd symlink: `socket:[INODE]`.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let inner = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if inner.is_empty() || inner.len() > 20 || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Map socket inodes to the pids holding them, scanning /proc only until every inode is found.
/// Returns the pairs found and how many processes could not be inspected (permission).
pub fn owners(inodes: &[u64]) -> Result<(Vec<(u64, u32)>, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut wanted: HashSet<u64> = inodes.iter().copied().filter(|&i| i != 0).collect();
    let mut found = Vec::new();
    let mut denied = 0u64;
    if wanted.is_empty() {
        return Ok((found, denied));
    }
    let procs = std::fs::read_dir("/proc").map_err(|e| Error::os(e, "read /proc"))?;
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = std::str::from_utf8(name.as_bytes()).ok().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                denied += 1;
                continue;
            }
            Err(_) => continue, // the process exited meanwhile
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if let Some(inode) = socket_inode(target.as_os_str().as_bytes())
                && wanted.remove(&inode)
            {
                found.push((inode, pid));
            }
        }
        if wanted.is_empty() {
            break;
        }
    }
    Ok((found, denied))
}

// ------------------------------------------------------------------------------------------ Python

/// Sockets of `proto` in `states` (bitmask, bit n = state n), optionally only local `port`, built
/// directly as the final Python objects (the hot path of `twfix.sockets()`): `entry_cls(family, state, addr_cls(ip, port), addr_cls(ip, port) | None, uid,
/// inode, expires_s | None)`, created with `tuple.__new__` as NamedTuple classes allow. Address strings
/// and address objects repeat a lot in real tables and are shared instead of rebuilt.
#[pyfunction]
#[pyo3(signature = (proto, states, port, source, entry_cls, addr_cls, families, state_objs))]
#[allow(clippy::too_many_arguments)]
pub fn dump_entries<'py>(
    py: Python<'py>,
    proto: &str,
    states: u32,
    port: Option<u16>,
    source: &str,
    entry_cls: &Bound<'py, PyAny>,
    addr_cls: &Bound<'py, PyAny>,
    families: Vec<Bound<'py, PyAny>>,
    state_objs: Vec<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyList>> {
    use pyo3::types::{PyFloat, PyString, PyTuple};
    let proto = Proto::parse(proto)?;
    let source = Source::parse(source)?;
    if families.len() != 2 || state_objs.len() != 14 {
        return Err(
            Error::Invalid("families must hold 2 objects (AF_INET, AF_INET6), state_objs 14 (0..13)".into()).into()
        );
    }
    let filter = port.map_or(Filter::All, Filter::LocalPort);
    let records = py.detach(|| {
        let mut records = Vec::new();
        stream(proto, states, source, filter, |r| records.push(*r)).map(|()| records)
    })?;
    let tuple_new = py.get_type::<PyTuple>().getattr("__new__")?;
    let none = py.None().into_bound(py);
    let mut strings: FastMap<(u8, [u8; 16]), Bound<'py, PyString>> = FastMap::default();
    let mut addrs: FastMap<(u8, [u8; 16], u16), Bound<'py, PyAny>> = FastMap::default();
    const CACHE_LIMIT: usize = 1 << 16;
    let mut addr_obj = |family: u8, ip: [u8; 16], port: u16| -> PyResult<Bound<'py, PyAny>> {
        if let Some(a) = addrs.get(&(family, ip, port)) {
            return Ok(a.clone());
        }
        let text = match strings.get(&(family, ip)) {
            Some(t) => t.clone(),
            None => {
                let t = PyString::new(py, &format_addr(family, &ip));
                if strings.len() < CACHE_LIMIT {
                    strings.insert((family, ip), t.clone());
                }
                t
            }
        };
        let pair = PyTuple::new(py, [text.into_any(), port.into_pyobject(py)?.into_any()])?;
        let obj = tuple_new.call1((addr_cls, pair))?;
        if addrs.len() < CACHE_LIMIT {
            addrs.insert((family, ip, port), obj.clone());
        }
        Ok(obj)
    };
    let list = PyList::empty(py);
    for r in &records {
        let family = if i32::from(r.family) == libc::AF_INET { &families[0] } else { &families[1] };
        let state = state_objs.get(usize::from(r.state)).unwrap_or(&state_objs[7]);
        let laddr = addr_obj(r.family, r.src, r.sport)?;
        let raddr = if r.dport != 0 { addr_obj(r.family, r.dst, r.dport)? } else { none.clone() };
        let expires = match r.expires() {
            Some(ms) => PyFloat::new(py, f64::from(ms) / 1000.0).into_any(),
            None => none.clone(),
        };
        let fields = PyTuple::new(
            py,
            [
                family.clone(),
                state.clone(),
                laddr,
                raddr,
                r.uid.into_pyobject(py)?.into_any(),
                r.inode.into_pyobject(py)?.into_any(),
                expires,
            ],
        )?;
        list.append(tuple_new.call1((entry_cls, fields))?)?;
    }
    Ok(list)
}

pub type PySummary = (u64, Vec<(u8, u64)>, Vec<(u8, u16, u64)>, Vec<(u8, u8, String, u16, u64)>, Vec<u64>);

/// Aggregate while the dump streams: (total, per-state counts, top local ports per state,
/// top remote endpoints per state, TIME-WAIT remaining-time histogram in 10 s buckets).
#[pyfunction]
#[pyo3(signature = (proto, states, top, source="auto"))]
pub fn summarize(py: Python<'_>, proto: &str, states: u32, top: usize, source: &str) -> PyResult<PySummary> {
    let proto = Proto::parse(proto)?;
    let source = Source::parse(source)?;
    let summary = py.detach(|| -> Result<Summary> {
        let mut total = Summary::default();
        stream(proto, states, source, Filter::All, |r| total.add(r))?;
        Ok(total)
    })?;
    let counts = summary.by_state.iter().enumerate().filter(|(_, c)| **c > 0).map(|(s, c)| (s as u8, *c)).collect();
    let ports = top_n(&summary.local_ports, |k| k.0, top).into_iter().map(|((s, p), c)| (s, p, c)).collect();
    let remotes = top_n(&summary.remotes, |k| k.0, top)
        .into_iter()
        .map(|((s, f, a, p), c)| (s, f, format_addr(f, &a), p, c))
        .collect();
    Ok((summary.total, counts, ports, remotes, summary.tw_hist.to_vec()))
}

pub type PyUsage = (u8, String, String, u16, u64, u64);

/// Per (local ip, remote ip, remote port): TCP sockets using an ephemeral port (lo..=hi, not
/// reserved) toward it, as (family, local, remote, remote port, in use, in TIME-WAIT).
#[pyfunction]
#[pyo3(signature = (lo, hi, reserved, source="auto"))]
pub fn ephemeral_usage(
    py: Python<'_>,
    lo: u16,
    hi: u16,
    reserved: Vec<(u16, u16)>,
    source: &str,
) -> PyResult<Vec<PyUsage>> {
    let source = Source::parse(source)?;
    let map = py.detach(|| ephemeral_counts(Proto::Tcp, lo, hi, &reserved, source))?;
    let mut out: Vec<PyUsage> = map
        .into_iter()
        .map(|((f, src, dst, dport), (used, tw))| (f, format_addr(f, &src), format_addr(f, &dst), dport, used, tw))
        .collect();
    out.sort_unstable_by(|a, b| (b.4 + b.5).cmp(&(a.4 + a.5)).then_with(|| a.cmp(b)));
    Ok(out)
}

/// ([(inode, pid)], number of processes whose descriptors could not be read).
#[pyfunction]
pub fn socket_owners(py: Python<'_>, inodes: Vec<u64>) -> PyResult<(Vec<(u64, u32)>, u64)> {
    Ok(py.detach(|| owners(&inodes))?)
}

/// A bare dump that only receives and discards: the kernel's own cost, for benchmarks. By default one
/// SOCK_DIAG_BY_FAMILY dump per family (what `ss` does); `one_walk=True` uses the single TCP dump
/// that twfix itself prefers.
#[pyfunction]
#[pyo3(name = "netlink_discard", signature = (proto, states, one_walk=false))]
pub fn py_netlink_discard(py: Python<'_>, proto: &str, states: u32, one_walk: bool) -> PyResult<u64> {
    let proto = Proto::parse(proto)?;
    Ok(py.detach(|| netlink_discard(proto, states, one_walk))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_msg() -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = TIME_WAIT;
        p[2] = 3;
        p[4..6].copy_from_slice(&9600u16.to_be_bytes());
        p[6..8].copy_from_slice(&44900u16.to_be_bytes());
        p[8..12].copy_from_slice(&[127, 0, 0, 1]);
        p[24..28].copy_from_slice(&[127, 0, 0, 1]);
        p[52..56].copy_from_slice(&59600u32.to_ne_bytes());
        p
    }

    fn frame(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
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
    fn run_bc(bc: &[u8], sport: u16, _dport: u16) -> bool {
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
        assert!(run_bc(&port, 8080, 1));
        assert!(!run_bc(&port, 8079, 8080));
        assert!(!run_bc(&port, 8081, 8080));
        assert!(bytecode(Filter::All).is_empty());
        let req = build_filtered_request(2, Proto::Tcp, 1, 1, Filter::LocalPort(1));
        assert_eq!(u32_ne(&req, 0), Some(req.len() as u32));
    }

    #[test]
    fn one_walk_and_per_family_dumps_agree() {
        // A listener of this test process, found through every path (the host's table, read-only).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let port = listener.local_addr().expect("addr").port();
        let find = |families: &[u8], source: Source| {
            let mut found = Vec::new();
            stream_families(families, Proto::Tcp, 1 << LISTEN, source, Filter::LocalPort(port), |r| found.push(*r))
                .expect("dump");
            found
        };
        let one = find(&[BOTH], Source::Netlink);
        assert_eq!(one.len(), 1);
        assert_eq!(one, find(&FAMILIES, Source::Netlink));
        assert_eq!(one[0].sport, port);
        let from_proc = find(&FAMILIES, Source::Proc);
        assert_eq!((from_proc[0].sport, from_proc[0].inode), (port, one[0].inode));
        let mut n = 0;
        stream(Proto::Tcp, 1 << LISTEN, Source::Auto, Filter::LocalPort(port), |_| n += 1).expect("dump");
        assert_eq!(n, 1);
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
        assert_eq!(format_addr(r.family, &r.src), "127.0.0.1");
        assert_eq!((r.uid, r.inode), (0, 0));
    }

    #[test]
    fn walks_messages_until_done() {
        let mut buf = frame(SOCK_DIAG_BY_FAMILY, 5, &sample_msg());
        buf.extend(frame(SOCK_DIAG_BY_FAMILY, 5, &sample_msg()));
        let mut n = 0;
        assert_eq!(
            walk_messages(&buf, 5, |_| {
                n += 1;
                Ok(())
            })
            .expect("ok"),
            Batch::More
        );
        assert_eq!(n, 2);
        buf.extend(frame(NLMSG_DONE, 5, &[0, 0, 0, 0]));
        assert_eq!(walk_messages(&buf, 5, |_| Ok(())).expect("ok"), Batch::Done);
        assert!(walk_messages(&buf, 6, |_| Ok(())).is_err(), "wrong sequence");
        let err = frame(NLMSG_ERROR, 5, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(walk_messages(&err, 5, |_| Ok(())), Err(Error::Os { errno, .. }) if errno == libc::EPERM));
    }

    #[test]
    fn parses_proc_lines() {
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2106446 1 00000000c37c4737 100 0 0 10 0";
        let r = parse_proc_line(listen, libc::AF_INET as u8).expect("listen line");
        assert_eq!((r.state, r.sport, r.inode, r.expires()), (LISTEN, 8080, 2106446, None));
        if cfg!(target_endian = "little") {
            assert_eq!(format_addr(r.family, &r.src), "127.0.0.1");
        }
        let tw = "   1: 0100007F:1F90 0100007F:8182 06 00000000:00000000 03:00001751 00000000     0        0 0 3 00000000d2ec9eb7";
        let r = parse_proc_line(tw, libc::AF_INET as u8).expect("tw line");
        assert_eq!((r.state, r.dport, r.expires()), (TIME_WAIT, 0x8182, Some(59690)));
        let v6 = "   0: 00000000000000000000000001000000:0050 0000000000000000FFFF00000100007F:1234 01 00000000:00000000 00:00000000 00000000  1000        0 42 1 0";
        let r = parse_proc_line(v6, libc::AF_INET6 as u8).expect("v6 line");
        if cfg!(target_endian = "little") {
            assert_eq!(format_addr(r.family, &r.src), "::1");
            assert_eq!(format_addr(r.family, &r.dst), "::ffff:127.0.0.1");
        }
        assert_eq!(r.uid, 1000);
    }

    #[test]
    fn rejects_malformed_proc_lines() {
        for line in ["", "0:", "0: zz:1 00000000:0000 0A", "0: 0100007F:1F90 00000000:0000 0A 0:0 00:0 0 x 0 1"] {
            assert!(parse_proc_line(line, libc::AF_INET as u8).is_err(), "{line:?}");
        }
    }

    #[test]
    fn inode_links() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        for bad in [&b"socket:[]"[..], b"pipe:[1]", b"socket:[1", b"socket:[-1]", b"socket:[99999999999999999999999]"] {
            assert_eq!(socket_inode(bad), None);
        }
    }

    #[test]
    fn summary_counts_and_histogram() {
        let mut s = Summary::default();
        let mut r = decode_diag_msg(&sample_msg()).expect("valid");
        s.add(&r);
        r.expires_ms = 5_000;
        s.add(&r);
        r.state = LISTEN;
        s.add(&r);
        assert_eq!((s.total, s.by_state[6], s.by_state[10]), (3, 2, 1));
        assert_eq!(s.tw_hist, [1, 0, 0, 0, 0, 1, 0]);
        let top = top_n(&s.local_ports, |k| k.0, 5);
        assert_eq!(top, vec![((6, 9600), 2), ((10, 9600), 1)]);
    }

    proptest! {
        #[test]
        fn walker_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), seq in any::<u32>()) {
            let _ = walk_messages(&data, seq, |p| decode_diag_msg(p).map(|_| ()));
        }

        #[test]
        fn truncated_frames_are_errors(cut in 0usize..88) {
            let buf = frame(SOCK_DIAG_BY_FAMILY, 1, &sample_msg());
            let short = &buf[..cut.min(buf.len())];
            let r = walk_messages(short, 1, |p| decode_diag_msg(p).map(|_| ()));
            prop_assert!(short.is_empty() || r.is_err());
        }

        #[test]
        fn mutated_frames_never_panic(pos in 0usize..88, byte in any::<u8>()) {
            let mut buf = frame(SOCK_DIAG_BY_FAMILY, 1, &sample_msg());
            if let Some(b) = buf.get_mut(pos) { *b = byte; }
            let _ = walk_messages(&buf, 1, |p| decode_diag_msg(p).map(|_| ()));
        }

        #[test]
        fn proc_parser_never_panics(line in ".{0,200}", v6 in any::<bool>()) {
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
            let _ = parse_proc_line(&line, family);
        }

        #[test]
        fn proc_parser_handles_mutations(pos in 0usize..120, ch in proptest::char::any()) {
            let good = "   1: 0100007F:1F90 0100007F:8182 06 00000000:00000000 03:00001751 00000000     0        0 0 3 00000000d2ec9eb7";
            let mut s: Vec<char> = good.chars().collect();
            if pos < s.len() { s[pos] = ch; }
            let line: String = s.into_iter().collect();
            let _ = parse_proc_line(&line, libc::AF_INET as u8);
        }

        #[test]
        fn inode_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = socket_inode(&data);
        }
    }
}
