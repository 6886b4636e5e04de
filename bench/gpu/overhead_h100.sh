#!/bin/bash
# Overhead around the time budget: the train.py template run twice with the h100 profile on the
# carried data (.data/gpu/h100), first with an empty Inductor cache (cold compile), then with the
# cache the first run left (warm, as every later trial on the machine). Overhead is the process's
# wall time minus its training time (start-up, compile, uncounted warm-up steps, checkpoint,
# evaluation). Usage (repository root): BUDGET=30 [TEMPLATE=other/train.py] bash bench/gpu/overhead_h100.sh OUTDIR
set -euo pipefail
OUTDIR=${1:-/tmp/overhead_h100}
BUDGET=${BUDGET:-30}
source bench/gpu/setup.sh
WS=$(mktemp -d); cp ${TEMPLATE:-src/autoresearch/templates/train.py} $WS/train.py
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
cd $WS
for run in cold warm; do
  START=$(date +%s.%N)
  AUTORESEARCH_PROFILE=h100 AUTORESEARCH_DATA=$DATA AUTORESEARCH_OUTPUT=$WS/out-$run AUTORESEARCH_TIME_BUDGET=$BUDGET \
    python3 train.py > $OUTDIR/overhead-$run.log 2>&1
  END=$(date +%s.%N)
  python3 - "$run" "$START" "$END" "$WS/out-$run/result.json" <<'PY' | tee -a $OUTDIR/overhead.txt
import json, sys
run, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
r = json.load(open(path))
wall = end - start
print(f"{run}: process wall {wall:.1f} s, training {r['training_seconds']:.1f} s, overhead {wall - r['training_seconds']:.1f} s "
      f"(inside the script: total {r['total_seconds']:.1f} s, of which warm-up steps {r['warmup_seconds']:.1f} s, "
      f"evaluation {r['eval_seconds']:.1f} s); {r['tokens_per_second'] / 1e6:.3f} M tokens/s, "
      f"peak {r['peak_vram_mb']:.0f} MiB, val_bpb {r['val_bpb']:.4f}, steps {r['num_steps']}")
PY
done
