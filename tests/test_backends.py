"""Backend selection and the GPU backends. On a CPU machine: the selection rules, the clear errors, and the
cuda backend's bucketing/static-buffer path (graphs off); the CUDA-graph and TensorRT tests skip with the
reason and run wherever CUDA / TensorRT exist."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import media_path
from engine.backends import (BACKENDS, BackendUnavailableError, CudaBackend, TorchBackend, backend_status,
                             select_backend)
from engine.backends.cuda_backend import BucketRunner, bucket_for, cuda_unavailable_reason, tf32_enabled
from engine.backends.tensorrt_backend import engine_path, input_shape, tensorrt_unavailable_reason, weights_hash

CUDA_REASON = cuda_unavailable_reason()
TRT_REASON = tensorrt_unavailable_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"needs CUDA: {CUDA_REASON}")
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"needs TensorRT: {TRT_REASON}")


def test_auto_picks_the_best_available(monkeypatch):
    monkeypatch.delenv("FACESTREAM_BACKEND", raising=False)
    status = backend_status()
    assert status["torch"] is None
    expected = next(n for n in ("tensorrt", "cuda", "torch") if status[n] is None)
    assert select_backend("auto").name == expected


def test_override_flag_and_env(monkeypatch):
    monkeypatch.setenv("FACESTREAM_BACKEND", "torch")
    assert isinstance(select_backend("auto"), TorchBackend)
    assert select_backend("torch").describe().startswith("torch:")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        select_backend("nope")
    assert set(BACKENDS) == {"torch", "cuda", "tensorrt"}


@pytest.mark.skipif(CUDA_REASON is None, reason="this machine has CUDA")
def test_gpu_backends_say_why_they_cannot_run():
    for name in ("cuda", "tensorrt"):
        with pytest.raises(BackendUnavailableError, match=f"backend '{name}' unavailable: .*CUDA"):
            select_backend(name)


def test_bucket_sizes():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65) is None


def test_bucket_runner_pads_and_slices_on_cpu(pack):
    """The cuda backend's padding path (graphs off, on CPU): 5 faces run as a bucket of 8 and give the
    unpadded results; bigger batches than the largest bucket run eagerly."""
    from engine.landmarks import Landmarker
    from engine.networks.preprocess import Roi, crop_rois

    backend = CudaBackend(device="cpu", graphs=False)
    lm = Landmarker(backend)
    from PIL import Image
    rgb = np.asarray(Image.open(media_path("fr_two_people.jpg")).convert("RGB"))
    dets = pack.detector(rgb)
    from engine.networks.preprocess import roi_from_detection
    rois = [roi_from_detection(d) for d in dets]
    rois += [Roi(r.cx + 3 * k, r.cy - 2 * k, r.w * (1 + 0.05 * k), r.h * (1 + 0.05 * k), r.theta + 0.05 * k)
             for k, r in enumerate(rois * 2, 1)]
    x = crop_rois(lm.to_tensor(rgb), rois[:5])
    ref_pts, ref_logit = TorchBackend().run(lm.net, x)
    pts, logit = backend.run(lm.net, x)
    runner = backend.runner(lm.net)
    assert isinstance(runner, BucketRunner) and runner.replays == 1
    assert [k[0] for k in runner.entries] == [8]
    assert runner.entries[next(iter(runner.entries))].inputs[0].shape[0] == 8
    assert pts.shape == ref_pts.shape == (5, 478, 3) and logit.shape == (5,)
    assert (pts - ref_pts).abs().max() < 2e-3 and (logit - ref_logit).abs().max() < 1e-3
    # a second call of 3 faces reuses the bucket-4 entry and leaves the bucket-8 results alone
    pts3, _ = backend.run(lm.net, x[:3])
    assert sorted(k[0] for k in runner.entries) == [4, 8]
    assert (pts3 - ref_pts[:3]).abs().max() < 2e-3
    assert runner.warm([(3, 192, 192)], sizes=(1, 2)) == 4
    big = torch.cat([x] * 14)  # 70 > 64: eager
    assert backend.run(lm.net, big)[0].shape[0] == 70 and runner.replays == 2


def test_tensorrt_cache_key(pack):
    net = pack.landmarker.net
    assert input_shape(net) == (3, 192, 192) and input_shape(pack.detector.net) == (3, 128, 128)
    assert input_shape(torch.nn.Linear(2, 2)) is None
    h = weights_hash(net)
    assert h == weights_hash(net) and h != weights_hash(pack.detector.net)
    p = engine_path(net, "NVIDIA H100 80GB HBM3", "10.14.1")
    assert p.name.startswith(f"AttentionMeshNet-{h}-NVIDIA_H100_80GB_HBM3-trt10.14.1-fp16-b1-64")
    assert engine_path(net, "NVIDIA H200", "10.14.1") != p and engine_path(net, "NVIDIA H100 80GB HBM3", "10.15") != p


def test_tensorrt_reason_is_clear():
    if TRT_REASON is None:
        pytest.skip("TensorRT is available here")
    assert "CUDA" in TRT_REASON or "torch-tensorrt" in TRT_REASON or "TensorRT" in TRT_REASON


# ---------------------------------------------------------------- on a GPU

def _real_inputs(pack, device):
    from PIL import Image

    from engine.networks.preprocess import crop_rois, letterbox_detector_input, roi_from_detection

    rgb = np.asarray(Image.open(media_path("fr_two_people.jpg")).convert("RGB"))
    rois = [roi_from_detection(d) for d in pack.detector(rgb)]
    img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()
    return letterbox_detector_input(img)[0].to(device), crop_rois(img, rois).to(device)


@needs_cuda
def test_cuda_graphs_match_cpu(pack):
    """Detector and landmarks on the cuda backend (CUDA graphs, TF32 off) against the CPU ports."""
    from engine.detection import FaceDetector
    from engine.landmarks import Landmarker

    backend = CudaBackend()
    assert not tf32_enabled()
    det, lm = FaceDetector(backend), Landmarker(backend)
    xd, xl = _real_inputs(pack, backend.device)
    cpu = TorchBackend()  # the CPU references get their own nets: on a GPU machine `pack` itself runs on cuda
    ref_reg, ref_cls = cpu.run(FaceDetector(cpu).net, xd.cpu())
    ref_pts, ref_logit = cpu.run(Landmarker(cpu).net, xl.cpu())
    for _ in range(2):  # capture, then replay
        reg, cls = backend.run(det.net, xd)
        pts, logit = backend.run(lm.net, xl)
    assert backend.runner(lm.net).replays == 2 and backend.runner(lm.net).entries
    # fp32 cuDNN convolutions sum in another order than the CPU: 0.025 px and 1.9e-4 measured on an H200
    assert (reg.cpu() - ref_reg).abs().max() < 5e-2  # detector px units (128-px input)
    assert (torch.sigmoid(cls.cpu()) - torch.sigmoid(ref_cls)).abs().max() < 5e-4
    assert (pts.cpu() - ref_pts).abs().max() < 2e-2  # 192-px crop units
    assert (logit.cpu() - ref_logit).abs().max() < 1e-2


@needs_trt
def test_tensorrt_matches_cpu(pack, tmp_path, monkeypatch):
    from engine.backends import TensorRTBackend
    from engine.landmarks import Landmarker

    monkeypatch.setenv("FACESTREAM_TRT_CACHE", str(tmp_path))
    backend = TensorRTBackend()
    lm = Landmarker(backend)
    assert backend.built and not backend.loaded
    _, xl = _real_inputs(pack, backend.device)
    cpu = TorchBackend()  # its own CPU net: on a GPU machine `pack` runs on the GPU
    ref_pts, _ = cpu.run(Landmarker(cpu).net, xl.cpu())
    pts, _ = backend.run(lm.net, xl)
    assert (pts.cpu() - ref_pts).abs().max() < 0.5  # fp16: half a pixel in the 192-px crop
    again = TensorRTBackend()
    Landmarker(again)
    assert again.loaded and not again.built  # the engine came from the disk cache
