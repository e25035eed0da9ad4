#!/usr/bin/env bash
# The one prepared GPU check (issue 7): on a machine with one H100/H200 and a CUDA build of
# PyTorch but no diffusers/zarr and no network. Run from the repository root:
#
#   bash analysis/gpu_check.sh            # results and logs go to $OUT (or ./gpu-results)
#
# Wheels for the missing packages are read from .whl/ (make them here with
# analysis/gpu_wheels.sh and carry the folder). Runs in well under 10 minutes on an H100.
set -uo pipefail
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/log"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export TACA_PROBE_CACHE=/tmp/taca-cache PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
timeout 240 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1

# Attention at the FLUX 1024px and SD3.5 1024px shapes, bf16, all variants.
timeout 150 python3 -m taca_probe bench attention --device cuda --dtype bf16 --repeats 20 \
  --variants sdpa,taca,taca+masses,taca+maps,naive,flex --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.txt" || status=1

# End to end at real widths, reduced depth: FLUX.1-dev width batch 1 (1024px, 4096 + 512 tokens),
# SD3.5-Medium width batch 2 (CFG, 1024px, 4096 + 333 tokens).
timeout 120 python3 -m taca_probe bench e2e --device cuda --dtype bf16 --width flux-dev --layers 4 \
  --image-tokens 4096 --steps 6 --repeats 5 --json "$OUT/bench_e2e_flux.json" 2>&1 | tee "$OUT/bench_e2e_flux.txt" || status=1
timeout 120 python3 -m taca_probe bench e2e --device cuda --dtype bf16 --width sd35-medium --layers 4 \
  --image-tokens 4096 --steps 6 --repeats 5 --json "$OUT/bench_e2e_sd35.json" 2>&1 | tee "$OUT/bench_e2e_sd35.txt" || status=1
echo "gpu_check status $status" | tee -a "$OUT/env.txt"
exit $status
