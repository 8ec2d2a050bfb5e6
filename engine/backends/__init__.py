"""Backends run the networks. One small class per backend, chosen by `select_backend`.

This issue ships the CPU path (`torch` on CPU); GPU backends (`cuda`, `tensorrt`) plug in here with the
same three methods, so the tracker never knows which one runs.
"""
from __future__ import annotations

from engine.backends.torch_backend import TorchBackend

BACKENDS = {"torch": TorchBackend}


def select_backend(name: str = "auto", threads: int | None = None):
    """'auto' picks the best available backend; an explicit name must exist or raises ValueError."""
    if name == "auto":
        return TorchBackend(device="cpu", threads=threads)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](threads=threads)
