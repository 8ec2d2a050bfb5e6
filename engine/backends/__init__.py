"""Backends run the networks. One small class per backend, chosen by `select_backend`.

`torch` (CPU), `cuda` (torch on an NVIDIA GPU with CUDA graphs per batch bucket) and `tensorrt`
(torch-tensorrt engines, fp16, dynamic batch, cached on disk) share three methods (prepare, tensor, run)
plus describe, so the tracker never knows which one runs. GPU libraries are imported only when a GPU
backend is asked for or probed: everything imports on a CPU-only machine.
"""
from __future__ import annotations

import os

from engine.backends.cuda_backend import BackendUnavailableError, CudaBackend, cuda_unavailable_reason
from engine.backends.tensorrt_backend import TensorRTBackend, tensorrt_unavailable_reason
from engine.backends.torch_backend import TorchBackend

BACKENDS = {"torch": TorchBackend, "cuda": CudaBackend, "tensorrt": TensorRTBackend}
PREFERENCE = ("tensorrt", "cuda", "torch")  # what 'auto' tries, best first
ENV_OVERRIDE = "FACESTREAM_BACKEND"  # overrides 'auto' (e.g. for the server); an explicit name wins over it


def backend_status() -> dict[str, str | None]:
    """name -> None when the backend can run here, else the reason it cannot."""
    return {"tensorrt": tensorrt_unavailable_reason(), "cuda": cuda_unavailable_reason(), "torch": None}


def select_backend(name: str = "auto", threads: int | None = None):
    """'auto' picks the best available backend (tensorrt > cuda > torch; $FACESTREAM_BACKEND overrides it);
    an explicit name must exist (ValueError) and be usable here (BackendUnavailableError, a ValueError whose
    message says why)."""
    if name == "auto" and os.environ.get(ENV_OVERRIDE):
        name = os.environ[ENV_OVERRIDE]
    if name == "auto":
        status = backend_status()
        name = next(n for n in PREFERENCE if status[n] is None)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; available: auto, {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](threads=threads)


__all__ = ["BACKENDS", "PREFERENCE", "BackendUnavailableError", "CudaBackend", "TensorRTBackend", "TorchBackend",
           "backend_status", "select_backend"]
