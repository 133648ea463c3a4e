# Hand-written stub of the native module; checked by `python -m mypy.stubtest twfix._twfix`.

__all__ = [
    "F_BIND_NO_PORT",
    "F_DUALSTACK",
    "F_EXCLUSIVE",
    "F_NO_BIND",
    "F_REUSE_ADDR",
    "F_REUSE_PORT",
    "F_V6ONLY",
    "__version__",
    "bind_socket",
    "make_reusable",
]
__version__: str

F_REUSE_ADDR: int
F_REUSE_PORT: int
F_V6ONLY: int
F_DUALSTACK: int
F_BIND_NO_PORT: int
F_EXCLUSIVE: int
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
