"""The GPU benchmark's pieces on CPU: parity report and the multi-process stream simulation (real processes,
real pipe traffic, the real scheduler), so `bash bench/gpu.sh` is known to run before a GPU is lent."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assets_root


@pytest.fixture(scope="module")
def media():
    m = assets_root() / "media"
    if not (m / "liveportrait_d0.mp4").is_file():
        pytest.skip("shared media missing")
    return m


def test_parity_report_on_cpu(media):
    from engine.backends import CudaBackend
    from engine.bench_gpu import load_frames, load_images, parity
    from engine.pack import Pack

    cpu = Pack("torch")  # not the `pack` fixture: on a GPU machine that one runs on the GPU
    dev = Pack(CudaBackend(device="cpu", graphs=False))
    frames = load_frames(media, ["liveportrait_d0.mp4"], 12)
    res = parity(cpu, dev, load_images(media)[:2], frames, fp16=False)
    assert res["pass"], res
    assert res["detector"]["detections_cpu"] >= 3 and res["landmarks"]["faces"] >= 3
    assert res["end_to_end"]["frames"] == 4
    # same weights and arithmetic, only the batch padding differs: far inside the GPU tolerances
    assert res["landmarks"]["max_point_diff_px_batched"] < 2e-3


def test_stream_simulation_runs_across_processes(pack, media):
    from engine.bench_streams import load_clips, simulate

    clips = load_clips(media, ["liveportrait_d0.mp4", "liveportrait_d3.mp4"], 10, 256)
    assert clips[0].shape == (10, 256, 256, 3)
    out = simulate(pack, clips, n_streams=2, streams_per_process=1, seconds=1.0, max_wait_ms=2.0)
    assert "error" not in out, out
    assert out["processes"] == 2
    assert out["frames"] + out["dropped"] >= 2 * 25  # 2 streams x ~30 frames offered in 1 s
    assert out["frames"] > 0 and out["latency_ms_p50"] > 0
    assert out["latency_ms_p95"] >= out["latency_ms_p50"]
    assert isinstance(out["held"], bool) and np.isfinite(out["landmark_mean_batch"])
    assert out["regress"] == "per face in the session processes"


def test_stream_simulation_with_the_batched_regress_stage(pack, media):
    """The GPU layout (tracked faces regressed in the network process's batched stage), run on the CPU."""
    from engine.bench_streams import load_clips, simulate

    clips = load_clips(media, ["liveportrait_d0.mp4", "liveportrait_d3.mp4"], 10, 256)
    out = simulate(pack, clips, n_streams=2, streams_per_process=1, seconds=1.5, max_wait_ms=2.0,
                   device_stages=True)
    assert "error" not in out, out
    assert out["regress"] == "batched on the device" and out["regress_mean_batch"] >= 1.0
    assert out["frames"] > 0 and out["latency_ms_p50"] > 0


def test_stream_simulation_with_two_network_processes(pack, media):
    """Streams shared between this network process and a spawned one (its own pack and scheduler): every stream
    is served, the latency parts are reported."""
    from engine.bench_streams import load_clips, simulate

    clips = load_clips(media, ["liveportrait_d0.mp4", "liveportrait_d3.mp4"], 10, 256)
    out = simulate(pack, clips, n_streams=2, streams_per_process=1, seconds=1.0, max_wait_ms=0.0,
                   network_processes=2, backend=("cpu", "auto"))
    assert "error" not in out, out
    assert out["network_processes"] == 2 and out["processes"] == 2
    assert out["frames"] + out["dropped"] >= 2 * 25 and out["fps_per_stream"] > 10
    parts = out["parts_ms_p50_p95"]
    assert parts["landmarks"][0] > 0 and parts["tracker"][1] >= parts["tracker"][0]
    with pytest.raises(ValueError, match="backend"):
        simulate(pack, clips, n_streams=2, streams_per_process=1, seconds=1.0, network_processes=2)


def test_a_network_process_that_fails_to_start_is_reported(pack, media):
    """A spawned network process whose pack cannot be built (here: a CUDA backend on a machine without CUDA) gives
    an error result, not an exception, and no process is left waiting for the start."""
    import multiprocessing as mp

    from engine.backends import cuda_unavailable_reason
    from engine.bench_streams import load_clips, simulate

    if cuda_unavailable_reason() is None:
        pytest.skip("needs a machine without CUDA (the failure injected is a CUDA backend there)")
    clips = load_clips(media, ["liveportrait_d0.mp4"], 5, 256)
    out = simulate(pack, clips, n_streams=2, streams_per_process=1, seconds=1.0, network_processes=2,
                   backend=("cuda", "cuda"))
    assert "network process" in out["error"], out
    assert not mp.active_children()


def test_stream_simulation_with_prdl_in_the_refine_stage(pack, media):
    """PRDL on every frame with the device stages (here on the CPU): segmentation and targets in the session
    process, the refinement sent (without its masks) to the network process's refine stage."""
    from engine.bench_streams import load_clips, simulate

    clips = load_clips(media, ["liveportrait_d3.mp4"], 10, 256)
    out = simulate(pack, clips, n_streams=1, streams_per_process=1, seconds=1.0, max_wait_ms=0.0,
                   device_stages=True, prdl=True)
    assert "error" not in out, out
    assert out["prdl"] and out["frames"] > 0
    assert out["parts_ms_p50_p95"]["prdl"][0] > 0
