#!/bin/bash
# Two train.py files side by side on one GPU: each run with the h100 profile on the carried data
# (.data/gpu/h100), an empty Inductor cache of its own and the same budget, one after the other.
# Usage (repository root): BUDGET=40 bash bench/gpu/compare_h100.sh OUTDIR A.py B.py
set -euo pipefail
OUTDIR=$1; shift
BUDGET=${BUDGET:-40}
source bench/gpu/setup.sh
for script in "$@"; do
  name=$(basename "$script" .py)
  WS=$(mktemp -d); cp "$script" $WS/train.py
  START=$(date +%s.%N)
  (cd $WS && TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) AUTORESEARCH_PROFILE=h100 AUTORESEARCH_DATA=$DATA \
    AUTORESEARCH_OUTPUT=$WS/out AUTORESEARCH_TIME_BUDGET=$BUDGET python3 train.py > $OUTDIR/compare-$name.log 2>&1)
  END=$(date +%s.%N)
  python3 - "$name" "$START" "$END" "$WS/out/result.json" <<'PY' | tee -a $OUTDIR/compare.txt
import json, sys
name, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
r = json.load(open(path))
print(f"{name}: {r['tokens_per_second'] / 1e6:.3f} M tokens/s over {r['training_seconds']:.1f} s ({r['num_steps']} steps), "
      f"process wall {end - start:.1f} s, warm-up steps {r['warmup_seconds']:.1f} s, peak {r['peak_vram_mb']:.0f} MiB, "
      f"val_bpb {r['val_bpb']:.4f}, attention {r['attention']}")
PY
done
