"""A batched torch function captured in one CUDA graph per padded batch size.

The batched solvers (the landmark fit, the PRDL refinement) are hundreds of small kernels: on a GPU their time
is launch overhead unless the whole call is one graph launch. A solver written without host reads (no
``.item()``, no ``nonzero``, no data-dependent shapes) is captured once per bucket (1, 2, 4, ... 128 faces):
inputs are copied into static tensors whose padding rows repeat the first face (so they stay finite), the
graph is replayed, the first B rows of each output are the answer. Batches above the largest bucket, and
buckets whose capture failed (recorded with the reason), run eagerly.
"""
from __future__ import annotations

import threading
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# torch picks MAGMA's batched LU for larger batches (32 faces on an H200), which a graph cannot hold; cuSOLVER /
# cuBLAS batched LU can be captured. The preference is process-wide: one capture at a time, warm-up and capture
# both under this lock, the old preference restored after.
_LINALG_PREFERENCE_LOCK = threading.Lock()


def canonical_device(device) -> torch.device:
    """One name per device: "cuda" and "cuda:0" are the same GPU, so they share one solver and one set of graphs."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def bucket_for(batch: int) -> int | None:
    """The smallest bucket holding ``batch`` faces, or None above the largest."""
    return next((b for b in BUCKETS if b >= batch), None)


class CapturedBatch:
    """``fn(*static)`` captured for one bucket; ``fn`` returns a batch-major tensor or tuple of them. One lock
    per graph: its static tensors are shared."""

    def __init__(self, fn: Callable, bucket: int, host: Sequence[np.ndarray], device: torch.device):
        self.lock = threading.Lock()
        self.bucket = bucket
        self.fn = fn  # keeps what ``fn`` holds alive (e.g. constant tensors) as long as the graph reads them
        with _LINALG_PREFERENCE_LOCK, torch.cuda.device(device):
            library = torch.backends.cuda.preferred_linalg_library()
            torch.backends.cuda.preferred_linalg_library("cusolver")
            try:
                self.static = [torch.as_tensor(self._pad(a), device=device).clone() for a in host]
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph capture requires
                    for _ in range(2):
                        fn(*self.static)
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: other threads' CUDA work (frame uploads, other stages) neither fails nor joins
                # this capture (as the cuda backend's network graphs)
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.out = fn(*self.static)
            finally:
                torch.backends.cuda.preferred_linalg_library(library)

    def _pad(self, a: np.ndarray) -> np.ndarray:
        if len(a) == self.bucket:
            return a
        return np.concatenate([a, np.repeat(a[:1], self.bucket - len(a), 0)])

    def __call__(self, host: Sequence[np.ndarray]):
        B = len(host[0])
        with self.lock:
            for dst, a in zip(self.static, host):
                dst.copy_(torch.as_tensor(self._pad(a)))
            self.graph.replay()
            if isinstance(self.out, torch.Tensor):
                return self.out[:B].clone()
            return tuple(o[:B].clone() for o in self.out)


class GraphCache:
    """The captured graphs of one batched function on one device, by (bucket, key), captured on first use."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.enabled = True  # False: always eager (tests compare the two)
        self.graphs: dict[tuple, CapturedBatch] = {}
        self.errors: dict[tuple, str] = {}  # (bucket, key) -> why its capture failed
        self._lock = threading.Lock()

    def run(self, fn: Callable, host: Sequence[np.ndarray], key: Hashable = ()):
        """``fn`` over ``host`` arrays (batch-major): replayed from its bucket's graph on CUDA, else eager."""
        graph = self._graph(fn, host, key) if self.device.type == "cuda" and self.enabled else None
        if graph is not None:
            return graph(host)
        return fn(*(torch.as_tensor(a, device=self.device) for a in host))

    def _graph(self, fn: Callable, host: Sequence[np.ndarray], key: Hashable) -> CapturedBatch | None:
        bucket = bucket_for(len(host[0]))
        if bucket is None:
            return None
        k = (bucket, key)
        with self._lock:
            if k not in self.graphs and k not in self.errors:
                try:
                    self.graphs[k] = CapturedBatch(fn, bucket, host, self.device)
                except Exception as exc:  # noqa: BLE001 - capture is an optimisation: run eagerly, say why
                    self.errors[k] = f"{type(exc).__name__}: {exc}"
            return self.graphs.get(k)
