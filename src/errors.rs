//! One error type for the crate and its mapping onto Python exceptions.
//!
//! OS failures keep their errno: they become `OSError(errno, message)`, which Python's PEP 3151
//! dispatch turns into `PermissionError`, `ConnectionRefusedError`, ... as appropriate.

use std::fmt;
use std::io;

use pyo3::PyErr;
use pyo3::exceptions::{PyOSError, PyValueError};

#[derive(Debug)]
pub enum Error {
    /// A system call failed; `what` names the call and its argument.
    Os { errno: i32, what: String },
    /// An argument the caller passed is not acceptable.
    Invalid(String),
    /// Data read from the kernel did not have the expected shape.
    Malformed(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap the current `errno` (or an `io::Error`) with a description of what was attempted.
    pub fn os(err: io::Error, what: impl Into<String>) -> Self {
        Error::Os { errno: err.raw_os_error().unwrap_or(libc::EIO), what: what.into() }
    }

    pub fn last_os(what: impl Into<String>) -> Self {
        Self::os(io::Error::last_os_error(), what)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os { errno, what } => {
                write!(f, "{what}: {}", io::Error::from_raw_os_error(*errno))
            }
            Error::Invalid(msg) | Error::Malformed(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

/// The text of an errno without the " (os error N)" suffix Rust appends (Python shows errno itself).
pub fn reason(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Os { errno, ref what } => PyOSError::new_err((errno, format!("{what}: {}", reason(errno)))),
            Error::Invalid(msg) => PyValueError::new_err(msg),
            Error::Malformed(msg) => PyOSError::new_err((libc::EPROTO, msg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_call_and_reason() {
        let e = Error::Os { errno: libc::EADDRINUSE, what: "bind 127.0.0.1:80".into() };
        let text = e.to_string();
        assert!(text.starts_with("bind 127.0.0.1:80: "), "{text}");
        assert!(text.to_lowercase().contains("address already in use"), "{text}");
    }

    #[test]
    fn last_os_keeps_errno() {
        let e = Error::os(io::Error::from_raw_os_error(libc::EPERM), "x");
        match e {
            Error::Os { errno, .. } => assert_eq!(errno, libc::EPERM),
            other => panic!("unexpected {other:?}"),
        }
    }
}
