//! The /proc/net/{tcp,tcp6,udp,udp6} fallback: the same records as netlink, read in bounded chunks
//! (a line at a time through a small buffer), so memory does not grow with the table.

use std::io::{BufRead, BufReader, Read};

use super::{AF_INET, Proto, Query, Record};
use crate::errors::{Error, Result};

/// Lines are about 150 bytes; anything longer than this is not a socket line.
const MAX_LINE: usize = 1024;
const READ_BUF: usize = 64 * 1024;

pub fn path(proto: Proto, family: u8) -> &'static str {
    match (proto, family == AF_INET) {
        (Proto::Tcp, true) => "/proc/net/tcp",
        (Proto::Tcp, false) => "/proc/net/tcp6",
        (Proto::Udp, true) => "/proc/net/udp",
        (Proto::Udp, false) => "/proc/net/udp6",
    }
}

fn hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_addr(field: &str, family: u8) -> Option<([u8; 16], u16)> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    let words = if family == AF_INET { 1 } else { 4 };
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
pub fn parse_line(line: &str, family: u8) -> Result<Record> {
    let bad =
        || Error::Malformed(format!("unexpected /proc/net line: {:?}", line.chars().take(160).collect::<String>()));
    let mut it = line.split_ascii_whitespace();
    let _sl = it.next().ok_or_else(bad)?;
    let (src, sport) = parse_addr(it.next().ok_or_else(bad)?, family).ok_or_else(bad)?;
    let (dst, dport) = parse_addr(it.next().ok_or_else(bad)?, family).ok_or_else(bad)?;
    let state = u8::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    let _queues = it.next().ok_or_else(bad)?;
    let (tr, when) = it.next().ok_or_else(bad)?.split_once(':').ok_or_else(bad)?;
    let timer = u8::from_str_radix(tr, 16).map_err(|_| bad())?;
    // tm->when is in USER_HZ (1/100 s) ticks; it can be negative-looking for expired timers.
    let ticks = u64::from_str_radix(when, 16).map_err(|_| bad())?;
    let retrans = u8::from_str_radix(it.next().ok_or_else(bad)?, 16).unwrap_or(u8::MAX);
    let uid = it.next().ok_or_else(bad)?.parse::<u32>().map_err(|_| bad())?;
    let _timeout = it.next().ok_or_else(bad)?;
    let inode = it.next().ok_or_else(bad)?.parse::<u64>().map_err(|_| bad())?;
    let expires_ms = if ticks > u64::from(u32::MAX) / 10 { 0 } else { (ticks * 10) as u32 };
    Ok(Record { family, state, timer, retrans, v6only: None, src, sport, dst, dport, expires_ms, uid, inode })
}

/// Stream the records of one family that `q` wants through `each`, reading a line at a time.
pub fn dump(family: u8, q: &Query, mut each: impl FnMut(Record)) -> Result<()> {
    let path = path(q.proto, family);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        // No IPv6 (or no UDP) in this kernel: nothing to report for that family.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::os(e, format!("open {path}"))),
    };
    let mut reader = BufReader::with_capacity(READ_BUF, file);
    let mut line = Vec::with_capacity(256);
    let mut first = true;
    loop {
        line.clear();
        let n = Read::by_ref(&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::os(e, format!("read {path}")))?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            return Err(Error::Malformed(format!("{path}: line longer than {MAX_LINE} bytes")));
        }
        if std::mem::take(&mut first) {
            continue; // the header
        }
        let text = std::str::from_utf8(&line).map_err(|_| Error::Malformed(format!("{path}: line is not text")))?;
        if text.trim().is_empty() {
            continue;
        }
        let rec = parse_line(text, family)?;
        if q.wants(&rec) {
            each(rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{LISTEN, TIME_WAIT, format_ip};
    use super::*;
    use proptest::prelude::*;

    const TW_LINE: &str = "   1: 0100007F:1F90 0100007F:8182 06 00000000:00000000 03:00001751 00000000     0        0 0 3 00000000d2ec9eb7";

    #[test]
    fn parses_lines() {
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2106446 1 00000000c37c4737 100 0 0 10 0";
        let r = parse_line(listen, AF_INET).expect("listen line");
        assert_eq!((r.state, r.sport, r.inode, r.expires()), (LISTEN, 8080, 2_106_446, None));
        if cfg!(target_endian = "little") {
            assert_eq!(format_ip(r.family, &r.src), "127.0.0.1");
        }
        let r = parse_line(TW_LINE, AF_INET).expect("tw line");
        assert_eq!((r.state, r.dport, r.expires(), r.retrans), (TIME_WAIT, 0x8182, Some(59690), 0));
        let fin_wait1 =
            "   2: 0100007F:1388 0200007F:8F1D 04 00000001:00000000 01:000001F4 00000007     0        0 0 2 0";
        assert_eq!(parse_line(fin_wait1, AF_INET).expect("orphan line").retrans, 7);
        let v6 = "   0: 00000000000000000000000001000000:0050 0000000000000000FFFF00000100007F:1234 01 00000000:00000000 00:00000000 00000000  1000        0 42 1 0";
        let r = parse_line(v6, libc::AF_INET6 as u8).expect("v6 line");
        if cfg!(target_endian = "little") {
            assert_eq!(format_ip(r.family, &r.src), "::1");
            assert_eq!(format_ip(r.family, &r.dst), "::ffff:127.0.0.1");
        }
        assert_eq!(r.uid, 1000);
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in ["", "0:", "0: zz:1 00000000:0000 0A", "0: 0100007F:1F90 00000000:0000 0A 0:0 00:0 0 x 0 1"] {
            assert!(parse_line(line, AF_INET).is_err(), "{line:?}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(line in ".{0,200}", v6 in any::<bool>()) {
            let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
            let _ = parse_line(&line, family);
        }

        #[test]
        fn parser_handles_mutations(pos in 0usize..120, ch in proptest::char::any()) {
            let mut s: Vec<char> = TW_LINE.chars().collect();
            if pos < s.len() { s[pos] = ch; }
            let line: String = s.into_iter().collect();
            let _ = parse_line(&line, AF_INET);
        }
    }
}
