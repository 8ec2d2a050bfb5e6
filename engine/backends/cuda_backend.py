"""Torch on an NVIDIA GPU, with CUDA graphs for fixed shapes.

A network's batch is padded up to the next *bucket* size (1, 2, 4, ... 64), and each (network, bucket,
input shape) is captured once as a CUDA graph: later calls copy the inputs into the graph's static input
tensors, replay the graph and copy the real rows of the static outputs out. The networks here are
per-sample (no batch statistics), so padding rows never change the real rows' results.

Capture follows the torch.cuda.graph rules: warm-up iterations run on a side stream before capture,
inputs and outputs of a captured graph live at fixed addresses (static tensors), a replay overwrites the
previous outputs (so results are cloned before the lock is released), and graphs share a memory pool only
when they can never run concurrently: one pool per network, whose buckets replay under one lock. Shapes
outside the buckets run eagerly.

Precision: TF32 is switched off for cuDNN convolutions and matmuls. With TF32 on, the detector's scores
moved by more than its parity tolerance against the CPU (found on an H200).
"""
from __future__ import annotations

import sys
import threading
import warnings
import weakref

import torch
from torch import nn

from engine.backends.torch_backend import TorchBackend

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class BackendUnavailableError(ValueError):
    """The requested backend cannot run on this machine; the message says why and what to do."""


def cuda_unavailable_reason() -> str | None:
    """None when torch can use a CUDA device, else why not."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
    except Exception as exc:  # a broken driver raises from the CUDA runtime
        return f"CUDA initialisation failed: {exc}"
    return None


def disable_tf32() -> None:
    """Full fp32 for cuDNN convolutions and CUDA matmuls (process-wide torch settings)."""
    with warnings.catch_warnings():  # newer torch warns that these flags are superseded by fp32_precision
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def tf32_enabled() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def bucket_for(n: int, buckets=BUCKETS) -> int | None:
    """Smallest bucket >= n, or None when n is larger than every bucket."""
    for b in buckets:
        if b >= n:
            return b
    return None


def _map(fn, out):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(fn, o) for o in out)
    if isinstance(out, dict):
        return {k: _map(fn, v) for k, v in out.items()}
    return out


class _Entry:
    """Static inputs/outputs of one (bucket, shapes) of one network; a captured graph on CUDA."""

    def __init__(self, module: nn.Module, shapes, dtypes, device: torch.device, capture: bool, pool,
                 warmup_iters: int = 3):
        self.module = module
        self.inputs = [torch.zeros(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)]
        self.graph = None
        self.outputs = None
        if capture:
            # warm-up on a side stream (cuDNN autotuning, lazy allocations), then capture (torch.cuda.graph
            # itself captures on its own side stream)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup_iters):
                    module(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (other sessions uploading frames) may keep using CUDA meanwhile
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs = module(*self.inputs)

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:  # CPU (tests) or graphs off: the same static buffers, run eagerly
            self.outputs = self.module(*self.inputs)
        return self.outputs


class BucketRunner:
    """Runs one network on batches padded to bucket sizes, replaying a CUDA graph per bucket."""

    def __init__(self, module: nn.Module, device: torch.device, capture: bool, buckets=BUCKETS):
        self.module = module
        self.device = device
        self.capture = capture
        # the buckets of one network replay one at a time (self.lock), so they can share one pool
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.buckets = tuple(sorted(buckets))
        self.entries: dict[tuple, _Entry] = {}
        self.capture_error: str | None = None
        self.lock = threading.Lock()
        self.replays = 0

    def accepts(self, inputs) -> bool:
        if not inputs or not all(isinstance(x, torch.Tensor) and x.ndim >= 1 for x in inputs):
            return False
        n = inputs[0].shape[0]
        return (n >= 1 and bucket_for(n, self.buckets) is not None and all(x.shape[0] == n for x in inputs)
                and all(x.device == self.device for x in inputs))

    def _entry(self, b: int, inputs) -> _Entry:
        key = (b,) + tuple((tuple(x.shape[1:]), x.dtype) for x in inputs)
        entry = self.entries.get(key)
        if entry is None:
            shapes, dtypes = [(b, *x.shape[1:]) for x in inputs], [x.dtype for x in inputs]
            try:
                entry = _Entry(self.module, shapes, dtypes, self.device, self.capture, self.pool)
            except Exception as exc:  # noqa: BLE001 - a network that cannot be captured still runs, eagerly
                if not self.capture:
                    raise
                self.capture = False
                self.capture_error = f"{type(exc).__name__}: {exc}"
                print(f"facestream: CUDA graph capture of {type(self.module).__name__} failed, running it eagerly: "
                      f"{self.capture_error}", file=sys.stderr)
                self.entries.clear()
                entry = _Entry(self.module, shapes, dtypes, self.device, False, None)
            self.entries[key] = entry
        return entry

    def warm(self, sample_shapes, dtype=torch.float32, sizes=None) -> int:
        """Capture the graphs for every bucket (or `sizes`) ahead of time; returns how many exist."""
        with torch.inference_mode(), self.lock:
            for b in sizes or self.buckets:
                self._entry(b, [torch.empty((1, *s), dtype=dtype, device=self.device) for s in sample_shapes])
        return len(self.entries)

    def __call__(self, *inputs):
        n = inputs[0].shape[0]
        b = bucket_for(n, self.buckets)
        with torch.inference_mode(), self.lock:
            entry = self._entry(b, inputs)
            for static, x in zip(entry.inputs, inputs):
                static[:n].copy_(x)  # rows n..b-1 keep older data: harmless, every row is computed alone
            out = entry.replay()
            self.replays += 1
            return _map(lambda t: t[:n].clone() if t.ndim and t.shape[0] == b else t.clone(), out)


class CudaBackend(TorchBackend):
    """Torch on a CUDA device; networks prepared here replay CUDA graphs per batch bucket.

    `device="cpu"` with graphs=False runs the same bucketing and static-buffer path without CUDA (tests)."""
    name = "cuda"

    def __init__(self, device: str = "cuda", threads: int | None = None, graphs: bool = True, buckets=BUCKETS):
        dev = torch.device(device)
        if dev.type == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise BackendUnavailableError(f"backend 'cuda' unavailable: {reason}; use --backend torch")
        super().__init__(device=device, threads=threads)
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.buckets = tuple(buckets)
        if self.device.type == "cuda":
            disable_tf32()
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest (fp32) algorithm once
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self._runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def prepare(self, module: nn.Module) -> nn.Module:
        module = super().prepare(module)
        self._runners[module] = BucketRunner(module, self.device, self.graphs, self.buckets)
        return module

    def runner(self, module: nn.Module) -> BucketRunner | None:
        return self._runners.get(module)

    def run(self, module: nn.Module, *inputs: torch.Tensor):
        runner = self._runners.get(module)
        if runner is None or not runner.accepts(inputs):
            return super().run(module, *inputs)
        return runner(*inputs)

    def gpu_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def capture_errors(self) -> dict[str, str]:
        return {type(m).__name__: r.capture_error for m, r in self._runners.items() if r.capture_error}

    def describe(self) -> str:
        failed = self.capture_errors()
        graphs = " (CUDA graphs)" if self.graphs and not failed else (
            f" (CUDA graphs; eager for {', '.join(failed)})" if self.graphs else "")
        return f"{self.name}:{self.gpu_name()}{graphs}"
