#!/usr/bin/env bash
# Every GPU figure of issues 9 and 8 from one call on one GPU: the gpu-marked tests, then
# benchmarks/fame_speed.py and benchmarks/metrics_speed.py; logs, JSON and markdown (7 files) go to $OUT
# (default benchmarks/results).
#
# Time: at most $BUDGET seconds (default 400) in all. The GPU machine runs one command for at most
# 600 s and lends about 15 minutes per session, its start included, so the suite must leave room to
# rerun it. Each step has its own cap and never runs past what the budget keeps for the steps after
# it; the benchmark rewrites its JSON and markdown after every row, so a step cut short keeps the
# rows it measured (the compiled setting is measured last).
#
# Environment: the machine's own python3 with torch is used as it is. The project's pure-Python
# dependencies missing there travel as wheels in .whl (carried; built by benchmarks/gpu_wheels.sh);
# where .whl is absent and a package index is reachable, `pip install -e .[dev]` into a venv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=python3
BUDGET=${BUDGET:-400}

# seconds the next step may run: at most $1, keeping $2 for the steps after it (at least 1)
step_limit() {
    local left=$((BUDGET - SECONDS - $2))
    local limit=$(( $1 < left ? $1 : left ))
    echo $(( limit > 1 ? limit : 1 ))
}

if [ -d .whl ]; then
    timeout 30 $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    $PYTHON -m venv --system-site-packages /tmp/fame-venv && /tmp/fame-venv/bin/pip install -q -e ".[dev]" || exit 1
    PYTHON=/tmp/fame-venv/bin/python
fi
{ nvidia-smi; $PYTHON -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"; } \
    > "$OUT/environment.txt" 2>&1

# the trained network of the agreement check: the committed checkpoint, retrained here (at most
# 30 s of training) only if its held-out accuracy is below 0.6
timeout $(step_limit 45 320) $PYTHON benchmarks/train_agreement_model.py --device cuda --epochs 15 --minutes 0.5 \
    --min-accuracy 0.6 > "$OUT/train_agreement_model.log" 2>&1
tail -n 2 "$OUT/train_agreement_model.log"

# the gpu tests of every file that has some (collecting the whole suite would need every optional dependency)
timeout $(step_limit 120 200) $PYTHON -m pytest -q -rA -s -m gpu -p no:cacheprovider --continue-on-collection-errors $(grep -l "mark.gpu" tests/*.py) > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu exit code $?" | tee -a "$OUT/pytest_gpu.log"
tail -n 5 "$OUT/pytest_gpu.log"

# the CPU ratio is measured on the 2-core development machine: python benchmarks/fame_speed.py --sections cpu_ratio
timeout $(step_limit 300 40) $PYTHON benchmarks/fame_speed.py --sections resnet50 trained verification feature_map --out "$OUT" 2>&1 | tee "$OUT/fame_speed.log"
echo "benchmark exit code ${PIPESTATUS[0]}"

# ROAD with noisy linear imputation on the GPU next to grad-cam on this machine's CPU (issue 8), last
# so that a cut-off run loses only this figure
timeout $(step_limit 40 0) $PYTHON benchmarks/metrics_speed.py --images 8 --device cuda --out "$OUT" 2>&1
echo "metrics benchmark exit code $?"
