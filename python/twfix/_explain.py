"""Turning a failed bind into an explained AddressInUseError (enriched by the socket-table engine)."""

from __future__ import annotations

from twfix.errors import AddressInUseError


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def address_in_use(
    exc: OSError, *, protocol: str, host: str, ip: str, port: int, family: int, flags: int
) -> AddressInUseError:
    where = _fmt(ip, port)
    asked = f" (host {host!r})" if host not in ("", ip) else ""
    message = f"Address already in use: {where}/{protocol}{asked} is taken ({exc.strerror})"
    return AddressInUseError(message, address=(ip, port), protocol=protocol)
