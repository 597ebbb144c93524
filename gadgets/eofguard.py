"""Make gadgetron-python stop, not spin, when Gadgetron closes the connection early.

gadgetron-python 1.4.1 reads the configuration and the header in ``Connection.__init__``,
before the gadget's module is imported, and its socket wrapper loops forever on a closed
socket (``recv`` returns no bytes). When Gadgetron fails before it sends them (a header its
ISMRMRD library rejects, a node that fails to start), every Python child it launched then
spins at full CPU and the client waits for ever.

``cycguard-gadgetron.pth`` (installed into site-packages with CycGuard) calls
:func:`install` at interpreter start: a finder that, once ``gadgetron.external.connection``
is imported, replaces ``Connection.SocketWrapper.read`` with one that raises
``ConnectionError`` at end of stream. Nothing else of gadgetron-python changes, and nothing
is imported until gadgetron-python itself is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import socket
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

TARGET = "gadgetron.external.connection"


def read_or_raise(self: Any, nbytes: int) -> bytes:
    """``SocketWrapper.read`` that raises at end of stream instead of returning short reads."""
    chunks, remaining = [], nbytes
    while remaining:
        chunk = self.socket.recv(remaining, socket.MSG_WAITALL)
        if not chunk:
            raise ConnectionError(f"Gadgetron closed the connection with {remaining} of {nbytes} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def patch(module: ModuleType) -> None:
    """Give a loaded ``gadgetron.external.connection`` the EOF-safe read."""
    module.Connection.SocketWrapper.read = read_or_raise


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Patch gadgetron-python now if it is loaded, else when it is."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
