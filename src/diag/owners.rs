//! Socket inode -> processes, from the /proc/PID/fd links (what `ss -p`, `lsof` and `fuser` read).

use std::collections::{HashMap, HashSet};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::fstat;

use crate::errors::{Error, Result};

/// A socket held by a process: (inode, pid, descriptor number).
pub type Holding = (u64, u32, u32);

/// Parse the target of a /proc/PID/fd symlink: `socket:[INODE]`.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let inner = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if inner.is_empty() || inner.len() > 20 || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// What a search for socket owners saw: the holdings, how many processes could not be inspected
/// (permission), and how many processes of the socket's own network namespace were left unsearched
/// (with how many descriptors) because every wanted socket already had an owner.
#[derive(Debug, Default)]
pub struct OwnerScan {
    pub found: Vec<Holding>,
    pub denied: u64,
    pub skipped: u64,
    pub skipped_fds: u64,
}

/// A process of /proc with its network namespace inode and its descriptor count (the size the kernel
/// reports for /proc/PID/fd, 6.2+; 0 where it reports none).
struct Candidate {
    pid: u32,
    /// In the sockets' namespace (or no preference).
    here: bool,
    fds: u64,
}

/// Whether the kernel reports a process's open descriptors as the size of /proc/PID/fd (Linux 6.2+);
/// probed once on our own, which always has some open.
fn fd_size_reported() -> bool {
    static REPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REPORTED.get_or_init(|| std::fs::metadata("/proc/self/fd").is_ok_and(|m| m.len() > 0))
}

/// How many descriptors the process at `proc_pid` (a /proc/PID path) holds: the size of its fd directory
/// where the kernel reports it, else its descriptor table size (`FDSize` in its status, at least the
/// highest open descriptor + 1: a big process has a big table). 0 when neither can be read.
fn descriptor_count(proc_pid: &std::path::Path) -> u64 {
    if fd_size_reported() {
        return std::fs::metadata(proc_pid.join("fd")).map_or(0, |m| m.len());
    }
    std::fs::read(proc_pid.join("status")).ok().and_then(|status| fd_table_size(&status)).unwrap_or(0)
}

/// The `FDSize:` value of a /proc/PID/status text.
pub fn fd_table_size(status: &[u8]) -> Option<u64> {
    let line = status.split(|&b| b == b'\n').find_map(|l| l.strip_prefix(b"FDSize:"))?;
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

/// Processes holding more descriptors than this are searched last, and only while an owner is missing:
/// a proxy or a database with 100,000 connections would otherwise cost every search 100 ms and more.
pub const BIG_PROCESS_FDS: u64 = 4096;

/// A process of another user than the sockets' creators is searched first only up to this many
/// descriptors. Its sockets are nearly always its own; it holds one of theirs when it inherited it (a
/// prefork server's workers after dropping privileges) or was passed it (socket activation), and then it
/// is a child of a holder: such processes are followed by parentage. Reading a descriptor's link costs
/// about 1.5 us, so a database of another user with 2,000 descriptors in the same namespace would add
/// 3 ms to every search (`benches/bench_floor.py`, crowded rows).
pub const OTHER_USER_FDS: u64 = 64;

/// The parent pid in a /proc/PID/stat text: the field after the state, which follows the last `)` (the
/// command name in parentheses may itself hold spaces and parentheses).
pub fn parent_pid(stat: &[u8]) -> Option<u32> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the process runs as one of `uids`: the owner of the /proc/PID directory is the process's
/// effective uid, also when it is not dumpable (the kernel keeps that directory's owner for the sake
/// of tools that stat it, while the files inside turn to root). Unreadable: assumed so (searched rather
/// than missed).
fn runs_as(entry: &std::fs::DirEntry, uids: &[u32]) -> bool {
    entry.metadata().map_or(true, |m| uids.contains(&std::os::unix::fs::MetadataExt::uid(&m)))
}

/// Every (inode, pid, fd) triple for the wanted inodes (the first descriptor of that socket in that
/// process). A socket inherited across fork() is held by every process that has it open (a prefork
/// server's master and workers), so every ordinary process of the socket's network namespace (`netns`,
/// an inode; None: no preference) is searched: processes of the sockets' users (`uids`, the uid the
/// kernel reports for each socket; empty: no preference) up to `BIG_PROCESS_FDS` descriptors, processes
/// of other users up to `OTHER_USER_FDS`, and then, up to `BIG_PROCESS_FDS`, the children of every
/// holder found (workers that dropped privileges, a socket-activated service under systemd), and
/// theirs. Bigger processes, and processes of other namespaces (which hold this namespace's sockets only
/// after setns() or descriptor passing), are searched after that, this namespace's first and fewest
/// descriptors first, and only while a wanted socket still has no owner; `skipped` counts this
/// namespace's processes over `BIG_PROCESS_FDS` left out then (other users' mid-size processes that
/// descend from no holder are left out silently: they would hold a socket only if one was passed to
/// them by a process that is not its holder any more). Threads share their process's descriptor table,
/// so /proc/PID covers them.
pub fn owners(inodes: &[u64], uids: &[u32], netns: Option<u64>) -> Result<OwnerScan> {
    let wanted: HashSet<u64> = inodes.iter().copied().filter(|&i| i != 0).collect();
    let mut scan = OwnerScan::default();
    if wanted.is_empty() {
        return Ok(scan);
    }
    let procs = std::fs::read_dir("/proc").map_err(|e| Error::os(e, "read /proc"))?;
    let mut near = Vec::new();
    let mut far = Vec::new();
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = std::str::from_utf8(name.as_bytes()).ok().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let path = entry.path();
        let ns = std::fs::metadata(path.join("ns/net")).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let fds = descriptor_count(&path);
        let here = netns.is_none() || ns.is_none() || ns == netns;
        let c = Candidate { pid, here, fds };
        if !here || fds > BIG_PROCESS_FDS {
            far.push(c);
        } else if fds <= OTHER_USER_FDS || uids.is_empty() || runs_as(&entry, uids) {
            near.push(c);
        } else {
            far.push(c);
        }
    }
    let mut owned: HashSet<u64> = HashSet::new();
    for c in &near {
        search(c.pid, &wanted, &mut owned, &mut scan);
    }
    far.sort_unstable_by_key(|c| (!c.here, c.fds));
    follow_children(&mut far, &wanted, &mut owned, &mut scan);
    for (i, c) in far.iter().enumerate() {
        if owned.len() == wanted.len() {
            let big = far[i..].iter().filter(|c| c.here && c.fds > BIG_PROCESS_FDS);
            scan.skipped = big.clone().count() as u64;
            scan.skipped_fds = big.map(|c| c.fds).sum();
            break;
        }
        search(c.pid, &wanted, &mut owned, &mut scan);
    }
    scan.found.sort_unstable();
    Ok(scan)
}

/// Search, among `far`, this namespace's processes of at most `BIG_PROCESS_FDS` descriptors whose parent
/// holds a wanted socket, and their children in turn; the ones searched leave `far`.
fn follow_children(far: &mut Vec<Candidate>, wanted: &HashSet<u64>, owned: &mut HashSet<u64>, scan: &mut OwnerScan) {
    let mut parents: Vec<u32> = scan.found.iter().map(|t| t.1).collect();
    if parents.is_empty() {
        return;
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for c in far.iter().filter(|c| c.here && c.fds <= BIG_PROCESS_FDS) {
        if let Some(parent) = std::fs::read(format!("/proc/{}/stat", c.pid)).ok().and_then(|s| parent_pid(&s)) {
            children.entry(parent).or_default().push(c.pid);
        }
    }
    let mut searched: HashSet<u32> = HashSet::new();
    while let Some(parent) = parents.pop() {
        for pid in children.remove(&parent).unwrap_or_default() {
            let before = scan.found.len();
            search(pid, wanted, owned, scan);
            searched.insert(pid);
            if scan.found.len() > before {
                parents.push(pid); // a holder: its children next
            }
        }
    }
    far.retain(|c| !searched.contains(&c.pid));
}

fn search(pid: u32, wanted: &HashSet<u64>, owned: &mut HashSet<u64>, scan: &mut OwnerScan) {
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            scan.denied += 1;
            return;
        }
        Err(_) => return, // the process exited meanwhile
    };
    let mut here: Vec<Holding> = Vec::new();
    for fd in fds.flatten() {
        let Some(num) = std::str::from_utf8(fd.file_name().as_bytes()).ok().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        if let Some(inode) = socket_inode(target.as_os_str().as_bytes())
            && wanted.contains(&inode)
        {
            here.push((inode, pid, num));
        }
    }
    here.sort_unstable();
    here.dedup_by_key(|t| t.0);
    owned.extend(here.iter().map(|t| t.0));
    scan.found.extend(here);
}

fn pidfd_call(nr: libc::c_long, a: libc::c_long, b: libc::c_long, what: &str) -> Result<OwnedFd> {
    // SAFETY: pidfd_open(pid, 0) and pidfd_getfd(pidfd, fd, 0) take integers only and return a new
    // descriptor or -1; the descriptor is owned from here on.
    let fd = unsafe { libc::syscall(nr, a, b, 0 as libc::c_long) };
    if fd < 0 {
        return Err(Error::last_os(what));
    }
    // SAFETY: a fresh descriptor returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// (SO_REUSEADDR, SO_REUSEPORT) of the socket `inode` at descriptor `fd` of process `pid`, read from a
/// duplicate of that descriptor (pidfd_getfd, Linux 5.6+, needs ptrace rights over the process). This
/// reads the options without binding anything next to the socket, so its traffic is never touched.
pub fn reuse_flags(pid: u32, fd: u32, inode: u64) -> Result<(bool, bool)> {
    let pidfd = pidfd_call(libc::SYS_pidfd_open, libc::c_long::from(pid), 0, &format!("pidfd_open({pid})"))?;
    let dup = {
        use std::os::fd::AsRawFd;
        pidfd_call(
            libc::SYS_pidfd_getfd,
            libc::c_long::from(pidfd.as_raw_fd()),
            libc::c_long::from(fd),
            &format!("pidfd_getfd({pid}, {fd})"),
        )?
    };
    let st = fstat(&dup).map_err(|e| Error::Os { errno: e as i32, what: "fstat".into() })?;
    if st.st_ino != inode {
        return Err(Error::Os { errno: libc::ESRCH, what: format!("descriptor {fd} of pid {pid} changed") });
    }
    let opt = |r: nix::Result<bool>, name: &str| {
        r.map_err(|e| Error::Os { errno: e as i32, what: format!("getsockopt({name}) of pid {pid} fd {fd}") })
    };
    Ok((
        opt(getsockopt(&dup, sockopt::ReuseAddr), "SO_REUSEADDR")?,
        opt(getsockopt(&dup, sockopt::ReusePort), "SO_REUSEPORT")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_descriptor_table_size_from_a_status_text() {
        assert_eq!(fd_table_size(b"Name:\tpython\nFDSize:\t8192\nGroups:\n"), Some(8192));
        assert_eq!(fd_table_size(b"Name:\tx\n"), None);
        assert_eq!(fd_table_size(b"FDSize:\tlots\n"), None);
        let own = std::fs::read("/proc/self/status").expect("own status");
        assert!(fd_table_size(&own).is_some_and(|n| n >= 3));
    }

    #[test]
    fn reads_the_reuse_flags_of_a_held_socket() {
        use std::os::fd::AsRawFd;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
        sock.set_reuse_port(true).expect("SO_REUSEPORT");
        let inode = fstat(&sock).expect("fstat").st_ino;
        let me = std::process::id();
        let fd = sock.as_raw_fd() as u32;
        assert_eq!(reuse_flags(me, fd, inode).expect("own process"), (false, true));
        assert!(reuse_flags(me, fd, inode + 1).is_err(), "another inode at that descriptor");
    }

    #[test]
    fn reads_the_parent() {
        assert_eq!(parent_pid(b"42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid(b"42 (x"), None);
        let own = std::fs::read("/proc/self/stat").expect("own stat");
        assert_eq!(parent_pid(&own), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn inode_links() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        for bad in [&b"socket:[]"[..], b"pipe:[1]", b"socket:[1", b"socket:[-1]", b"socket:[99999999999999999999999]"] {
            assert_eq!(socket_inode(bad), None);
        }
    }

    proptest! {
        #[test]
        fn inode_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = socket_inode(&data);
        }

        #[test]
        fn stat_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parent_pid(&data);
        }
    }
}
