//! Native core of twfix: syscalls, netlink, /proc parsing and aggregation.
//!
//! The Python package `twfix` owns the public API; this module stays small and primitive-typed.
//! twfix is Linux-only: sock_diag, /proc/net, /proc/sys and network namespaces are Linux interfaces.

#[cfg(not(target_os = "linux"))]
compile_error!("twfix supports Linux only (it reads sock_diag, /proc/net and /proc/sys)");

pub mod diag;
pub mod errors;
pub mod files;
pub mod netns;
pub mod sockets;
pub mod sysctl;

use pyo3::prelude::*;

#[pymodule]
mod _twfix {
    use super::*;

    #[pymodule_export]
    use crate::sockets::{bind_socket, make_reusable, probe_bind};

    #[pymodule_export]
    use crate::diag::py::{
        dump_entries, listeners_in, netlink_discard, read_proc_net, read_proc_net_each, snapshot, socket_owners,
        socket_reuse_flags,
    };

    #[pymodule_export]
    use crate::files::rename_at;

    #[pymodule_export]
    use crate::sysctl::{fresh_netns_sysctls, read_sysctls, sysctl_key, write_sysctl};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("F_REUSE_ADDR", sockets::REUSE_ADDR)?;
        m.add("F_REUSE_PORT", sockets::REUSE_PORT)?;
        m.add("F_V6ONLY", sockets::V6ONLY)?;
        m.add("F_DUALSTACK", sockets::DUALSTACK)?;
        m.add("F_BIND_NO_PORT", sockets::BIND_NO_PORT)?;
        m.add("F_NO_BIND", sockets::NO_BIND)?;
        Ok(())
    }
}
