"""Run a function on a module right after it is first imported (a meta-path finder wrapping the real
loader): how ``--twfix-ports`` routes free-port helpers without importing them on the suite's behalf."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["RouteOnImport"]


class RouteOnImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` right after one of the named modules is first executed."""

    def __init__(self, waiting: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.waiting = waiting

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        then = self.waiting.get(fullname)
        if then is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = ThenLoader(spec.loader, then)
                return spec
            if spec is not None:
                return spec
        return None


class ThenLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, then: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
