#!/bin/bash
# The sandbox on the GPU box: the GPU specs (cuDNN attention, the fused loss, the sandbox itself, as root),
# then bench/bench_lab.py's trials at the h100 profile, sandboxed and unsandboxed in turn.
set -uo pipefail
OUTDIR=${1:-/tmp/sandbox}
source bench/gpu/setup.sh
git config --global user.email bench@localhost; git config --global user.name bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
env | grep -E "^(LD_|CUDA|NVIDIA|NCCL|TORCH)" | sort
python3 -m pytest -q -p no:cacheprovider tests/test_cudnn_attention.py tests/test_softcap_loss.py tests/test_sandbox.py \
    2>&1 | tee $OUTDIR/tests.log | tail -25
python3 bench/bench_lab.py --profile h100 --data $DATA --budget ${BUDGET:-20} --trials ${TRIALS:-4} --out $OUTDIR/lab.json \
    2>&1 | tee $OUTDIR/lab.log | grep -v "^train step"
