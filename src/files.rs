//! The one file operation the standard library lacks for safe config writes: `renameat2(2)` inside a
//! directory descriptor, refusing to replace (`RENAME_NOREPLACE`) or swapping two names atomically
//! (`RENAME_EXCHANGE`), so a caller can look at what it displaced and put it back.

use std::os::fd::BorrowedFd;

use nix::fcntl::{RenameFlags, renameat2};
use pyo3::prelude::*;

use crate::errors::{Error, Result};

fn component(name: &str) -> Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::Invalid(format!("{name:?} is not a plain file name")));
    }
    Ok(name)
}

/// Rename `old` to `new` inside the directory `dir_fd`: without replacing anything, or by exchanging
/// the two names (both must exist).
pub fn rename_in(dir_fd: BorrowedFd<'_>, old: &str, new: &str, exchange: bool) -> Result<()> {
    let flags = if exchange { RenameFlags::RENAME_EXCHANGE } else { RenameFlags::RENAME_NOREPLACE };
    renameat2(dir_fd, component(old)?, dir_fd, component(new)?, flags)
        .map_err(|e| Error::Os { errno: e as i32, what: format!("rename {old} -> {new}") })
}

/// `renameat2(dir_fd, old, dir_fd, new, RENAME_EXCHANGE if exchange else RENAME_NOREPLACE)`.
#[pyfunction]
#[pyo3(signature = (dir_fd, old, new, exchange=false))]
pub fn rename_at(py: Python<'_>, dir_fd: i32, old: String, new: String, exchange: bool) -> PyResult<()> {
    if dir_fd < 0 {
        return Err(Error::Invalid(format!("invalid directory descriptor {dir_fd}")).into());
    }
    // SAFETY: the caller's descriptor stays open for this call (Python holds it); we only borrow it.
    let dir = unsafe { BorrowedFd::borrow_raw(dir_fd) };
    Ok(py.detach(|| rename_in(dir, &old, &new, exchange))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn no_replace_and_exchange() {
        let dir = std::env::temp_dir().join(format!("twfix-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a"), "A").expect("a");
        std::fs::write(dir.join("b"), "B").expect("b");
        let d = std::fs::File::open(&dir).expect("open dir");
        let err = rename_in(d.as_fd(), "a", "b", false).expect_err("b exists");
        assert!(matches!(err, Error::Os { errno: libc::EEXIST, .. }));
        rename_in(d.as_fd(), "a", "b", true).expect("exchange");
        assert_eq!(std::fs::read_to_string(dir.join("a")).expect("a"), "B");
        assert_eq!(std::fs::read_to_string(dir.join("b")).expect("b"), "A");
        assert!(matches!(rename_in(d.as_fd(), "../x", "b", false), Err(Error::Invalid(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
