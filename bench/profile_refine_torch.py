"""Where the torch refinement (`engine.refine_torch`) spends its time on a GPU: the CUDA-graph replay at several
batch sizes, the same solve eagerly, and the eager solve's kernels from torch.profiler (count and the most
expensive ones), so that the next step is chosen from figures.
   python bench/profile_refine_torch.py [faces] [--compiled]   (--compiled: also torch.compile, last)"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (run as a script)
from engine import refine  # noqa: E402 - after the path
from engine.face_model import FaceModel  # noqa: E402
from engine.gaze import eye_look_mask  # noqa: E402
from engine.refine_torch import TorchRefiner  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
n = int(args[0]) if args else 64
if not torch.cuda.is_available():
    sys.exit("profile_refine_torch: needs a CUDA device")
model = FaceModel.load()
fixed = eye_look_mask(model.n_exp)
ref = refine.PrdlRefiner(model, fixed_exp=fixed)
problems = refine.synthetic_problems(ref, n, 0)
print(torch.cuda.get_device_name(), "torch", torch.__version__)


def timed(run, batch, reps=10):
    run(batch)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(batch)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


graphs = TorchRefiner(ref, "cuda")
for b in (1, 8, 32, 64, 128):
    if b > n:
        break
    t0 = time.perf_counter()
    graphs.refine(problems[:b])
    capture_s = time.perf_counter() - t0
    print(f"graph replay, batch {b:>3}: {timed(graphs.refine, problems[:b]):8.2f} ms   (capture {capture_s:.1f} s)")
print("graph capture errors:", graphs.graphs.errors or "none")
eager = TorchRefiner(ref, "cuda")
eager.graphs.enabled = False
print(f"eager, batch {n}: {timed(eager.refine, problems, reps=3):.2f} ms")
# the eager solve's kernels: how many launches, and which cost the GPU time
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    eager.refine(problems)
    torch.cuda.synchronize()
events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
total_us = sum(e.device_time for e in events)
print(f"eager solve, batch {n}: {len(events)} kernels and copies, {total_us / 1e3:.2f} ms of device time")
print(prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=60))

# last: compiling takes minutes, and a time limit that cuts it keeps the figures above
if "--compiled" in sys.argv:
    fused = TorchRefiner(ref, "cuda", compiled=True)
    t0 = time.perf_counter()
    try:
        fused.refine(problems)
        print(f"compiled + captured, batch {n}: compile {time.perf_counter() - t0:.0f} s, "
              f"{timed(fused.refine, problems):.2f} ms; errors: {fused.graphs.errors or 'none'}")
    except Exception as exc:  # noqa: BLE001
        print(f"compiled: failed: {type(exc).__name__}: {str(exc)[:400]}")
