//! The `#[pyfunction]` glue of the socket table: argument conversion, `py.detach` around the dumps,
//! and building Python objects. No dump, parse or aggregation logic lives here.

use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyList, PyString, PyTuple};

use super::aggregate::{FastMap, PortSet, Snapshot, top_n};
use super::stream::{collect, stream};
use super::{AF_INET, Filter, LISTEN, Proto, Query, Source, format_ip, netlink, owners};
use crate::errors::Error;

/// Strings and address objects shared between entries, at most this many of each.
const CACHE_LIMIT: usize = 1 << 16;

/// Sockets of `proto` in `states` (bitmask, bit n = state n), optionally only local `port`, built
/// directly as the final Python objects (the hot path of `twfix.sockets()`):
/// `entry_cls(family, state, addr_cls(ip, port), addr_cls(ip, port) | None, uid, inode, expires_s | None,
/// v6only | None, retrans)`, created with `tuple.__new__` as NamedTuple classes allow. Address strings and
/// address objects repeat a lot in real tables and are shared instead of rebuilt.
#[pyfunction]
#[pyo3(signature = (proto, states, port, source, entry_cls, addr_cls, families, state_objs, netns=None))]
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
    netns: Option<String>,
) -> PyResult<Bound<'py, PyList>> {
    let q =
        Query::new(Proto::parse(proto)?, states, Source::parse(source)?, port.map_or(Filter::All, Filter::LocalPort));
    // The state objects come from Python's table (twfix.kernel), indexed by kernel number; a number past
    // its end is shown as CLOSE.
    if families.len() != 2 || state_objs.len() <= usize::from(super::CLOSE) {
        return Err(Error::Invalid(
            "families must hold 2 objects (AF_INET, AF_INET6), state_objs one per kernel state number".into(),
        )
        .into());
    }
    let (records, _exact) = py.detach(|| crate::netns::run(netns, move || collect(&q, Vec::new, |v, r| v.push(*r))))?;
    let tuple_new = py.get_type::<PyTuple>().getattr("__new__")?;
    let none = py.None().into_bound(py);
    let (yes, no) = (true.into_pyobject(py)?.to_owned().into_any(), false.into_pyobject(py)?.to_owned().into_any());
    let mut strings: FastMap<(u8, [u8; 16]), Bound<'py, PyString>> = FastMap::default();
    let mut addrs: FastMap<(u8, [u8; 16], u16), Bound<'py, PyAny>> = FastMap::default();
    let mut addr_obj = |family: u8, ip: [u8; 16], port: u16| -> PyResult<Bound<'py, PyAny>> {
        if let Some(a) = addrs.get(&(family, ip, port)) {
            return Ok(a.clone());
        }
        let text = if let Some(t) = strings.get(&(family, ip)) {
            t.clone()
        } else {
            let t = PyString::new(py, &format_ip(family, &ip));
            if strings.len() < CACHE_LIMIT {
                strings.insert((family, ip), t.clone());
            }
            t
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
        let family = if r.family == AF_INET { &families[0] } else { &families[1] };
        let state = state_objs.get(usize::from(r.state)).unwrap_or(&state_objs[super::CLOSE as usize]);
        let laddr = addr_obj(r.family, r.src, r.sport)?;
        let raddr = if r.dport != 0 { addr_obj(r.family, r.dst, r.dport)? } else { none.clone() };
        let expires = match r.expires() {
            Some(ms) => PyFloat::new(py, f64::from(ms) / 1000.0).into_any(),
            None => none.clone(),
        };
        let v6only = match r.v6only {
            Some(true) => yes.clone(),
            Some(false) => no.clone(),
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
                v6only,
                r.retrans.into_pyobject(py)?.into_any(),
            ],
        )?;
        list.append(tuple_new.call1((entry_cls, fields))?)?;
    }
    Ok(list)
}

pub type PyListener = (u8, String, u16, u32, u64, Option<bool>);
pub type PyUsage = (u8, String, String, u16, u64, u64);
pub type PySnapshot = (
    u64,
    Vec<(u8, u64)>,
    Vec<(u8, u16, u64)>,
    Vec<(u8, u8, String, u16, u64)>,
    Vec<u64>,
    u64,
    Vec<PyListener>,
    Vec<PyUsage>,
    bool,
    u64,
);

/// One walk of the table, aggregated while it streams: (total, per-state counts, top local ports per
/// state, top remote endpoints per state, TIME-WAIT remaining-time histogram in 10 s buckets,
/// server-side TIME-WAITs, listeners as (family, ip, port, uid, inode, v6only), ephemeral use per
/// destination as (family, local, remote, remote port, in use, in TIME-WAIT), exact).
///
/// `ephemeral` is the port set connect() draws from (8,192 bytes, or empty when unknown); `usage` asks for
/// the per-destination counts. For TCP, a listen-only dump
/// comes first: it is cheap (the kernel skips the established hash) and tells server-side TIME-WAIT
/// and accepted connections apart from outgoing ones.
#[pyfunction]
#[pyo3(signature = (proto, states, top, ephemeral, usage, source="auto", netns=None, usage_limit=0))]
#[allow(clippy::too_many_arguments)] // the Python-facing signature; every argument is a plain value
pub fn snapshot(
    py: Python<'_>,
    proto: &str,
    states: u32,
    top: usize,
    ephemeral: &[u8],
    usage: bool,
    source: &str,
    netns: Option<String>,
    usage_limit: usize,
) -> PyResult<PySnapshot> {
    let proto = Proto::parse(proto)?;
    let source = Source::parse(source)?;
    let ephemeral = PortSet::from_bytes(ephemeral)?;
    let snap = py.detach(|| {
        crate::netns::run(netns, move || -> crate::errors::Result<(Snapshot, bool)> {
            let mut listeners = Vec::new();
            if proto == Proto::Tcp {
                let q = Query::new(proto, 1 << LISTEN, source, Filter::All);
                stream(&q, |r| listeners.push(*r))?;
            }
            let q = Query::new(proto, states, source, Filter::All);
            collect(&q, || Snapshot::new(listeners.clone(), ephemeral.clone(), usage), Snapshot::add)
        })
    });
    let (mut s, exact) = snap?;
    let counts = s.by_state.iter().enumerate().filter(|(_, c)| **c > 0).map(|(st, c)| (st as u8, *c)).collect();
    let ports = s.local_ports.top(top).into_iter().map(|((st, p), c)| (st, p, c)).collect();
    let remotes = top_n(s.remotes(), |k| k.0, top)
        .into_iter()
        .map(|((st, f, a, p), c)| (st, f, format_ip(f, &a), p, c))
        .collect();
    let listeners = s
        .listeners
        .iter()
        .map(|r| (r.family, format_ip(r.family, &r.src), r.sport, r.uid, r.inode, r.v6only))
        .collect();
    // The busiest destinations first; with `usage_limit`, only that many are turned into Python objects
    // (two address strings each: thousands of destinations would cost milliseconds).
    let mut busiest: Vec<(&super::aggregate::UsageKey, &(u64, u64))> = s.usage.iter().collect();
    let order = |a: &(&super::aggregate::UsageKey, &(u64, u64)), b: &(&super::aggregate::UsageKey, &(u64, u64))| {
        (b.1.0 + b.1.1).cmp(&(a.1.0 + a.1.1)).then_with(|| a.0.cmp(b.0))
    };
    if usage_limit > 0 && usage_limit < busiest.len() {
        busiest.select_nth_unstable_by(usage_limit - 1, order);
        busiest.truncate(usage_limit);
    }
    busiest.sort_unstable_by(order);
    let usage: Vec<PyUsage> = busiest
        .into_iter()
        .map(|(&(f, src, dst, dport), &(used, tw))| (f, format_ip(f, &src), format_ip(f, &dst), dport, used, tw))
        .collect();
    let outside = s.tw_outgoing_not_loopback;
    Ok((s.total, counts, ports, remotes, s.tw_hist.to_vec(), s.tw_server_side, listeners, usage, exact, outside))
}

/// The listening (TCP) or unconnected (UDP) sockets on `port`, as (family, ip, port), in the network
/// namespace at `netns` (or this one). Cheap: for TCP the kernel walks only its listening hash.
#[pyfunction]
#[pyo3(signature = (proto, port, netns=None))]
pub fn listeners_in(py: Python<'_>, proto: &str, port: u16, netns: Option<String>) -> PyResult<Vec<(u8, String, u16)>> {
    let proto = Proto::parse(proto)?;
    let states = if proto == Proto::Tcp { 1 << LISTEN } else { 1 << super::CLOSE };
    let q = Query::new(proto, states, Source::Auto, Filter::LocalPort(port));
    let found = py.detach(|| {
        crate::netns::run(netns, move || {
            let mut out = Vec::new();
            stream(&q, |r| out.push((r.family, format_ip(r.family, &r.src), r.sport)))?;
            Ok(out)
        })
    })?;
    Ok(found)
}

/// ([(inode, pid, fd)] for the processes holding each inode, number of processes that could not be read,
/// processes of the namespace `netns` (an inode) left unsearched and their descriptors); `uids`: the
/// users the sockets belong to, whose processes are searched first (empty: no preference). See `owners`.
#[pyfunction]
#[pyo3(signature = (inodes, netns=None, uids=Vec::new()))]
pub fn socket_owners(
    py: Python<'_>,
    inodes: Vec<u64>,
    netns: Option<u64>,
    uids: Vec<u32>,
) -> PyResult<(Vec<owners::Holding>, u64, u64, u64)> {
    let scan = py.detach(|| owners::owners(&inodes, &uids, netns))?;
    Ok((scan.found, scan.denied, scan.skipped, scan.skipped_fds))
}

/// (SO_REUSEADDR, SO_REUSEPORT) of socket `inode` held at descriptor `fd` by process `pid`, read from a
/// duplicate of the descriptor; OSError where the process cannot be inspected.
#[pyfunction]
pub fn socket_reuse_flags(py: Python<'_>, pid: u32, fd: u32, inode: u64) -> PyResult<(bool, bool)> {
    Ok(py.detach(|| owners::reuse_flags(pid, fd, inode))?)
}

/// A bare dump that only receives and discards: the kernel's own cost, for benchmarks. By default one
/// SOCK_DIAG_BY_FAMILY dump per family (what `ss` does); `one_walk=True` uses the single TCP dump
/// that twfix itself prefers.
#[pyfunction]
#[pyo3(signature = (proto, states, one_walk=false))]
pub fn netlink_discard(py: Python<'_>, proto: &str, states: u32, one_walk: bool) -> PyResult<u64> {
    let proto = Proto::parse(proto)?;
    Ok(py.detach(|| netlink::discard(proto, states, one_walk))?)
}

fn check_proc_net_names(names: &[String]) -> PyResult<()> {
    for n in names {
        if n.is_empty() || n.contains('/') || n.starts_with('.') {
            return Err(crate::errors::Error::Invalid(format!("{n:?} is not a /proc/net file name")).into());
        }
    }
    Ok(())
}

/// `/proc/thread-self/net/NAME` for each name, as the calling thread's network namespace sees it.
fn read_proc_net_here(names: &[String]) -> crate::errors::Result<Vec<Option<String>>> {
    use std::io::Read;
    names
        .iter()
        .map(|n| {
            // thread-self: the namespace of the thread that reads, which may have joined another.
            let path = format!("/proc/thread-self/net/{n}");
            match std::fs::File::open(&path) {
                Ok(f) => {
                    let mut text = String::new();
                    f.take(1 << 20)
                        .read_to_string(&mut text)
                        .map_err(|e| crate::errors::Error::os(e, format!("read {path}")))?;
                    Ok(Some(text))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(crate::errors::Error::os(e, format!("open {path}"))),
            }
        })
        .collect()
}

/// The text of `/proc/net/NAME` files (`sockstat`, `netstat`, ...) as the network namespace at `netns` (or
/// this thread's) sees them; None for a file that does not exist. At most 1 MiB of each is read.
#[pyfunction]
#[pyo3(signature = (names, netns=None))]
pub fn read_proc_net(py: Python<'_>, names: Vec<String>, netns: Option<String>) -> PyResult<Vec<Option<String>>> {
    check_proc_net_names(&names)?;
    Ok(py.detach(|| crate::netns::run(netns, move || read_proc_net_here(&names)))?)
}

/// `read_proc_net(names, ns)` for every namespace of `netns` (None: the caller's), on one thread that joins
/// each in turn. Per namespace: the texts, or None where it could not be entered or read (gone meanwhile,
/// not a namespace, not ours to enter).
#[pyfunction]
pub fn read_proc_net_each(
    py: Python<'_>,
    names: Vec<String>,
    netns: Vec<Option<String>>,
) -> PyResult<Vec<Option<Vec<Option<String>>>>> {
    check_proc_net_names(&names)?;
    let each = py.detach(|| crate::netns::run_in_each(netns, move || read_proc_net_here(&names)))?;
    Ok(each.into_iter().map(std::result::Result::ok).collect())
}
