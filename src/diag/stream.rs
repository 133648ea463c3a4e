//! Running the dumps: which requests, and how records reach the consumer.
//!
//! Every sock_diag dump walks the whole established hash (shared by both families) and the walk, not
//! the copy, dominates its cost. So TCP uses the one request that covers both families in a single
//! walk; where the kernel refuses it, and for UDP, one dump per family runs. Each datagram is decoded
//! and aggregated as soon as it is received, in the calling thread. A producer thread that received
//! while this one decoded saved 1-2 % of wall time on an idle machine but cost 6-8 % more CPU
//! (hand-offs, wake-ups, every header walked twice): on a host whose cores are busy that is all loss
//! (benches/bench_floor.py, 180,000 sockets: 1.10x the floor in wall and CPU inline, against 1.10x wall and
//! 1.15-1.19x CPU threaded).

use super::netlink::{self, BOTH};
use super::{FAMILIES, Proto, Query, Record, Source, procnet};
use crate::errors::{Error, Result};

/// How often a dump the kernel flagged as interrupted (NLM_F_DUMP_INTR) is taken again.
const RETRIES: usize = 3;

/// How a dump went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The kernel flagged the dump as interrupted: the table changed during the walk.
    pub interrupted: bool,
}

fn netlink_refused(e: &Error) -> bool {
    matches!(e, Error::Os { errno, .. }
        if [libc::EPERM, libc::EACCES, libc::EPROTONOSUPPORT, libc::EAFNOSUPPORT, libc::ENOENT, libc::EOPNOTSUPP]
            .contains(errno))
}

/// One netlink dump of `family` (or `BOTH`), each wanted record through `each`. `delivered` tells
/// the caller whether a refusal came before any record (only then may another source stand in).
fn from_netlink(family: u8, q: &Query, delivered: &mut bool, each: &mut dyn FnMut(&Record)) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    netlink::recv_loop(family, q, |data, seq| {
        let batch = netlink::walk_messages(data, seq, |payload| {
            let mut rec = netlink::decode_diag_msg(payload)?;
            q.normalise(&mut rec);
            *delivered = true;
            if q.wants(&rec) {
                each(&rec);
            }
            Ok(())
        })?;
        outcome.interrupted |= batch.interrupted;
        Ok(batch)
    })?;
    Ok(outcome)
}

/// One family's dump from the source `q` names; `Auto` reads /proc where netlink is refused.
fn dump_family(family: u8, q: &Query, each: &mut dyn FnMut(&Record)) -> Result<Outcome> {
    let from_proc = |each: &mut dyn FnMut(&Record)| -> Result<Outcome> {
        procnet::dump(family, q, |r| each(&r))?;
        Ok(Outcome::default())
    };
    let mut delivered = false;
    match q.source {
        Source::Proc => from_proc(each),
        Source::Netlink => from_netlink(family, q, &mut delivered, each),
        Source::Auto => match from_netlink(family, q, &mut delivered, each) {
            Err(e) if !delivered && netlink_refused(&e) => from_proc(each),
            other => other,
        },
    }
}

/// Stream every record `q` wants through `each` (both families).
pub fn stream(q: &Query, mut each: impl FnMut(&Record)) -> Result<Outcome> {
    if q.proto == Proto::Tcp && q.source != Source::Proc {
        let mut delivered = false;
        match from_netlink(BOTH, q, &mut delivered, &mut each) {
            Err(Error::Os { .. }) if !delivered => {} // not offered by this kernel: per-family dumps
            other => return other,
        }
    }
    stream_families(&FAMILIES, q, &mut each)
}

/// Aggregate a dump into a fresh `T`; a dump the kernel flags as interrupted is taken again, a bounded
/// number of times. Returns the aggregate and whether it is an exact snapshot.
pub fn collect<T>(q: &Query, init: impl Fn() -> T, add: impl Fn(&mut T, &Record)) -> Result<(T, bool)> {
    let mut attempt = 0;
    loop {
        let mut acc = init();
        let outcome = stream(q, |r| add(&mut acc, r))?;
        if !outcome.interrupted || attempt == RETRIES {
            return Ok((acc, !outcome.interrupted));
        }
        attempt += 1;
    }
}

/// Dump `families` one after the other.
fn stream_families(families: &[u8], q: &Query, each: &mut dyn FnMut(&Record)) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    for &family in families {
        outcome.interrupted |= dump_family(family, q, each)?.interrupted;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::super::{Filter, LISTEN};
    use super::*;

    #[test]
    fn one_walk_per_family_and_proc_dumps_agree() {
        // A listener of this test process, found through every path (the host's table, read-only).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let port = listener.local_addr().expect("addr").port();
        let find = |families: &[u8], source: Source| {
            let q = Query::new(Proto::Tcp, 1 << LISTEN, source, Filter::LocalPort(port));
            let mut found = Vec::new();
            if families == [BOTH] {
                from_netlink(BOTH, &q, &mut false, &mut |r| found.push(*r)).expect("one-walk dump");
            } else {
                stream_families(families, &q, &mut |r| found.push(*r)).expect("dump");
            }
            found
        };
        let one = find(&[BOTH], Source::Netlink);
        assert_eq!(one.len(), 1);
        assert_eq!(one, find(&FAMILIES, Source::Netlink));
        assert_eq!(one[0].sport, port);
        let from_proc = find(&FAMILIES, Source::Proc);
        assert_eq!((from_proc[0].sport, from_proc[0].inode), (port, one[0].inode));
        let q = Query::new(Proto::Tcp, 1 << LISTEN, Source::Auto, Filter::LocalPort(port));
        let (n, exact) = collect(&q, || 0, |n, _| *n += 1).expect("dump");
        assert_eq!((n, exact), (1, true));
    }
}
