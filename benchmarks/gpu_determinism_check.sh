#!/usr/bin/env bash
# Is a GPU training run repeatable? Two identical runs without deterministic=true, then a deterministic=true
# run killed after its step-15 checkpoint and resumed: prints the largest loss difference of each pair.
#   bash benchmarks/gpu_determinism_check.sh OUT_DIR      # needs the easy-vqa package
set -uo pipefail
py=${PYTHON:-python3}; out=$1; mkdir -p $out
args=(method=alignkd teacher=tiny-teacher steps=30 batch_size=16 data.limit=640 lr=1e-3 save_every=15 keep_last=3 progress=false seed=0)
for r in a b; do $py -m alignkd.cli train --output-dir $out/eager-$r "${args[@]}" >/dev/null; done
$py -m alignkd.cli train --output-dir $out/det "${args[@]}" deterministic=true >/dev/null
cp $out/det/train/metrics.jsonl $out/det-first.jsonl
rm -rf $out/det/train/checkpoints/step-000030
$py -m alignkd.cli train --output-dir $out/det "${args[@]}" deterministic=true >/dev/null
$py - $out <<'PY'
import json, sys
from pathlib import Path
o = Path(sys.argv[1]); L = lambda p: [json.loads(x)["total"] for x in p.read_text().splitlines()]
a, b = L(o/"eager-a/train/metrics.jsonl"), L(o/"eager-b/train/metrics.jsonl")
d1, d2 = L(o/"det-first.jsonl"), L(o/"det/train/metrics.jsonl")
print("two identical eager runs: max |diff|", max(abs(x-y) for x, y in zip(a, b)), "first differing step", next((i+1 for i,(x,y) in enumerate(zip(a,b)) if x!=y), None))
print("deterministic=true, resumed at 15: max |diff|", max(abs(x-y) for x, y in zip(d1, d2)), "equal:", d1 == d2)
PY
