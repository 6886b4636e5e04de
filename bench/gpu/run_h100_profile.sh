#!/bin/bash
# A full run of the train.py template with the h100 profile on prepared data carried to the GPU box
# as .data/gpu/h100 (train.bin compressed with xz to fit the transfer limit), then a re-score of its
# checkpoint in a fresh process, as the lab does it. Usage (repository root): bash bench/gpu/run_h100_profile.sh OUTDIR
set -euo pipefail
OUTDIR=${1:-/tmp/run_h100}
source bench/gpu/setup.sh
WS=$(mktemp -d); cp src/autoresearch/templates/train.py $WS/
cd $WS
START=$(date +%s)
AUTORESEARCH_PROFILE=h100 AUTORESEARCH_DATA=$DATA AUTORESEARCH_OUTPUT=$WS/out python3 train.py 2>&1 | tee $OUTDIR/run.log
echo "wall_seconds: $(( $(date +%s) - START ))" | tee -a $OUTDIR/run.log
cp $WS/out/result.json $OUTDIR/
python3 - <<PY 2>&1 | tee -a $OUTDIR/run.log
import importlib.util, json, time, torch
from autoresearch import harness
spec = importlib.util.spec_from_file_location("train", "$WS/train.py"); t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
ck = torch.load("$WS/out/checkpoint.pt", map_location="cpu")
with torch.device("cuda"):
    m = t.build_model(ck["config"])
m.load_state_dict(ck["state_dict"])
import os; os.environ.update(AUTORESEARCH_PROFILE="h100", AUTORESEARCH_DATA="$DATA", AUTORESEARCH_OUTPUT="/tmp/rescore")
t0 = time.time(); bpb = harness.start_run().evaluate_bpb(m, 32)
print(f"rescored_val_bpb: {bpb:.6f} (in {time.time()-t0:.1f}s); in-run: {json.load(open('$WS/out/result.json'))['val_bpb']:.6f}")
PY
