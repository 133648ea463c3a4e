"""The exception hierarchy of twfix.

Every error twfix raises on purpose derives from :class:`TwfixError`. Address conflicts are
:class:`AddressInUseError`, which is also a stdlib :class:`OSError` with ``errno == EADDRINUSE``
so existing ``except OSError`` code keeps working.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twfix.explanation import Explanation

__all__ = ["AddressInUseError", "KernelCannotTellWarning", "TwfixError", "UnsupportedPlatformError"]


class TwfixError(Exception):
    """Root of the exceptions raised by twfix itself."""


class KernelCannotTellWarning(UserWarning):
    """The running kernel cannot show part of what was asked (bound-only sockets before Linux 6.8, say):
    the answer leaves that part out, and this warning says which part and why."""


class UnsupportedPlatformError(TwfixError, NotImplementedError):
    """Kept for code written against earlier releases: twfix is Linux-only now, and ``import twfix``
    elsewhere raises ImportError instead. Nothing in twfix raises it."""


class AddressInUseError(OSError, TwfixError):
    """A bind or listen failed with EADDRINUSE; the message says which address and why.

    Attributes:
        address: the ``(host, port)`` that was asked for.
        protocol: ``"tcp"`` or ``"udp"``.
        explanation: a :class:`twfix.Explanation` of the conflict when the socket table could be read,
            else ``None``.
    """

    address: tuple[str, int]
    protocol: str
    explanation: Explanation | None

    def __init__(
        self,
        message: str,
        *,
        address: tuple[str, int],
        protocol: str,
        explanation: Explanation | None = None,
    ) -> None:
        super().__init__(_errno.EADDRINUSE, message)
        self.address = address
        self.protocol = protocol
        self.explanation = explanation

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_address_in_use, (self.strerror, self.address, self.protocol, self.explanation))


def _rebuild_address_in_use(
    message: str, address: tuple[str, int], protocol: str, explanation: Explanation | None
) -> AddressInUseError:
    return AddressInUseError(message, address=address, protocol=protocol, explanation=explanation)
