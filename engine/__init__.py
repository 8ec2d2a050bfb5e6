"""facestream engine: networks, face model, fitting and the per-video tracker."""
import gc
import os

# The engine's NumPy work is many small matrix products next to PyTorch's own thread pool; a
# multi-threaded BLAS only makes the two pools fight over the cores (measured: vertices() 0.5 ms
# single-threaded, 8-12 ms with 2 BLAS threads under load). Users can still override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def freeze_long_lived() -> None:
    """Move every object alive now out of the garbage collector's sight (after collecting what is garbage): call
    once the long-lived state -- torch, the networks, the face model -- is loaded. torch alone is ~180,000 objects;
    a full collection walks them all, ~100 ms on the 2-core EPYC, stalling every session of the process; the first
    one after loading came while frames were tracked (`tools/bench_stalls.py`: worst frame 115-117 ms, 19-21 ms
    once frozen)."""
    gc.collect()
    gc.freeze()
