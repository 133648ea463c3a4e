//! Sysctl names <-> /proc/sys paths, raw reads and writes, optionally inside another network
//! namespace (entered by a short-lived thread, so the caller's other threads never move).

use std::io::{Read, Write};
use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::{Error, Result};

const ROOT: &str = "/proc/sys";
const MAX_NAME: usize = 255;
const MAX_VALUE: usize = 64 * 1024;

fn segment_ok(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg.len() <= 64
        && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'+'))
}

/// Split a name into its /proc/sys path segments, the way sysctl(8) reads names: the first separator
/// decides. `net.ipv4.conf.eth0/100.rp_filter` (dotted, with `/` standing for a dot inside a segment)
/// and `net/ipv4/conf/eth0.100/rp_filter` (slashed) both name the knob of interface `eth0.100`.
pub fn segments(name: &str) -> Result<Vec<String>> {
    let invalid = |why: &str| Error::Invalid(format!("invalid sysctl name {:?}: {why}", truncate(name)));
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid("too long"));
    }
    if name.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    if name.starts_with('/') || name.starts_with('.') {
        return Err(invalid("must be relative to /proc/sys (no leading '/' or '.')"));
    }
    let dotted = name.find(['.', '/']).is_none_or(|at| name.as_bytes()[at] == b'.');
    let parts: Vec<String> = if dotted {
        name.split('.').map(|s| s.replace('/', ".")).collect()
    } else {
        name.split('/').map(str::to_owned).collect()
    };
    for seg in &parts {
        if seg.is_empty() {
            return Err(invalid("empty segment"));
        }
        if seg == "." || seg == ".." {
            return Err(invalid("'.' and '..' are not allowed"));
        }
        if !segment_ok(seg) {
            return Err(invalid("only letters, digits and _-.:@+ are allowed"));
        }
    }
    Ok(parts)
}

/// The path of a name relative to /proc/sys.
pub fn relative_path(name: &str) -> Result<String> {
    Ok(segments(name)?.join("/"))
}

/// The canonical dotted key of a name (sysctl(8)'s form): segments joined by '.', a dot inside a
/// segment written as '/'. `key(key(n)) == key(n)`, and both name the same path.
pub fn key(name: &str) -> Result<String> {
    Ok(segments(name)?.iter().map(|s| s.replace('.', "/")).collect::<Vec<_>>().join("."))
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Full path, checked to resolve (through any symlink) inside /proc/sys. `Ok(None)` when absent.
pub fn resolve(name: &str) -> Result<Option<PathBuf>> {
    let rel = relative_path(name)?;
    let path = PathBuf::from(ROOT).join(&rel);
    match std::fs::canonicalize(&path) {
        Ok(canonical) => {
            if !canonical.starts_with(ROOT) || canonical == std::path::Path::new(ROOT) {
                return Err(Error::Invalid(format!("sysctl name {name:?} resolves outside /proc/sys")));
            }
            if canonical.is_dir() {
                return Err(Error::Invalid(format!("{name:?} is a sysctl directory, not a knob")));
            }
            Ok(Some(canonical))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(Error::os(e, format!("resolve {}", path.display()))),
    }
}

fn read_one(name: &str) -> Result<Option<String>> {
    let Some(path) = resolve(name)? else { return Ok(None) };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::os(e, format!("open {}", path.display()))),
    };
    let mut buf = Vec::new();
    Read::by_ref(&mut file)
        .take(MAX_VALUE as u64)
        .read_to_end(&mut buf)
        .map_err(|e| Error::os(e, format!("read {}", path.display())))?;
    Ok(Some(String::from_utf8_lossy(&buf).trim_end_matches('\n').to_owned()))
}

fn write_one(name: &str, value: &str) -> Result<Option<String>> {
    if value.len() > MAX_VALUE || value.contains('\0') {
        return Err(Error::Invalid(format!("invalid value for {name}")));
    }
    let before = read_one(name)?;
    let Some(path) = resolve(name)? else {
        return Err(Error::Os { errno: libc::ENOENT, what: format!("sysctl {name} does not exist on this kernel") });
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::os(e, format!("open {} for writing", path.display())))?;
    file.write_all(value.as_bytes()).map_err(|e| Error::os(e, format!("write {value:?} to {name}")))?;
    Ok(before)
}

/// Read raw values (None for knobs the kernel lacks), in `netns` when given; one knob that cannot be
/// read is an error for that knob only.
pub fn read_many(names: Vec<String>, netns: Option<String>) -> Result<Vec<Result<Option<String>>>> {
    crate::netns::run(netns, move || Ok(names.iter().map(|n| read_one(n)).collect()))
}

/// Raw values as a network namespace created now would start with (the kernel's defaults for a new
/// namespace), read on a thread that unshares one; OSError when this process may not create namespaces.
#[pyfunction]
pub fn fresh_netns_sysctls(py: Python<'_>, names: Vec<String>) -> PyResult<Vec<(String, Option<String>)>> {
    let keys = names.iter().map(|n| key(n)).collect::<Result<Vec<_>>>()?;
    let values =
        py.detach(|| crate::netns::run_fresh(move || names.iter().map(|n| read_one(n)).collect::<Result<Vec<_>>>()))?;
    Ok(keys.into_iter().zip(values).collect())
}

/// One knob as read: (canonical key, raw value or None when absent, (errno, message) when unreadable).
pub type PyKnob = (String, Option<String>, Option<(i32, String)>);

/// Each name read, in `netns` when given. Hostile names raise ValueError before anything is read.
#[pyfunction]
#[pyo3(signature = (names, netns=None))]
pub fn read_sysctls(py: Python<'_>, names: Vec<String>, netns: Option<String>) -> PyResult<Vec<PyKnob>> {
    // Validate up front so bad names fail before any namespace switch.
    let keys = names.iter().map(|n| key(n)).collect::<Result<Vec<_>>>()?;
    let values = py.detach(|| read_many(names, netns))?;
    // A name that is not a knob (a directory, a path leaving /proc/sys) is the caller's mistake.
    if let Some(Err(Error::Invalid(msg))) = values.iter().find(|v| matches!(v, Err(Error::Invalid(_)))) {
        return Err(Error::Invalid(msg.clone()).into());
    }
    Ok(keys
        .into_iter()
        .zip(values)
        .map(|(k, v)| match v {
            Ok(raw) => (k, raw, None),
            Err(Error::Os { errno, what }) => {
                (k, None, Some((errno, format!("{what}: {}", crate::errors::reason(errno)))))
            }
            Err(other) => (k, None, Some((libc::EIO, other.to_string()))),
        })
        .collect())
}

/// Write one knob in the caller's namespace; returns the previous raw value.
#[pyfunction]
pub fn write_sysctl(py: Python<'_>, name: String, value: String) -> PyResult<Option<String>> {
    relative_path(&name)?;
    Ok(py.detach(move || write_one(&name, &value))?)
}

/// (canonical dotted key, /proc/sys path) of a name; raises ValueError for a hostile one.
#[pyfunction]
pub fn sysctl_key(name: &str) -> PyResult<(String, String)> {
    Ok((key(name)?, format!("{ROOT}/{}", relative_path(name)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_dotted_and_slashed_names() {
        assert_eq!(relative_path("net.ipv4.tcp_tw_reuse").expect("ok"), "net/ipv4/tcp_tw_reuse");
        assert_eq!(relative_path("net/ipv4/tcp_tw_reuse").expect("ok"), "net/ipv4/tcp_tw_reuse");
        assert_eq!(relative_path("net/ipv4/conf/eth0.100/rp_filter").expect("ok"), "net/ipv4/conf/eth0.100/rp_filter");
        assert_eq!(relative_path("net.ipv4.conf.eth0/100.rp_filter").expect("ok"), "net/ipv4/conf/eth0.100/rp_filter");
        assert_eq!(key("net/ipv4/conf/eth0.100/rp_filter").expect("ok"), "net.ipv4.conf.eth0/100.rp_filter");
        assert_eq!(key("net.ipv4.tcp_tw_reuse").expect("ok"), "net.ipv4.tcp_tw_reuse");
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            "../../etc/passwd",
            "/etc/passwd",
            "net..ipv4",
            "net.ipv4.tcp_tw_reuse\0",
            "net/ipv4/../../../etc",
            "net/./ipv4",
            ".hidden",
            "net//ipv4",
            "net.ipv4.tcp tw",
            "net/ipv4/*",
        ] {
            assert!(matches!(relative_path(bad), Err(Error::Invalid(_))), "{bad:?}");
        }
        assert!(relative_path(&"a".repeat(300)).is_err());
    }

    #[test]
    fn reads_present_and_absent_knobs() {
        assert!(read_one("kernel.ostype").expect("readable").is_some());
        let many = read_many(vec!["kernel.ostype".into(), "net.ipv4.tcp_tw_recycle".into()], None).expect("read");
        assert!(matches!(many.as_slice(), [Ok(Some(_)), Ok(None)]));
        assert_eq!(read_one("net.ipv4.tcp_tw_recycle").expect("absent is not an error"), None);
        assert!(matches!(resolve("net.ipv4"), Err(Error::Invalid(_))), "directories are not knobs");
    }

    proptest! {
        #[test]
        fn validated_paths_stay_inside(name in "[a-z0-9_./:-]{0,40}") {
            if let Ok(rel) = relative_path(&name) {
                prop_assert!(!rel.starts_with('/'));
                prop_assert!(rel.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
            }
        }

        #[test]
        fn keys_are_canonical(name in "[a-z0-9_./]{1,40}") {
            if let Ok(k) = key(&name) {
                prop_assert_eq!(key(&k).expect("a key is a valid name"), k.clone());
                prop_assert_eq!(relative_path(&k).expect("valid"), relative_path(&name).expect("valid"));
            }
        }

        #[test]
        fn arbitrary_input_never_panics(name in any::<String>()) {
            let _ = relative_path(&name);
        }
    }
}
