"""The per-bucket CUDA-graph cache (`engine.cuda_graphs`): bucket choice, eager fallback, padding and replay."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cuda_graphs import BUCKETS, CapturedBatch, GraphCache, bucket_for


def test_bucket_for():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 128)] == [1, 2, 4, 8, 64, 128, 128]
    assert bucket_for(BUCKETS[-1] + 1) is None


def _fn(x, w):
    """A batch-major function with two outputs; each row depends only on its own row."""
    return x * w[:, :1], (x ** 2).sum(1)


def test_off_cuda_the_cache_runs_eagerly():
    cache = GraphCache("cpu")
    x, w = np.arange(6.0).reshape(3, 2), np.full((3, 1), 2.0)
    a, b = cache.run(_fn, [x, w])
    assert np.allclose(a.numpy(), x * 2.0) and np.allclose(b.numpy(), (x ** 2).sum(1))
    assert cache.graphs == {} and cache.errors == {}


def test_captured_batches_pad_and_replay():  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no CUDA device is visible (torch.cuda.is_available() is False)")
    cache = GraphCache("cuda")
    rng = np.random.default_rng(0)
    for n in (3, 4, 1, 3):  # buckets 4, 4 (replay), 1, 4 (replay)
        x, w = rng.normal(size=(n, 5)), rng.normal(size=(n, 1))
        a, b = cache.run(_fn, [x, w], key="demo")
        assert a.shape == (n, 5) and np.allclose(a.cpu().numpy(), x * w)
        assert np.allclose(b.cpu().numpy(), (x ** 2).sum(1))
    assert sorted(cache.graphs) == [(1, "demo"), (4, "demo")] and not cache.errors
    assert isinstance(cache.graphs[(4, "demo")], CapturedBatch)
