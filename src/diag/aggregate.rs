//! Counting while the dump streams: memory grows with distinct keys (ports, peers), never with the
//! number of sockets.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{LISTEN, Record, TIME_WAIT};
use crate::errors::{Error, Result};

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

/// A set of ports as a 65,536-bit map. The rule that fills it ("inside ip_local_port_range and not in
/// ip_local_reserved_ports") lives on the Python side (`twfix.sysctl.PortRange`), in one place.
#[derive(Clone, Default)]
pub struct PortSet(Vec<u64>);
// No words at all: the set is not known; a set read from bytes keeps its 1,024 words even when all are zero.

pub const PORT_SET_BYTES: usize = 65536 / 8;

impl PortSet {
    /// From 8,192 bytes, bit `p % 8` of byte `p / 8` standing for port `p`; empty bytes: no port.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            return Ok(PortSet::default());
        }
        if bytes.len() != PORT_SET_BYTES {
            return Err(Error::Invalid(format!("a port set is {PORT_SET_BYTES} bytes, got {}", bytes.len())));
        }
        Ok(PortSet(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.get(usize::from(port / 64)).is_some_and(|w| w & (1 << (port % 64)) != 0)
    }

    pub fn insert(&mut self, port: u16) {
        if self.0.is_empty() {
            self.0 = vec![0; 1024];
        }
        self.0[usize::from(port / 64)] |= 1 << (port % 64);
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// True for a set built from no bytes: "not known", as opposed to a known set without ports. O(1).
    fn is_unset(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sockets per (state, local port), in one dense 65,536-slot table per state seen: an array increment
/// per socket instead of a hash-map lookup (the aggregation runs once per socket of the table). Each
/// table is allocated zeroed on first use (256 KiB, pages the kernel zeroes lazily).
#[derive(Default)]
pub struct PortCounts(Vec<Option<Vec<u32>>>);

impl PortCounts {
    pub fn add(&mut self, state: u8, port: u16) {
        let s = usize::from(state);
        if self.0.len() <= s {
            self.0.resize_with(s + 1, || None);
        }
        let table = self.0[s].get_or_insert_with(|| vec![0; 65536]);
        table[usize::from(port)] = table[usize::from(port)].saturating_add(1);
    }

    /// The `n` largest counts of each state, states in order, largest first (ties: lower port first).
    pub fn top(&self, n: usize) -> Vec<((u8, u16), u64)> {
        let mut out = Vec::new();
        for (state, table) in self.0.iter().enumerate() {
            let Some(table) = table else { continue };
            let mut items: Vec<((u8, u16), u64)> = table
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(p, c)| ((state as u8, p as u16), u64::from(*c)))
                .collect();
            let order = |a: &((u8, u16), u64), b: &((u8, u16), u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
            if n < items.len() {
                if n == 0 {
                    continue;
                }
                items.select_nth_unstable_by(n - 1, order);
                items.truncate(n);
            }
            items.sort_unstable_by(order);
            out.extend(items);
        }
        out
    }
}

/// A peer of the dump: (state, family, address, port).
pub type RemoteKey = (u8, u8, [u8; 16], u16);

/// Per-destination use of ephemeral ports: key (family, local ip, remote ip, remote port).
pub type UsageKey = (u8, [u8; 16], [u8; 16], u16);

/// Counts by state, port and peer, plus (when the listening ports are known) where TIME-WAIT comes
/// from and how many ephemeral ports each destination takes.
#[derive(Default)]
pub struct Snapshot {
    pub total: u64,
    pub by_state: [u64; 32],
    pub local_ports: PortCounts,
    remotes: FastMap<RemoteKey, u64>,
    /// The last peer seen and how many times in a row: consecutive sockets of the dump often share
    /// their peer (a client host's connections to one listener), which then costs no hashing.
    run: Option<(RemoteKey, u64)>,
    /// TIME-WAIT remaining time in 10 s buckets: 0-10, ..., 50-60, >= 60 s.
    pub tw_hist: [u64; 7],
    /// TIME-WAITs on a listening port, or on a port connect() is never given (outside the ephemeral
    /// set): the server closed first.
    pub tw_server_side: u64,
    /// Listening sockets, from a listen-only dump made first (the kernel skips the established hash).
    pub listeners: Vec<Record>,
    listening: PortSet,
    /// Ports an outgoing connection may have been given (the ephemeral set); empty when unknown.
    ephemeral: PortSet,
    /// Whether to count ephemeral use per destination (memory grows with destinations).
    count_usage: bool,
    pub usage: FastMap<UsageKey, (u64, u64)>,
    /// Client-side TIME-WAITs counted in `usage` whose destination is not a loopback address.
    pub tw_outgoing_not_loopback: u64,
}

impl Snapshot {
    pub fn new(listeners: Vec<Record>, ephemeral: PortSet, count_usage: bool) -> Self {
        let mut listening = PortSet::default();
        for r in &listeners {
            listening.insert(r.sport);
        }
        let count_usage = count_usage && !ephemeral.is_empty();
        Snapshot { listeners, listening, ephemeral, count_usage, ..Snapshot::default() }
    }

    pub fn add(&mut self, r: &Record) {
        self.total += 1;
        if let Some(slot) = self.by_state.get_mut(usize::from(r.state)) {
            *slot += 1;
        }
        self.local_ports.add(r.state, r.sport);
        let on_listening_port = self.listening.contains(r.sport);
        let ephemeral = self.ephemeral.contains(r.sport);
        // The server's side of a connection: its local port is a listener's, or one connect() is never
        // given. Its peers are clients on ephemeral ports, each seen once: they are counted per address
        // (port 0), which keeps this map as small as the set of client hosts.
        let server_side = on_listening_port || (!self.ephemeral.is_unset() && !ephemeral);
        if r.has_peer() {
            let key = (r.state, r.family, r.dst, if server_side { 0 } else { r.dport });
            match &mut self.run {
                Some((last, n)) if *last == key => *n += 1,
                run => {
                    if let Some((last, n)) = run.replace((key, 1)) {
                        *self.remotes.entry(last).or_insert(0) += n;
                    }
                }
            }
        }
        if r.state == TIME_WAIT {
            self.tw_hist[(r.expires_ms / 10_000).min(6) as usize] += 1;
            self.tw_server_side += u64::from(server_side);
        }
        // Connections accepted by a listener share its port and consume no ephemeral port.
        if self.count_usage && r.state != LISTEN && r.dport != 0 && !on_listening_port && ephemeral {
            let e = self.usage.entry((r.family, r.src, r.dst, r.dport)).or_insert((0, 0));
            if r.state == TIME_WAIT {
                e.1 += 1;
                self.tw_outgoing_not_loopback += u64::from(!is_loopback(r.family, &r.dst));
            } else {
                e.0 += 1;
            }
        }
    }
}

impl Snapshot {
    /// Peer counts (the run of equal peers in progress included).
    pub fn remotes(&mut self) -> &FastMap<RemoteKey, u64> {
        if let Some((last, n)) = self.run.take() {
            *self.remotes.entry(last).or_insert(0) += n;
        }
        &self.remotes
    }
}

/// 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104 (addresses as the dump gives them: IPv4 in the first 4 bytes).
fn is_loopback(family: u8, ip: &[u8; 16]) -> bool {
    if family == super::AF_INET {
        return ip[0] == 127;
    }
    let v4_mapped = ip[..10].iter().all(|&b| b == 0) && ip[10] == 0xff && ip[11] == 0xff;
    (ip[..15].iter().all(|&b| b == 0) && ip[15] == 1) || (v4_mapped && ip[12] == 127)
}

/// The `n` largest counts of each state, largest first (ties by key).
pub fn top_n<K: Copy + Ord>(map: &FastMap<K, u64>, state_of: impl Fn(&K) -> u8, n: usize) -> Vec<(K, u64)> {
    let mut per_state: HashMap<u8, Vec<(K, u64)>> = HashMap::new();
    for (k, v) in map {
        per_state.entry(state_of(k)).or_default().push((*k, *v));
    }
    let mut states: Vec<u8> = per_state.keys().copied().collect();
    states.sort_unstable();
    let mut out = Vec::new();
    let order = |a: &(K, u64), b: &(K, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    for s in states {
        if let Some(mut items) = per_state.remove(&s) {
            if n < items.len() {
                if n == 0 {
                    continue;
                }
                items.select_nth_unstable_by(n - 1, order); // the n first, in any order: O(len)
                items.truncate(n);
            }
            items.sort_unstable_by(order);
            out.extend(items);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::netlink::{decode_diag_msg, tests::sample_msg};
    use super::*;

    #[test]
    fn counts_histogram_and_usage() {
        let mut listener = decode_diag_msg(&sample_msg()).expect("valid");
        listener.state = LISTEN;
        listener.sport = 80;
        let mut ephemeral = PortSet::default();
        ephemeral.insert(9600);
        ephemeral.insert(80);
        let mut s = Snapshot::new(vec![listener], ephemeral, true);
        let mut r = decode_diag_msg(&sample_msg()).expect("valid"); // TIME-WAIT 9600 -> 44900
        s.add(&r);
        r.expires_ms = 5_000;
        s.add(&r);
        r.state = 1;
        s.add(&r);
        r.sport = 80; // an accepted connection on the listening port
        r.state = TIME_WAIT;
        s.add(&r);
        assert_eq!((s.total, s.by_state[6], s.by_state[1]), (4, 3, 1));
        assert_eq!(s.tw_hist, [2, 0, 0, 0, 0, 1, 0]);
        assert_eq!(s.tw_server_side, 1);
        assert_eq!(s.usage.len(), 1);
        assert_eq!(s.usage.values().next(), Some(&(1, 2)));
        let top = s.local_ports.top(5);
        assert_eq!(top, vec![((1, 9600), 1), ((6, 9600), 2), ((6, 80), 1)]);
        // Peers: the client side keeps the service port; the accepted connection's peer counts per address.
        let peers = top_n(s.remotes(), |k| k.0, 5);
        assert_eq!(
            peers.iter().map(|((st, _f, _a, p), n)| (*st, *p, *n)).collect::<Vec<_>>(),
            vec![(1, 44900, 1), (6, 44900, 2), (6, 0, 1)]
        );
    }

    #[test]
    fn loopback_addresses() {
        let v4 = |a: [u8; 4]| {
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&a);
            ip
        };
        assert!(is_loopback(super::super::AF_INET, &v4([127, 9, 0, 1])));
        assert!(!is_loopback(super::super::AF_INET, &v4([10, 0, 0, 1])));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback(10, &one));
        let mut mapped = [0u8; 16];
        mapped[10..16].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert!(is_loopback(10, &mapped));
        mapped[12] = 10;
        assert!(!is_loopback(10, &mapped));
    }

    #[test]
    fn port_sets() {
        let mut bytes = vec![0u8; PORT_SET_BYTES];
        bytes[65535 / 8] |= 1 << (65535 % 8);
        bytes[1] |= 1; // port 8
        let set = PortSet::from_bytes(&bytes).expect("valid");
        assert!(set.contains(65535) && set.contains(8) && !set.contains(9) && !set.contains(0));
        assert!(PortSet::from_bytes(&[]).expect("empty").is_empty());
        assert!(PortSet::from_bytes(&[1, 2, 3]).is_err());
    }
}
