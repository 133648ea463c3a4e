//! Native core of twfix: syscalls, netlink, /proc parsing and aggregation.
//!
//! The Python package `twfix` owns the public API; this module stays small and primitive-typed.

#[cfg(target_os = "linux")]
pub mod diag;
pub mod errors;
pub mod sockets;
#[cfg(target_os = "linux")]
pub mod sysctl;

use pyo3::prelude::*;

#[pymodule]
mod _twfix {
    use super::*;

    #[cfg(unix)]
    #[pymodule_export]
    use crate::sockets::{bind_socket, make_reusable};

    #[cfg(target_os = "linux")]
    #[pymodule_export]
    use crate::diag::{dump_entries, ephemeral_usage, py_netlink_discard, socket_owners, summarize};

    #[cfg(target_os = "linux")]
    #[pymodule_export]
    use crate::sysctl::{read_sysctls, sysctl_path, write_sysctl};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("F_REUSE_ADDR", sockets::REUSE_ADDR)?;
        m.add("F_REUSE_PORT", sockets::REUSE_PORT)?;
        m.add("F_V6ONLY", sockets::V6ONLY)?;
        m.add("F_DUALSTACK", sockets::DUALSTACK)?;
        m.add("F_BIND_NO_PORT", sockets::BIND_NO_PORT)?;
        m.add("F_EXCLUSIVE", sockets::EXCLUSIVE)?;
        m.add("F_NO_BIND", sockets::NO_BIND)?;
        Ok(())
    }
}
