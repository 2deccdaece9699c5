#!/usr/bin/env bash
# The pure-Python packages that benchmarks/gpu_suite.sh needs and the GPU machine's image lacks
# (it has torch, torchvision, lightning, scipy, scikit-image, opencv, matplotlib, but no package
# index), built here as wheels into .whl; carry that folder with the suite:
#
#   bash benchmarks/gpu_wheels.sh      # needs a package index here
#   # then on the GPU machine, carrying .whl:  bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf .whl
$PYTHON -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7 ttach==0.0.3 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
ls .whl
