"""A private network namespace for the calling thread (the pytest plugin's ``twfix_netns``): enter one
with loopback up, and come back. Private to the plugin, and free of pytest itself."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import os
import socket
import struct
from typing import Final

from twfix import _twfix

__all__ = ["NetworkNamespace", "enter", "leave", "unavailable"]

_CLONE_NEWNET: Final = 0x40000000


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc, loaded the first time a namespace is made (never on the plugin's import)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetworkNamespace:
    """The private network namespace a test runs in; its sysctls start at kernel defaults."""

    def sysctl(self, name: str, value: object) -> None:
        """Set a knob in this namespace only (any knob under /proc/sys/net): ``netns.sysctl(
        "net.ipv4.tcp_tw_reuse", 0)``, ``netns.sysctl("net.ipv4.ip_local_port_range", (40000, 40009))``."""
        text = " ".join(str(v) for v in value) if isinstance(value, tuple | list) else str(value)
        self.write_sysctl(name, text)

    def write_sysctl(self, name: str, text: str) -> None:
        path = _twfix.sysctl_key(name)[1]
        if not path.startswith("/proc/sys/net/"):
            raise ValueError(f"{name} is not a per-namespace network knob (/proc/sys/net/...)")
        with open(path, "w") as f:
            f.write(text + "\n")  # an empty string alone would never reach the kernel

    def read_sysctl(self, name: str) -> str:
        with open(_twfix.sysctl_key(name)[1]) as f:
            return f.read().strip()


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to create a private network namespace"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "no network namespaces here"
    return None


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, struct.pack("16sH14x", b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def enter() -> int:
    """Move the calling thread into a fresh network namespace with loopback up; returns a descriptor of
    the namespace it left (for :func:`leave`). OSError when the kernel refuses."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc().unshare(_CLONE_NEWNET) != 0:
        errno_ = ctypes.get_errno()
        os.close(original)
        raise OSError(errno_, os.strerror(errno_))
    try:
        _loopback_up()
    except OSError:
        leave(original)
        raise
    return original


def leave(original: int) -> None:
    """Back to the namespace :func:`enter` left; closes its descriptor."""
    try:
        if _libc().setns(original, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the test's original network namespace failed")
    finally:
        os.close(original)
