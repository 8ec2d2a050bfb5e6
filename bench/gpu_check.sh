#!/usr/bin/env bash
# GPU check for a lent NVIDIA machine (no registry access): the PRDL CuPy kernels and array-module path
# against NumPy, and the network modules on CUDA against CPU. Writes results to $OUT (or ./gpu_out).
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
} > "$OUT/machine.txt" 2>&1
python -m pytest -q -rs tests/test_prdl.py tests/test_raster.py tests/test_refine_batch.py > "$OUT/prdl_tests.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/prdl_tests.txt"
python -m engine.prdl 20 > "$OUT/prdl_bench.txt" 2>&1
echo "bench rc=$?" >> "$OUT/prdl_bench.txt"
cat "$OUT"/*.txt
