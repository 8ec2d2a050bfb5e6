"""Where a batched CuPy refinement (`PrdlRefiner.refine_batch`) spends its time on a GPU: batch sizes timed,
then its phases timed with a device synchronisation around each and its device-to-host reads counted.
   python bench/profile_refine_cuda.py [faces]"""
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import cupy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (run as a script)
from engine import refine  # noqa: E402 - after the path
from engine.face_model import FaceModel  # noqa: E402
from engine.gaze import eye_look_mask  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
model = FaceModel.load()
fixed = eye_look_mask(model.n_exp)
ref = refine.PrdlRefiner(model, fixed_exp=fixed)
problems = refine.synthetic_problems(ref, n, 0)
sync = cupy.cuda.Stream.null.synchronize
for _ in range(2):
    ref.refine_batch(problems, xp=cupy)
sync()
ts = []
for _ in range(5):
    t0 = time.perf_counter(); ref.refine_batch(problems, xp=cupy); sync(); ts.append(time.perf_counter() - t0)
print(f"refine_batch {n} faces cupy: median {1e3*np.median(ts):.2f} ms (min {1e3*min(ts):.2f})")
for b in (1, 8, 16, 32):
    sub = problems[:b]
    ref.refine_batch(sub, xp=cupy); sync()
    tb = []
    for _ in range(5):
        t0 = time.perf_counter(); ref.refine_batch(sub, xp=cupy); sync(); tb.append(time.perf_counter() - t0)
    print(f"  batch {b}: {1e3*np.median(tb):.2f} ms")

# phase times: wrap the module-level functions with a sync before and after
acc, calls = defaultdict(float), defaultdict(int)
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        sync(); t0 = time.perf_counter()
        r = f(*a, **k)
        sync(); acc[name] += time.perf_counter() - t0; calls[name] += 1
        return r
    setattr(mod, name, g)
for name in ("select_cells", "splat_visibility", "slot_jacobian", "slot_gradient", "batched_normal_equations",
             "batched_rodrigues"):
    wrap(refine, name)
for name in ("gauss_newton_terms", "descriptor_values"):
    wrap(refine.prdl, name)
wrap(refine.CellSelection, "means")
# host syncs: count device->host conversions
nsync = [0]
orig_int = cupy.ndarray.__int__, cupy.ndarray.__bool__, cupy.ndarray.get, cupy.ndarray.__float__
def cnt(fn):
    def g(self, *a, **k):
        nsync[0] += 1
        return fn(self, *a, **k)
    return g
try:
    cupy.ndarray.__int__ = cnt(orig_int[0]); cupy.ndarray.__bool__ = cnt(orig_int[1]); cupy.ndarray.get = cnt(orig_int[2])
    cupy.ndarray.__float__ = cnt(orig_int[3])
except (TypeError, AttributeError):
    nsync[0] = -10 ** 9  # cupy.ndarray is a compiled type: syncs not counted
sync(); t0 = time.perf_counter()
R = 3
for _ in range(R):
    ref.refine_batch(problems, xp=cupy)
sync(); tot = (time.perf_counter() - t0) / R
print(f"instrumented total {1e3*tot:.2f} ms per call; host syncs per call {nsync[0]/R:.0f}")
for k in sorted(acc, key=acc.get, reverse=True):
    print(f"  {k:<26} {1e3*acc[k]/R:8.2f} ms  calls {calls[k]/R:.1f}")
print(f"  {'(rest: glue)':<26} {1e3*(tot - sum(acc.values())/R):8.2f} ms")
try:
    cupy.ndarray.__int__, cupy.ndarray.__bool__, cupy.ndarray.get, cupy.ndarray.__float__ = orig_int
except (TypeError, AttributeError):
    pass
