# Hand-written stub of the native module; checked by `python -m mypy.stubtest twfix._twfix`.

from typing import Any

__all__ = [
    "F_BIND_NO_PORT",
    "F_DUALSTACK",
    "F_NO_BIND",
    "F_REUSE_ADDR",
    "F_REUSE_PORT",
    "F_V6ONLY",
    "__version__",
    "bind_socket",
    "dump_entries",
    "fresh_netns_sysctls",
    "listeners_in",
    "make_reusable",
    "netlink_discard",
    "probe_bind",
    "read_proc_net",
    "read_proc_net_each",
    "read_sysctls",
    "rename_at",
    "snapshot",
    "socket_owners",
    "socket_reuse_flags",
    "sysctl_key",
    "write_sysctl",
]
__version__: str

F_REUSE_ADDR: int
F_REUSE_PORT: int
F_V6ONLY: int
F_DUALSTACK: int
F_BIND_NO_PORT: int
F_NO_BIND: int

def bind_socket(
    fd: int,
    family: int,
    sotype: int,
    ip: str,
    port: int,
    scope_id: int,
    flags: int,
    backlog: int,
    multicast_group: str | None = None,
) -> None: ...
def make_reusable(fd: int, flags: int) -> None: ...
def probe_bind(family: int, sotype: int, ip: str, port: int, flags: int, netns: str | None = None) -> int: ...

# Socket table.
def dump_entries(
    proto: str,
    states: int,
    port: int | None,
    source: str,
    entry_cls: type[Any],
    addr_cls: type[Any],
    families: list[Any],
    state_objs: list[Any],
    netns: str | None = None,
) -> list[Any]: ...
def snapshot(
    proto: str,
    states: int,
    top: int,
    ephemeral: bytes,
    usage: bool,
    source: str = "auto",
    netns: str | None = None,
    usage_limit: int = 0,
) -> tuple[
    int,
    list[tuple[int, int]],
    list[tuple[int, int, int]],
    list[tuple[int, int, str, int, int]],
    list[int],
    int,
    list[tuple[int, str, int, int, int, bool | None]],
    list[tuple[int, str, str, int, int, int]],
    bool,
    int,
]: ...
def listeners_in(proto: str, port: int, netns: str | None = None) -> list[tuple[int, str, int]]: ...
def read_proc_net(names: list[str], netns: str | None = None) -> list[str | None]: ...
def read_proc_net_each(names: list[str], netns: list[str | None]) -> list[list[str | None] | None]: ...
def socket_owners(
    inodes: list[int], netns: int | None = None, uids: list[int] = ...
) -> tuple[list[tuple[int, int, int]], int, int, int]: ...
def socket_reuse_flags(pid: int, fd: int, inode: int) -> tuple[bool, bool]: ...
def netlink_discard(proto: str, states: int, one_walk: bool = False) -> int: ...

# Sysctls: (canonical key, raw text or None for knobs the running kernel lacks, (errno, message) if unreadable).
def read_sysctls(
    names: list[str], netns: str | None = None
) -> list[tuple[str, str | None, tuple[int, str] | None]]: ...
def fresh_netns_sysctls(names: list[str]) -> list[tuple[str, str | None]]: ...
def write_sysctl(name: str, value: str) -> str | None: ...
def sysctl_key(name: str) -> tuple[str, str]: ...

# Files: renameat2 inside a directory descriptor (RENAME_EXCHANGE if exchange else RENAME_NOREPLACE).
def rename_at(dir_fd: int, old: str, new: str, exchange: bool = False) -> None: ...
