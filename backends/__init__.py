"""Backends by name. A registry is a dict; backends with heavy imports load on first use."""

from __future__ import annotations

import importlib

from .base import Backend, JobContext, PruneResult

BACKENDS: dict[str, str] = {
    "scratch": "backends.scratch:ScratchBackend",
    "nni": "backends.nni_backend:NNIBackend",
    "tp": "backends.tp_backend:TorchPruningBackend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "JobContext", "PruneResult", "get_backend"]
