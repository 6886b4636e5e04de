#!/bin/bash
# The real loop on the GPU box: workspace for the h100 profile (budget shortened), baseline x3,
# three `search` proposals, then status and report. (bench/gpu/setup.sh installs the carried wheels.)
set -uo pipefail
OUTDIR=${1:-/tmp/loop}
source bench/gpu/setup.sh
git config --global user.email loop@localhost; git config --global user.name loop
python3 - <<PY
from pathlib import Path
from autoresearch.harness import PreparedData, get_profile
from autoresearch.lab.workspace import Workspace
Workspace.create(Path("/tmp/ws"), tag="h100", profile="h100", data=PreparedData.open(Path("$DATA"), get_profile("h100")),
                 time_budget=${BUDGET:-30})
PY
cd /tmp/ws
timeout ${LOOP_SECONDS:-480} python3 -m autoresearch run --max-trials ${TRIALS:-3} 2>&1 | tee $OUTDIR/run.log
python3 -m autoresearch status 2>&1 | tee $OUTDIR/status.txt
python3 -m autoresearch report 2>&1 | tee $OUTDIR/report.txt
cp results.tsv $OUTDIR/ 2>/dev/null; cp .autoresearch/report/progress.png $OUTDIR/ 2>/dev/null; cp .autoresearch/report/report.html $OUTDIR/ 2>/dev/null
python3 - <<PY > $OUTDIR/trials.json
import json, sqlite3
db = sqlite3.connect(".autoresearch/ledger.db"); db.row_factory = sqlite3.Row
print(json.dumps([dict(r) for r in db.execute("select id, kind, description, status, reason, val_bpb, training_seconds, total_seconds, num_steps, mfu_percent, peak_vram_mb, hardware, decision from trials")], indent=1))
PY
