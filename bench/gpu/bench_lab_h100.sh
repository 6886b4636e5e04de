#!/bin/bash
# Lab overhead on the GPU box: bench/bench_lab.py with the h100 profile on carried data.
set -euo pipefail
OUTDIR=${1:-/tmp/lab}
source bench/gpu/setup.sh
git config --global user.email bench@localhost; git config --global user.name bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
python3 bench/bench_lab.py --profile h100 --data $DATA --budget 20 --trials 2 --out $OUTDIR/lab.json 2>&1 | tee $OUTDIR/lab.log
