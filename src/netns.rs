//! Running work inside another network namespace, on a short-lived thread that joins it (`setns`),
//! so the caller's threads never move. Namespace files are opened without blocking (a FIFO put in
//! their place cannot hang the call) and must be network namespaces.

use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::Mode;

use crate::errors::{Error, Result};

/// Open a namespace file: read-only, non-blocking, close-on-exec.
fn open_ns(path: &str) -> Result<OwnedFd> {
    if path.is_empty() || path.contains('\0') {
        return Err(Error::Invalid(format!("invalid namespace path {path:?}")));
    }
    open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::Os { errno: e as i32, what: format!("open namespace {path}") })
}

/// Move the calling thread into the network namespace `ns` (opened from `path`, named in errors).
fn enter(ns: &OwnedFd, path: &str) -> Result<()> {
    match setns(ns, CloneFlags::CLONE_NEWNET) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => Err(Error::Invalid(format!("{path} is not a network namespace"))),
        Err(e) => Err(Error::Os { errno: e as i32, what: format!("setns({path})") }),
    }
}

/// Run `f` in a new thread that first joins the network namespace at `path`.
pub fn run_in<T: Send + 'static>(path: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let ns = open_ns(path)?; // opened here: a path that cannot be opened fails before a thread is made
    let path = path.to_owned();
    let handle = std::thread::Builder::new()
        .name("twfix-netns".into())
        .spawn(move || enter(&ns, &path).and_then(|()| f()))
        .map_err(|e| Error::os(e, "spawn a thread to enter the namespace"))?;
    handle.join().map_err(|_| Error::Malformed("namespace thread panicked".into()))?
}

/// Run `f` once in each namespace of `paths` (None: the caller's), one after the other on one new thread
/// that joins each in turn: one thread for many namespaces, where `run_in` per namespace paid a thread
/// each (about 0.1 ms: 5 ms of a 50-namespace metrics scrape). Each namespace gets its own result; the
/// thread never comes back to the caller, it ends. The caller's namespace is read first, before any move.
pub fn run_in_each<T: Send + 'static>(
    paths: Vec<Option<String>>,
    f: impl Fn() -> Result<T> + Send + 'static,
) -> Result<Vec<Result<T>>> {
    let handle = std::thread::Builder::new()
        .name("twfix-netns-each".into())
        .spawn(move || -> Vec<Result<T>> {
            let mut out: Vec<Option<Result<T>>> = paths.iter().map(|_| None).collect();
            for (i, _) in paths.iter().enumerate().filter(|(_, p)| p.is_none()) {
                out[i] = Some(f());
            }
            for (i, path) in paths.iter().enumerate() {
                let Some(path) = path else { continue };
                out[i] = Some(open_ns(path).and_then(|ns| enter(&ns, path)).and_then(|()| f()));
            }
            out.into_iter().map(|r| r.unwrap_or_else(|| Err(Error::Malformed("namespace not read".into())))).collect()
        })
        .map_err(|e| Error::os(e, "spawn a thread to enter the namespaces"))?;
    handle.join().map_err(|_| Error::Malformed("namespace thread panicked".into()))
}

/// Run `f` in a new thread that first makes a network namespace of its own (`unshare`), which the kernel
/// frees when the thread ends. What `f` reads there is what every new namespace starts with.
pub fn run_fresh<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let handle = std::thread::Builder::new()
        .name("twfix-fresh-netns".into())
        .spawn(move || -> Result<T> {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Os { errno: e as i32, what: "unshare(CLONE_NEWNET)".into() })?;
            f()
        })
        .map_err(|e| Error::os(e, "spawn a thread for a fresh namespace"))?;
    handle.join().map_err(|_| Error::Malformed("namespace thread panicked".into()))?
}

/// Run `f` here, or in the namespace at `path` when one is given.
pub fn run<T: Send + 'static>(path: Option<String>, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match path {
        None => f(),
        Some(p) => run_in(&p, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_that_are_not_namespaces_without_hanging() {
        let dir = std::env::temp_dir().join(format!("twfix-ns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo");
        let err = run_in(fifo.to_str().expect("utf-8"), || Ok(())).expect_err("a FIFO is not a namespace");
        assert!(matches!(err, Error::Invalid(ref m) if m.contains("not a network namespace")), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(run_in("", || Ok(())), Err(Error::Invalid(_))));
        assert!(matches!(run_in("/nonexistent/ns", || Ok(())), Err(Error::Os { errno: libc::ENOENT, .. })));
    }

    #[test]
    fn each_namespace_gets_its_own_result_in_the_order_asked() {
        let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let own = own.expect("own namespace");
        let paths = vec![Some("/nonexistent/ns".to_owned()), None, Some("/proc/self/ns/net".to_owned()), None];
        let got = run_in_each(paths, || {
            std::fs::metadata("/proc/thread-self/ns/net")
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|e| Error::os(e, "stat"))
        })
        .expect("a thread");
        assert!(matches!(got[0], Err(Error::Os { errno: libc::ENOENT, .. })), "{:?}", got[0]);
        // Entering a namespace (setns needs CAP_SYS_ADMIN) may be refused; the caller's own never is.
        assert_eq!(got[1].as_ref().ok(), Some(&own));
        assert!(got[2].as_ref().map_or(true, |ino| *ino == own));
        assert_eq!(got[3].as_ref().ok(), Some(&own));
    }
}
