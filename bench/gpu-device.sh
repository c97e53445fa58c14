#!/usr/bin/env bash
# bench/gpu.py on a GPU machine that has torch and transformers but not diffusers: the
# missing wheels travel in .whl/ (`make gpu-wheels` fetches them). Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-/tmp}"
python3 bench/gpu.py --compile "$@" 2> >(tee "$out/gpu.log" >&2)
cp bench/results/gpu-*.json "$out/"
