"""facestream engine: networks, face model, fitting and the per-video tracker."""
import os

# The engine's NumPy work is many small matrix products next to PyTorch's own thread pool; a
# multi-threaded BLAS only makes the two pools fight over the cores (measured: vertices() 0.5 ms
# single-threaded, 8-12 ms with 2 BLAS threads under load). Users can still override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
