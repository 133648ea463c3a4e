//! Socket inode -> processes, from the /proc/PID/fd links (what `ss -p`, `lsof` and `fuser` read).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;

use crate::errors::{Error, Result};

/// Parse the target of a /proc/PID/fd symlink: `socket:[INODE]`.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let inner = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if inner.is_empty() || inner.len() > 20 || !inner.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Every (inode, pid) pair for the wanted inodes: a socket inherited across fork() is held by every
/// process that has it open (a prefork server's master and workers), so the whole of /proc is read.
/// Also returns how many processes could not be inspected (permission). Threads share their process's
/// descriptor table, so /proc/PID covers them.
pub fn owners(inodes: &[u64]) -> Result<(Vec<(u64, u32)>, u64)> {
    let wanted: HashSet<u64> = inodes.iter().copied().filter(|&i| i != 0).collect();
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
        let mut seen_here: HashSet<u64> = HashSet::new();
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if let Some(inode) = socket_inode(target.as_os_str().as_bytes())
                && wanted.contains(&inode)
                && seen_here.insert(inode)
            {
                found.push((inode, pid));
            }
        }
    }
    found.sort_unstable();
    Ok((found, denied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    }
}
