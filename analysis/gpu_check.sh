#!/usr/bin/env bash
# The one prepared GPU check (issue 10): on a machine with one H100/H200 and a CUDA build of
# PyTorch but no diffusers/zarr and no network. Run from the repository root:
#
#   bash analysis/gpu_check.sh            # results and logs go to $OUT (or ./gpu-results)
#
# Wheels for the missing packages are read from .whl/ (make them here with
# analysis/gpu_wheels.sh and carry the folder). Each step has its own time cap; the caps add up to
# 470 s, the expected run is about 5 minutes. Writes three files: gpu_results.json (every
# benchmark's JSON, keyed by step), gpu_tests.log, gpu_check.log.
set -uo pipefail
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
TMP="$(mktemp -d)"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 20 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$LOG"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export TACA_PROBE_CACHE=/tmp/taca-cache PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$LOG"

status=0
step() {  # step NAME CAP_SECONDS ARGS... : one taca-probe command, its JSON kept under NAME
  local name=$1 cap=$2; shift 2
  echo "== $name: taca-probe $*" | tee -a "$LOG"
  timeout "$cap" python3 -m taca_probe "$@" --json "$TMP/$name.json" 2>&1 | tee -a "$LOG" || { status=1; echo "== $name FAILED" | tee -a "$LOG"; }
}

timeout 110 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$LOG"

# One attention call at FLUX 1024px, SD3.5 1024px CFG and an odd shape, bf16, side by side with stock
# (cuDNN on Hopper), the official approaches (naive, eager flex) and compiled flex.
SHAPES=(--shape 1,24,512,4096,128 --shape 2,24,333,4096,64,img-first --shape 1,24,301,3969,128,img-first)
step attention_gamma1.2 90 bench attention --device cuda --dtype bf16 --repeats 20 --gamma 1.2 "${SHAPES[@]}" \
  --variants sdpa,taca,taca+masses:triton,taca+masses:fused,taca+masses:block,taca+maps,naive,flex,flex-compiled
step attention_gamma1.0 30 bench attention --device cuda --dtype bf16 --repeats 20 --gamma 1.0 "${SHAPES[@]}" \
  --variants sdpa,taca+masses:triton,taca+masses:fused,taca+masses:block,taca+maps --no-memory

# Sampling at full depth, 1024px (4096 image tokens), 10 steps: without the probe, with all masses,
# with masses + maps of 5 steps x 20 tokens. FLUX.1-dev eager and regionally compiled; SD3.5-Large CFG.
E2E=(bench e2e --device cuda --dtype bf16 --depth full --image-tokens 4096 --steps 10 --repeats 3 --maps "steps=0-4;tokens=0-19")
step e2e_flux_full 70 "${E2E[@]}" --preset flux-dev
step e2e_flux_full_regional 90 "${E2E[@]}" --preset flux-dev --compile regional
step e2e_sd35large_full 60 "${E2E[@]}" --preset sd35-large

python3 - "$TMP" "$OUT/gpu_results.json" <<'PY'
import json, pathlib, sys
results = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(results, indent=1) + "\n")
print("wrote", sys.argv[2], "with", ", ".join(results) or "nothing")
PY
echo "gpu_check status $status" | tee -a "$LOG"
exit $status
