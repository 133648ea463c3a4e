"""twfix: safe address reuse, TIME-WAIT diagnostics and sysctl insight.

Start with :func:`reusable_tcp_server`, :func:`reusable_udp` and :func:`reusable_tcp_client`, which
return ordinary :class:`socket.socket` objects, and with ``twfix doctor`` on the command line.
"""

from __future__ import annotations

import sys as _sys

if not _sys.platform.startswith("linux"):  # pragma: no cover - CI is Linux; the crate builds only there
    raise ImportError(
        f"twfix supports Linux only (it reads sock_diag, /proc/net and /proc/sys); this is {_sys.platform}"
    )

from typing import Any

from twfix import _ipython, features, sysctl, tune
from twfix._twfix import __version__
from twfix.conflict import Explanation, explain
from twfix.diag import Addr, EphemeralUsage, SocketEntry, SocketSummary, TcpState, ephemeral_usage, sockets, summary
from twfix.doctor import doctor
from twfix.errors import AddressInUseError, KernelCannotTellWarning, TwfixError, UnsupportedPlatformError
from twfix.findings import Finding, Report, Severity
from twfix.owners import Holders, PortHolder, who_holds
from twfix.reusable import make_reusable, reusable_tcp_client, reusable_tcp_server, reusable_tcp_servers, reusable_udp
from twfix.watch import Watch, watch

__all__ = [
    "Addr",
    "AddressInUseError",
    "EphemeralUsage",
    "Explanation",
    "Finding",
    "Holders",
    "KernelCannotTellWarning",
    "PortHolder",
    "Report",
    "Severity",
    "SocketEntry",
    "SocketSummary",
    "TcpState",
    "TwfixError",
    "UnsupportedPlatformError",
    "Watch",
    "__version__",
    "doctor",
    "ephemeral_usage",
    "explain",
    "features",
    "make_reusable",
    "reusable_tcp_client",
    "reusable_tcp_server",
    "reusable_tcp_servers",
    "reusable_udp",
    "sockets",
    "summary",
    "sysctl",
    "tune",
    "watch",
    "who_holds",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext twfix``: registers the ``%twfix`` line magic (``%twfix doctor``, ``%twfix explain 8080``)."""
    _ipython.load(ipython)
