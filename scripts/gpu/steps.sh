#!/usr/bin/env bash
# A GPU call's steps, each under its own time limit, logged to $OUT/log.txt (the device
# tool brings $OUT back). On the GPU machine, from the repository root:
#
#   bash scripts/gpu/steps.sh FILE      # FILE: one step a line, "NAME SECONDS COMMAND..."
#
# Installs .whl/*.whl (scripts/gpu/wheels.sh) into /tmp/site first, puts the repository,
# tests/ and scripts/ on PYTHONPATH, and runs each step with OUT set to a folder of its own
# (/tmp/steps/NAME: benchmarks write there); RESULTS is the device tool's $OUT, what comes
# back (at most 8 files): `cp $OUT/x.json $RESULTS/` inside a step keeps one. Lines
# starting with # and blank lines are skipped;
# a step's command runs through bash, so `env X=1 python ...` and `A && B` work. A step
# that fails or runs out of time is logged and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?the device tool sets OUT}"
export RESULTS=$OUT
LOG=$RESULTS/log.txt
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > /dev/null 2>&1 || echo "wheel install failed" >> "$LOG"
fi
export PYTHONPATH=$PWD:$PWD/tests:$PWD/scripts:/tmp/site PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$LOG" 2>&1
while read -r name seconds command; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  mkdir -p "/tmp/steps/$name"
  echo "=== $name $(date +%T)" >> "$LOG"
  OUT=/tmp/steps/$name timeout "$seconds" bash -c "$command" >> "$LOG" 2>&1
  echo "=== $name rc=$? $(date +%T)" >> "$LOG"
done < "$1"
