#!/bin/bash
# A full run of the train.py template with the h100 profile through the lab, as a night runs it (sandboxed,
# the lab's clock, the checkpoint scored by the lab in its model processes), on prepared data carried to the
# GPU box as .data/gpu/h100 (train.bin compressed with xz to fit the transfer limit): one baseline run, its
# train.log (progress lines and the summary block) and its row of the ledger.
# Usage (repository root): [BUDGET=300] bash bench/gpu/run_h100_profile.sh OUTDIR
set -euo pipefail
OUTDIR=${1:-/tmp/run_h100}
source bench/gpu/setup.sh
git config --global user.email bench@localhost; git config --global user.name bench
python3 - <<PY
from pathlib import Path
from autoresearch.harness import PreparedData, get_profile
from autoresearch.lab.decide import DecisionRule
from autoresearch.lab.workspace import Workspace
Workspace.create(Path("/tmp/ws"), tag="h100", profile="h100", data=PreparedData.open(Path("$DATA"), get_profile("h100")),
                 time_budget=${BUDGET:-300}, rule=DecisionRule(baseline_runs=1))
PY
START=$(date +%s)
python3 -m autoresearch baseline /tmp/ws 2>&1 | tee $OUTDIR/baseline.log
echo "wall_seconds: $(( $(date +%s) - START ))" | tee -a $OUTDIR/baseline.log
cp /tmp/ws/.autoresearch/trials/00001/train.log /tmp/ws/.autoresearch/trials/00001/result.json $OUTDIR/
