#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that analysis/gpu_check.sh installs on the GPU machine
# (Python 3.12, x86-64, which has torch, transformers, xarray, scipy, pandas, seaborn, pytest, peft but
# neither diffusers nor zarr). Writes .whl/ (git-ignored in .gitignore; carry it to the GPU machine).
set -euo pipefail
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  diffusers==0.42.1 zarr==3.1.6 numcodecs donfig google-crc32c plotly narwhals
ls -la .whl
