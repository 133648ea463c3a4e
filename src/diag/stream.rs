//! Running the dumps: which requests, on which thread, and how records reach the consumer.
//!
//! Every sock_diag dump walks the whole established hash (shared by both families) and the walk, not
//! the copy, dominates its cost. So TCP uses the one request that covers both families in a single
//! walk; where the kernel refuses it, and for UDP, one dump per family runs. Each dump runs on a
//! producer thread while the calling thread decodes and aggregates; when no thread can be created
//! (a pids limit), the dumps run in the calling thread instead, one after the other.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::netlink::{self, BOTH, Batch};
use super::{FAMILIES, Proto, Query, Record, Source, procnet};
use crate::errors::{Error, Result};

/// What a producer hands to the consumer: raw netlink datagrams, or parsed /proc records.
enum Chunk {
    /// Several datagrams at a time: each hand-off wakes the consumer, so fewer are cheaper.
    Netlink {
        seq: u32,
        data: Vec<Vec<u8>>,
    },
    Records(Vec<Record>),
}

/// Chunks in flight between the kernel-facing threads and the consumer: bounds memory (a few
/// datagrams of at most 32 KiB each) whatever the size of the table.
const CHANNEL_DEPTH: usize = 4;
/// Datagrams (at most 32 KiB each) per hand-off.
const DATAGRAMS_PER_CHUNK: usize = 8;
/// /proc records per hand-off.
const RECORDS_PER_CHUNK: usize = 2048;
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

/// Produce one family's chunks into `sink` (false from `sink`: the consumer stopped). Netlink
/// datagrams are checked before they are handed on, so a refusal is seen before anything reached
/// the consumer and can fall back to /proc.
/// Emptied datagram buffers, handed back by the consumer so that the producer receives into them
/// again: a fresh 64 KiB buffer per datagram, freed on the other thread, cost more CPU than decoding.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

/// Buffers kept for reuse: the chunks in flight, and one being filled.
const POOL_LIMIT: usize = (CHANNEL_DEPTH + 2) * DATAGRAMS_PER_CHUNK;

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().ok().and_then(|mut v| v.pop()).unwrap_or_default()
    }

    fn give(&self, buffers: Vec<Vec<u8>>) {
        if let Ok(mut v) = self.0.lock() {
            for mut b in buffers {
                if v.len() >= POOL_LIMIT {
                    break;
                }
                b.clear();
                v.push(b);
            }
        }
    }
}

fn produce(family: u8, q: &Query, pool: &Pool, sink: &mut dyn FnMut(Chunk) -> bool) -> Result<Outcome> {
    let from_proc = |sink: &mut dyn FnMut(Chunk) -> bool| -> Result<Outcome> {
        let mut records = Vec::with_capacity(RECORDS_PER_CHUNK);
        let mut open = true;
        procnet::dump(family, q, |r| {
            if !open {
                return;
            }
            records.push(r);
            if records.len() == RECORDS_PER_CHUNK {
                open = sink(Chunk::Records(std::mem::replace(&mut records, Vec::with_capacity(RECORDS_PER_CHUNK))));
            }
        })?;
        if open && !records.is_empty() {
            sink(Chunk::Records(records));
        }
        Ok(Outcome::default())
    };
    let from_netlink = |sink: &mut dyn FnMut(Chunk) -> bool| -> Result<Outcome> {
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut outcome = Outcome::default();
        netlink::recv_loop(family, q, |data, seq| {
            let batch = netlink::walk_messages(data, seq, |_| Ok(()))?;
            outcome.interrupted |= batch.interrupted;
            pending.push(std::mem::replace(data, pool.take()));
            if (pending.len() >= DATAGRAMS_PER_CHUNK || batch.done)
                && !sink(Chunk::Netlink { seq, data: std::mem::take(&mut pending) })
            {
                return Ok(Batch { done: true, ..batch });
            }
            Ok(batch)
        })?;
        Ok(outcome)
    };
    match q.source {
        _ if family == BOTH => from_netlink(sink), // its caller falls back to per-family dumps
        Source::Proc => from_proc(sink),
        Source::Netlink => from_netlink(sink),
        Source::Auto => match from_netlink(sink) {
            Err(e) if netlink_refused(&e) => from_proc(sink),
            other => other,
        },
    }
}

/// Decode a chunk into `each`.
fn consume(chunk: Chunk, q: &Query, pool: &Pool, each: &mut dyn FnMut(&Record)) -> Result<()> {
    match chunk {
        Chunk::Netlink { seq, data } => {
            let done = data.iter().try_for_each(|datagram| {
                netlink::walk_messages(datagram, seq, |payload| {
                    let mut rec = netlink::decode_diag_msg(payload)?;
                    q.normalise(&mut rec);
                    if q.wants(&rec) {
                        each(&rec);
                    }
                    Ok(())
                })
                .map(|_| ())
            });
            pool.give(data);
            done
        }
        Chunk::Records(records) => {
            records.iter().for_each(each);
            Ok(())
        }
    }
}

/// Stream every record `q` wants through `each` (both families).
pub fn stream(q: &Query, mut each: impl FnMut(&Record)) -> Result<Outcome> {
    if q.proto == Proto::Tcp && q.source != Source::Proc {
        let mut delivered = false;
        let one_walk = stream_families(&[BOTH], q, &mut |r| {
            delivered = true;
            each(r);
        });
        match one_walk {
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

/// Dump `families`, each on a producer thread while this thread decodes; families whose thread could
/// not be created are dumped here afterwards.
fn stream_families(families: &[u8], q: &Query, each: &mut dyn FnMut(&Record)) -> Result<Outcome> {
    let (tx, rx) = sync_channel::<Chunk>(CHANNEL_DEPTH);
    let mut outcome = Outcome::default();
    let pool = &Pool::default();
    std::thread::scope(|scope| -> Result<()> {
        let mut producers = Vec::new();
        let mut inline = Vec::new();
        for &family in families {
            let tx: SyncSender<Chunk> = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("twfix-dump".into())
                .spawn_scoped(scope, move || produce(family, q, pool, &mut |c| tx.send(c).is_ok()));
            match spawned {
                Ok(handle) => producers.push(handle),
                Err(_) => inline.push(family), // no thread to be had: dumped below, in this thread
            }
        }
        drop(tx);
        let consumed = drain(&rx, q, pool, each);
        for p in producers {
            let produced = p.join().unwrap_or_else(|_| Err(Error::Malformed("dump thread panicked".into())))?;
            outcome.interrupted |= produced.interrupted;
        }
        consumed?;
        for family in inline {
            let mut result = Ok(());
            let produced = produce(family, q, pool, &mut |chunk| {
                result = consume(chunk, q, pool, each);
                result.is_ok()
            })?;
            result?;
            outcome.interrupted |= produced.interrupted;
        }
        Ok(())
    })?;
    Ok(outcome)
}

/// Decode every chunk until all producers are done; after an error, keep draining so none blocks.
fn drain(rx: &Receiver<Chunk>, q: &Query, pool: &Pool, each: &mut dyn FnMut(&Record)) -> Result<()> {
    let mut consumed = Ok(());
    for chunk in rx {
        if consumed.is_ok() {
            consumed = consume(chunk, q, pool, each);
        }
    }
    consumed
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
            stream_families(families, &q, &mut |r| found.push(*r)).expect("dump");
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
