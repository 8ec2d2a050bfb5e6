"""TensorRT engines through torch-tensorrt: fp16, dynamic batch, built once and cached on disk.

Written to the torch-tensorrt documentation (dynamo frontend): `torch_tensorrt.compile(module,
ir="dynamo", arg_inputs=[torch_tensorrt.Input(min_shape, opt_shape, max_shape)])` builds an engine with a
dynamic batch dimension; fp16 uses the rule-based autocast of recent releases (`use_explicit_typing=True,
enable_autocast=True, low_precision_type=torch.float16`), or `enabled_precisions={torch.float16}` on
releases without it. `torch_tensorrt.save(..., output_format="exported_program", arg_inputs=[...])` writes
the compiled program with its dynamic shapes, `torch_tensorrt.load(path).module()` reads it back.

Cache key: the network's class and a hash of its weights, the GPU name, the TensorRT version, the
precision and the batch range. A network with no known input shape runs with torch on the GPU instead
(listed in `fallbacks`).

TensorRT cannot be installed on the machines this was written on, so this path has not run; tests that
need it skip with the reason from `tensorrt_unavailable_reason()`.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from engine.backends.cuda_backend import BackendUnavailableError, CudaBackend, cuda_unavailable_reason

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 32, 64


@lru_cache(maxsize=1)
def _import_torch_tensorrt():
    """(module, None) or (None, reason). torch_tensorrt 2.14 raises a bare Exception (not ImportError)
    when the TensorRT libraries are missing, so anything raised on import counts as unavailable."""
    try:
        import torch_tensorrt
    except ImportError as exc:
        return None, f"torch-tensorrt is not installed ({exc}); install the GPU extra: pip install 'facestream[gpu]'"
    except Exception as exc:  # noqa: BLE001 - see docstring
        sys.modules.pop("torch_tensorrt", None)  # do not leave a half-imported module behind
        return None, (f"torch-tensorrt is installed but TensorRT could not be loaded ({type(exc).__name__}: {exc}); "
                      "install TensorRT (pip install tensorrt, from NVIDIA's package index) or use --backend cuda")
    return torch_tensorrt, None


def tensorrt_unavailable_reason() -> str | None:
    """None when the tensorrt backend can run here, else why not."""
    reason = cuda_unavailable_reason()
    if reason:
        return reason
    return _import_torch_tensorrt()[1]


def tensorrt_version() -> str:
    try:
        import tensorrt
        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 - only used in the cache key and the description
        trt, _ = _import_torch_tensorrt()
        return "unknown" if trt is None else f"torch-tensorrt-{getattr(trt, '__version__', 'unknown')}"


def input_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Per-sample input shape (C, H, W) of a network: `module.input_shape`, or the square INPUT_SIZE of the
    module that defines its class (the MediaPipe ports: detector 128, landmarks 192, iris 64)."""
    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    size = getattr(sys.modules.get(type(module).__module__), "INPUT_SIZE", None)
    return (3, int(size), int(size)) if isinstance(size, int) else None


def weights_hash(module: nn.Module, n: int = 16) -> str:
    """Hash of the class name and every parameter and buffer (name, dtype, shape, values)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in sorted(module.state_dict(keep_vars=False).items()):
        t = t.detach().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())  # C order whatever the memory layout (the ports are channels-last)
    return h.hexdigest()[:n]


def engine_cache_dir() -> Path:
    env = os.environ.get("FACESTREAM_TRT_CACHE")
    if env:
        return Path(env).expanduser()
    from engine.assets import cache_dir
    return cache_dir() / "tensorrt"


def engine_path(module: nn.Module, gpu_name: str, trt_version: str, precision: str = "fp16",
                batch: tuple[int, int] = (MIN_BATCH, MAX_BATCH)) -> Path:
    safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)  # noqa: E731
    name = (f"{type(module).__name__}-{weights_hash(module)}-{safe(gpu_name)}-trt{safe(trt_version)}-{precision}"
            f"-b{batch[0]}-{batch[1]}.ep")
    return engine_cache_dir() / name


class TensorRTBackend(CudaBackend):
    name = "tensorrt"

    def __init__(self, device: str = "cuda", threads: int | None = None, max_batch: int = MAX_BATCH):
        reason = tensorrt_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"backend 'tensorrt' unavailable: {reason}")
        super().__init__(device=device, threads=threads, graphs=True)
        self.trt, _ = _import_torch_tensorrt()
        self.trt_version = tensorrt_version()
        self.max_batch = max_batch
        self._engines: dict[int, nn.Module] = {}
        self._keep: list[nn.Module] = []  # the prepared modules, so their ids stay unique
        self.fallbacks: list[str] = []
        self.built: list[str] = []
        self.loaded: list[str] = []

    def _trt_input(self, shape):
        return self.trt.Input(min_shape=(MIN_BATCH, *shape), opt_shape=(min(OPT_BATCH, self.max_batch), *shape),
                              max_shape=(self.max_batch, *shape), dtype=torch.float32)

    def _compile(self, module: nn.Module, shape) -> nn.Module:
        kwargs = dict(ir="dynamo", arg_inputs=[self._trt_input(shape)], min_block_size=1)
        try:
            return self.trt.compile(module, use_explicit_typing=True, enable_autocast=True,
                                    low_precision_type=torch.float16, **kwargs)
        except TypeError:  # releases before rule-based autocast: weak typing with fp16 enabled
            return self.trt.compile(module, enabled_precisions={torch.float16}, **kwargs)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = super().prepare(module)
        shape = input_shape(module)
        if shape is None:
            self.fallbacks.append(type(module).__name__)
            return module  # runs with torch (CUDA graphs) on the GPU
        path = engine_path(module, self.gpu_name(), self.trt_version, "fp16", (MIN_BATCH, self.max_batch))
        engine = None
        if path.is_file():
            try:
                engine = self.trt.load(str(path)).module()
                self.loaded.append(path.name)
            except Exception as exc:  # noqa: BLE001 - a stale or corrupt cache file is rebuilt
                print(f"facestream: rebuilding TensorRT engine {path.name}: {exc}", file=sys.stderr)
        if engine is None:
            engine = self._compile(module, shape)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.ep")
            self.trt.save(engine, str(tmp), output_format="exported_program", arg_inputs=[self._trt_input(shape)])
            os.replace(tmp, path)
            self.built.append(path.name)
        self._engines[id(module)] = engine
        self._keep.append(module)
        return module

    def run(self, module: nn.Module, *inputs: torch.Tensor):
        engine = self._engines.get(id(module))
        if engine is None:
            return super().run(module, *inputs)
        n = inputs[0].shape[0]
        with torch.inference_mode():
            if n <= self.max_batch:
                return _as_float(engine(*inputs))
            parts = [_as_float(engine(*(x[i:i + self.max_batch] for x in inputs))) for i in range(0, n, self.max_batch)]
            return tuple(torch.cat(p, dim=0) for p in zip(*parts))

    def describe(self) -> str:
        return f"{self.name}:{self.gpu_name()} (fp16, TensorRT {self.trt_version})"


def _as_float(out):
    if isinstance(out, torch.Tensor):
        return out.float()
    return tuple(o.float() for o in out)
