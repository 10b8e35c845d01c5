#!/usr/bin/env bash
# The teacher cache on a GPU, in one run (issue #15's device check):
#   1. the real-shape step row: plain / online Align-KD / cached Align-KD, eager and compiled (goal lines printed),
#      and the cache build's time per batch (the whole 7B teacher in inference mode: samples/s = batch / seconds);
#   2. `teacher-cache` on CUDA (bf16) against the same build on the CPU (fp32), tiny presets, easy-vqa:
#      top-1 agreement, top-k overlap and the largest log-prob difference per KD position;
#   3. `train` on CUDA, same seed: online Align-KD, from the CUDA-built cache (k = 32), and from a cache of every
#      token (k = the vocabulary: online KD up to the cache's float16 log-probs, ~5e-4 relative on a CPU): the
#      loss terms side by side.
#   4. `eval` of the online student on CUDA (bf16, the default there) against the CPU (fp32): easy-vqa accuracy,
#      answers that agree, wall time.
#
#   bash benchmarks/gpu_cache_check.sh OUT_DIR    # needs easy_vqa importable (PYTHONPATH) for 2 and 3
#   TINY=1 bash benchmarks/gpu_cache_check.sh OUT_DIR    # 1 at tiny presets: a dry run of the script on a CPU
# On the device machine (no network, no install; its image has torch and transformers, not easy_vqa or matplotlib):
#   mkdir -p runs/gpu_deps && cp -r .venv/lib/python3.*/site-packages/easy_vqa runs/gpu_deps/    # here, 22 MB
#   PYTHONPATH=.:runs/gpu_deps bash benchmarks/gpu_cache_check.sh $OUT                           # there, carry runs/gpu_deps
set -uo pipefail
py=${PYTHON:-python3}
out=${1:?usage: gpu_cache_check.sh OUT_DIR}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then echo "error: $out is not empty: name a new folder" >&2; exit 2; fi
limit=${STEP1_LIMIT:-330}  # seconds for step 1 (both of its runs together)
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || { echo "error: STEP1_LIMIT must be a whole number of seconds, got '$limit'" >&2; exit 2; }
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the repository's alignkd, installed or not
$py -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
$py -c "import easy_vqa" 2>/dev/null || echo "easy_vqa is not importable: steps 2 to 4 will fail (see the header)"

echo "== 1. train_step at real shapes =="
size=(); [ -n "${TINY:-}" ] && size=(--tiny)
# The goal's ratio from interleaved rounds (a GPU machine drifts too; about 1 min), then every kind one after the
# other for its own peak memory, the goal's pair first and the costliest kind (the whole 7B teacher compiled) last.
# Each sequential row is printed and kept in the JSON as soon as it is measured; STEP1_LIMIT (seconds, for both)
# stops this step so that steps 2 to 4 still run.
t0=$SECONDS
timeout "$limit" $py benchmarks/train_step.py "${size[@]}" --steps 10 --rounds 5 --cache-k 32 \
  --kinds plain+compile,cached+compile --json "$out/train_step_gpu_interleaved.json" \
  || echo "interleaved rounds stopped (exit $?)"
left=$((limit - (SECONDS - t0))); [ "$left" -lt 1 ] && left=1
timeout "$left" $py benchmarks/train_step.py "${size[@]}" --steps 10 --cache-k 32 \
  --kinds plain+compile,cached+compile,plain,cached,cache-build,alignkd,alignkd+compile \
  --json "$out/train_step_gpu.json" || echo "train_step stopped (exit $?): the rows above are those measured"

echo "== 2. teacher-cache: CUDA bf16 against CPU fp32 (tiny presets, easy-vqa) =="
args=(method=alignkd teacher=tiny-teacher batch_size=16 data.limit=256 progress=false seed=0)
t0=$SECONDS
$py -m alignkd.cli teacher-cache --output-dir "$out/cache-cuda" "${args[@]}" > "$out/cache-cuda.log" 2>&1 \
  || { echo "cuda build failed:"; tail -5 "$out/cache-cuda.log"; }
echo "cuda build: $((SECONDS - t0)) s wall"
CUDA_VISIBLE_DEVICES= $py -m alignkd.cli teacher-cache --output-dir "$out/cache-cpu" "${args[@]}" \
  > "$out/cache-cpu.log" 2>&1 || { echo "cpu build failed:"; tail -5 "$out/cache-cpu.log"; }
$py - "$out" <<'PY'
import json, sys
from pathlib import Path
from alignkd.train.teacher_cache import CacheSpec, TeacherCache
out = Path(sys.argv[1])
spec = CacheSpec(**json.loads((out / "cache-cpu/cache.json").read_text())["spec"])
cpu, gpu = TeacherCache(out / "cache-cpu", spec), TeacherCache(out / "cache-cuda", spec)
assert set(cpu) == set(gpu), "the two caches hold other samples"
rows = top1 = 0; overlap = worst = 0.0
for key in cpu:
    (lc, ic), (lg, ig) = cpu.lookup(key), gpu.lookup(key)  # (R, k) each
    rows += len(ic); top1 += int((ic[:, 0] == ig[:, 0]).sum())
    for a, b, la, lb in zip(ic.tolist(), ig.tolist(), lc, lg):
        overlap += len(set(a) & set(b)) / len(a)
        common = {t: i for i, t in enumerate(b)}
        worst = max([worst] + [abs(float(la[i]) - float(lb[common[t]])) for i, t in enumerate(a) if t in common])
print(f"{len(cpu)} samples, {rows} KD positions, k = {spec.k}: top-1 same {top1 / rows:.4f}, "
      f"top-k overlap {overlap / rows:.4f}, max |log-prob diff| on shared ids {worst:.3g}")
PY

echo "== 3. train on CUDA: online Align-KD, from the cache at k = 32 and at k = vocabulary (tiny presets, 40 steps) =="
vocab=$($py -c "from alignkd.model import get_preset; print(get_preset('tiny-teacher').text.vocab_size)")
$py -m alignkd.cli teacher-cache --output-dir "$out/cache-cuda-full" "${args[@]}" loss.kd_topk="$vocab" \
  > "$out/cache-cuda-full.log" 2>&1 || { echo "full-vocabulary build failed:"; tail -5 "$out/cache-cuda-full.log"; }
train=("${args[@]}" steps=40 lr=1e-3 save_every=40 keep_last=1)
for run in online cached cached-full; do
  cache=(); [ "$run" = cached ] && cache=(teacher_cache="$out/cache-cuda")
  [ "$run" = cached-full ] && cache=(teacher_cache="$out/cache-cuda-full")
  $py -m alignkd.cli train --output-dir "$out/$run" "${train[@]}" "${cache[@]}" > "$out/$run.log" 2>&1 \
    || { echo "$run train failed:"; tail -5 "$out/$run.log"; }
done
$py - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
load = lambda run: [json.loads(x) for x in (out / run / "train/metrics.jsonl").read_text().splitlines()]
runs = ("online", "cached", "cached-full")
logs = [load(r) for r in runs]
print(f"{'step':>5} " + " ".join(f"{t + ' ' + r:>16}" for t in ("kd", "total") for r in runs))
for rows in zip(*logs):
    if rows[0]["step"] % 10 == 0 or rows[0]["step"] == 1:
        print(f"{rows[0]['step']:>5} " + " ".join(f"{x[t]:>16.5f}" for t in ("kd", "total") for x in rows))
worst = max(abs(a["kd"] - c["kd"]) / abs(a["kd"]) for a, c in zip(logs[0], logs[2]) if a["kd"])
print(f"KD from the full-vocabulary cache against online KD: worst relative difference over 40 steps {worst:.2e}")
PY

echo "== 4. eval on CUDA (bf16) against the CPU (fp32): the online student, 500 easy-vqa questions =="
for where in cuda cpu; do
  t0=$SECONDS
  if [ $where = cpu ]; then hide=(env CUDA_VISIBLE_DEVICES=); else hide=(); fi
  "${hide[@]}" $py -m alignkd.cli eval "$out/online" --limit 500 --output-dir "$out/eval-$where" > "$out/eval-$where.log" 2>&1 \
    || { echo "$where eval failed:"; tail -5 "$out/eval-$where.log"; }
  echo "$where eval: $((SECONDS - t0)) s wall"
done
$py - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {w: {json.loads(x)["question_id"]: json.loads(x)["text"] for x in
            (out / f"eval-{w}/answers/online/easyvqa.jsonl").read_text().splitlines()} for w in ("cuda", "cpu")}
acc = {w: json.loads((out / f"eval-{w}/report.json").read_text())["metrics"]["online"]["easyvqa"]["accuracy"]
       for w in rows}
same = sum(rows["cuda"][q] == rows["cpu"].get(q) for q in rows["cuda"])
print(f"easy-vqa accuracy: cuda bf16 {acc['cuda']} %, cpu fp32 {acc['cpu']} %; same answer {same} of {len(rows['cuda'])}")
PY
