#!/usr/bin/env bash
# The training recipe end to end on one GPU (tiny presets, easy-vqa): bf16 autocast, fused AdamW,
# compile=true against compile=false, a checkpoint and an exact resume. Prints the loss terms side by side.
#
#   bash benchmarks/gpu_recipe_check.sh [OUT_DIR]      # needs CUDA and the easy-vqa package
set -euo pipefail
out=${1:-runs/gpu_check}
py=${PYTHON:-python3}
rm -rf "$out"
mkdir -p "$(dirname "$out")"
args=(method=alignkd teacher=tiny-teacher steps=40 batch_size=16 data.limit=640 lr=1e-3 save_every=20
      keep_last=3 progress=false seed=0)
for c in false true; do
  t0=$SECONDS
  $py -m alignkd.cli train --output-dir "$out/compile-$c" "${args[@]}" compile=$c >"$out-compile-$c.log"
  echo "compile=$c: $((SECONDS - t0)) s wall"
done
# resume: drop the last checkpoint and the log lines after step 20, run again, compare
keep=$(mktemp)
cp "$out/compile-true/train/metrics.jsonl" "$keep"
rm -rf "$out/compile-true/train/checkpoints/step-000040"
$py -m alignkd.cli train --output-dir "$out/compile-true" "${args[@]}" compile=true >"$out-resume.log"
$py - "$out" "$keep" <<'EOF'
import json, sys
from pathlib import Path
out, keep = Path(sys.argv[1]), Path(sys.argv[2])
load = lambda p: [json.loads(x) for x in p.read_text().splitlines()]
eager, comp, first = load(out / "compile-false/train/metrics.jsonl"), load(out / "compile-true/train/metrics.jsonl"), load(keep)
print(f"{'step':>5} {'total eager':>12} {'total compiled':>15} {'rel diff':>9} {'resumed':>12}")
for a, b, c in zip(eager, first, comp):
    if a["step"] % 5 == 0:
        print(f"{a['step']:>5} {a['total']:>12.5f} {b['total']:>15.5f} {abs(a['total'] - b['total']) / abs(a['total']):>9.2e} {c['total']:>12.5f}")
worst = max(abs(a["total"] - b["total"]) / abs(a["total"]) for a, b in zip(eager, first))
same = all(b["total"] == c["total"] for b, c in zip(first, comp) if c["step"] > 20)
print(f"compiled vs eager: worst relative difference {worst:.2e}; resumed run repeats steps 21-40 exactly: {same}")
EOF
