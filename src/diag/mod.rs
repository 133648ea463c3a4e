//! The socket table: NETLINK_SOCK_DIAG dumps (what `ss` uses), a /proc/net fallback giving the same
//! records, streaming aggregation, and the inode -> process mapping behind `who_holds`.
//!
//! - `netlink`: dump requests, inet_diag bytecode, the message decoder and the netlink socket.
//! - `procnet`: the /proc/net/{tcp,udp}{,6} parser, read in bounded chunks.
//! - `stream`: runs the dumps (on a producer thread when one can be created) and hands records over.
//! - `aggregate`: counts while the dump streams (summary, ephemeral use per destination).
//! - `owners`: socket inode -> pids, from /proc/PID/fd.
//! - `py`: the `#[pyfunction]` glue, and nothing else.
//!
//! Parsers are pure functions over byte slices or strings that return errors on malformed input; they
//! never index out of bounds.

pub mod aggregate;
pub mod netlink;
pub mod owners;
pub mod procnet;
pub mod py;
pub mod stream;

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::errors::{Error, Result};

/// Kernel state numbers (include/net/tcp_states.h) that the native side itself needs. The names
/// live in one table on the Python side (`twfix.diag.TcpState`).
pub const FIN_WAIT2: u8 = 5;
pub const TIME_WAIT: u8 = 6;
pub const CLOSE: u8 = 7;
pub const LISTEN: u8 = 10;
/// A TCP socket bound to a port but neither listening nor connected. Linux 6.8+ dumps these when the
/// request's state mask has this bit, and reports them in state CLOSE; twfix gives them this name.
pub const BOUND_INACTIVE: u8 = 13;
/// Every state: the mask of a dump that filters nothing.
pub const ALL_STATES: u32 = u32::MAX;

pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;
/// The per-family dumps, in the order `ss` makes them.
pub const FAMILIES: [u8; 2] = [AF_INET, AF_INET6];

/// One socket as the kernel reports it. Addresses are raw network-order bytes (IPv4 in the first 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Record {
    pub family: u8,
    pub state: u8,
    pub timer: u8,
    /// Retransmissions (or keepalive/window probes) made by the running timer (`idiag_retrans`).
    pub retrans: u8,
    /// `IPV6_V6ONLY` of an IPv6 socket (INET_DIAG_SKV6ONLY); None when the source does not say.
    pub v6only: Option<bool>,
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

    pub fn in_states(&self, mask: u32) -> bool {
        self.state < 32 && mask & (1 << self.state) != 0
    }

    pub fn has_peer(&self) -> bool {
        self.dport != 0 || self.dst != [0; 16]
    }
}

/// The IP text of a raw address (no port, no brackets: the Python side adds those in one place).
pub fn format_ip(family: u8, addr: &[u8; 16]) -> String {
    if family == AF_INET {
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

/// A filter on the local port: compiled to inet_diag bytecode for netlink (so filtered-out sockets
/// cost no copy), applied record by record for /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    LocalPort(u16),
}

impl Filter {
    pub fn matches(self, r: &Record) -> bool {
        match self {
            Filter::All => true,
            Filter::LocalPort(p) => r.sport == p,
        }
    }
}

/// What one dump asks for. `states` is what the caller wants; `kernel_states` the mask sent to the
/// kernel, which filters some sockets by another state than the one it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub proto: Proto,
    pub states: u32,
    pub kernel_states: u32,
    pub source: Source,
    pub filter: Filter,
}

impl Query {
    pub fn new(proto: Proto, states: u32, source: Source, filter: Filter) -> Self {
        // For TCP, CLOSE and BOUND_INACTIVE are one set (no other closed TCP socket is in a table the
        // kernel dumps); the kernel needs the BOUND_INACTIVE bit to include them.
        let both = (1u32 << CLOSE) | (1u32 << BOUND_INACTIVE);
        let states = if proto == Proto::Tcp && states & both != 0 { states | both } else { states };
        // An orphaned FIN_WAIT2 is kept as a TIME-WAIT mini-socket: the kernel matches it against the
        // TIME_WAIT bit of the request but reports it in FIN_WAIT2, so asking for FIN_WAIT2 alone would
        // miss it. The extra TIME-WAITs are dropped again by `wants`.
        let mut kernel_states = states;
        if proto == Proto::Tcp && states & (1 << FIN_WAIT2) != 0 {
            kernel_states |= 1 << TIME_WAIT;
        }
        Query { proto, states, kernel_states, source, filter }
    }

    /// The record as twfix names it: a TCP socket in CLOSE is a bound, inactive one.
    pub fn normalise(&self, r: &mut Record) {
        if self.proto == Proto::Tcp && r.state == CLOSE {
            r.state = BOUND_INACTIVE;
        }
    }

    pub fn wants(&self, r: &Record) -> bool {
        r.in_states(self.states) && self.filter.matches(r)
    }
}
