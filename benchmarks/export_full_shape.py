"""The export at the real MobileVLM V2 1.7B shape: time, peak memory and size per format, the android bundle's
size, the image-token error of each vision quantization against the fp32 encoder, and whether llama.cpp's
extra CPU buffer types (AMX, repacked weights: its default) work at this width.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/export_full_shape.py --work /work/scratch/$USER/full

1. A `mobilevlm-v2-1.7b` checkpoint with random weights (seed 0), written in bf16 by `save_model` with a
   SentencePiece tokenizer of the model's vocabulary size (kept in --work for the next run).
2. One `alignkd-mobile export` per job (`JOBS`), each in its own process, one at a time: wall time, peak RSS
   of that process (its rusage), and from the bundle: the size of each artifact, the export and gate times,
   and the parity gate's numbers (image tokens against the fp32 encoder, logits, top-1).
3. The GGUF q4_0 pair loaded with and without llama.cpp's extra buffer types, each in a child process: does
   `llama_decode` crash, do the greedy tokens and logits agree, how fast does it decode.

Random weights: the logits are near-flat, so top-1 flips on near-ties (a real checkpoint is peakier); the
image-token numbers do not depend on that. Hence `--allow-failed-parity`: every bundle is written and its
gate's numbers reported, passed or not. Writes export_full_shape.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("alignkd-mobile"))
# name → export arguments. The android default first: LM 8da4w, vision 8da8w, 4-bit token table.
JOBS: dict[str, list[str]] = {
    "android": ["--target", "android"],
    "onnx": ["--target", "desktop", "--format", "onnx"],
    "gguf": ["--target", "desktop", "--format", "gguf"],
    "onnx-vision-int8": ["--target", "desktop", "--format", "onnx", "--vision-quant", "int8"],
    "gguf-mmproj-f16": ["--target", "desktop", "--format", "gguf", "--vision-quant", "fp16"],
    "pte-vision-8da4w": ["--target", "android", "--vision-quant", "8da4w"],
}
GIB = 2**30


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run cmd to completion with its output in log: exit code, wall seconds, the child's own peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}


def make_checkpoint(work: Path, preset: str) -> tuple[Path, dict]:
    ckpt = work / f"ckpt-{preset}"
    if (ckpt / "config.json").is_file():
        return ckpt, {"cached": True}
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks'); from runtime_latency import synthetic_tokenizer; "
            "from alignkd.model import build_model, save_model; "
            f"m = build_model({preset!r}, seed=0); "
            f"from pathlib import Path; tok = synthetic_tokenizer(m.config.text.vocab_size, Path({str(work / 'tokenizer')!r})); "
            f"save_model(m, {str(ckpt)!r}, tokenizer=tok, dtype=torch.bfloat16)")
    r = run_measured([sys.executable, "-c", code], work / "checkpoint.log")
    if r["returncode"]:
        raise SystemExit(f"making the checkpoint failed: see {work / 'checkpoint.log'}")
    return ckpt, r


def bundle_facts(bundle: Path) -> dict:
    """Sizes, timings and parity of each artifact, from the manifest (or, after a failed gate, from the
    report and the files left in BUNDLE.failed)."""
    failed = bundle.with_name(bundle.name + ".failed")
    root = bundle if (bundle / "manifest.json").is_file() else failed
    report = json.loads((root / "parity_report.json").read_text())
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    out = {"bundle_bytes": sum(files.values()), "complete": root == bundle, "artifacts": {}}
    for key, rep in report["artifacts"].items():
        mine = {k: v for k, v in files.items() if k.startswith(key + "/")}
        out["artifacts"][key] = {
            "files": mine, "bytes": sum(mine.values()), "options": rep["options"], "export_s": rep["export_s"],
            "gate_s": rep["gate_s"], "passed": rep["passed"], "failures": rep["failures"],
            **{k: rep[k] for k in ("image_cos", "image_rel", "logits_rel", "top1_agreement", "greedy_identical")},
            **({"faithful_image_cos": rep["faithful_divergence"]["image_cos"]} if "faithful_divergence" in rep else {}),
        }
    return out


AMX_WORKER = """
import faulthandler, json, sys, time
import numpy as np
from alignkd.export.gguf.runtime import GgufRuntime
from alignkd.export.runtime import generate
faulthandler.enable()  # a segfault prints the Python stack: which call crashed
lm, mm, extra = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
rt = GgufRuntime(lm, mm, threads=2, extra_bufts=extra)
load_s = time.perf_counter() - t0
pixels = np.load(sys.argv[4])
prompt = [1] + list(range(100, 131)) + [-200] + list(range(200, 232))
g = generate(rt, prompt, pixels, 32, eos_id=None, num_image_tokens=144)
rt.close()
print(json.dumps({"load_s": load_s, "tokens": g.tokens, "prompt_logits": g.prompt_logits.tolist(),
                  "image_s": g.timings["image_s"], "prefill_s": g.timings["prefill_s"],
                  "decode_tok_s": g.timings["decode_steps"] / g.timings["decode_s"]}))
"""


def amx_check(bundle: Path, work: Path, preset: str) -> dict:
    """The q4_0 GGUF pair with llama.cpp's extra buffer types (its default) and without (our runtime's)."""
    import numpy as np

    from alignkd.data.image import image_config, preprocess
    from alignkd.export.gguf.target import artifact_files
    from alignkd.export.parity import parity_image
    from alignkd.model.config import get_preset

    root = bundle if (bundle / "manifest.json").is_file() else bundle.with_name(bundle.name + ".failed")
    lm, mm = artifact_files(root / "gguf" / "q4_0", "q4_0")
    px = work / "pixels.npy"
    np.save(px, preprocess(parity_image(), image_config(get_preset(preset)))[None].numpy())
    out = {}
    for name, flag in (("extra_bufts", "1"), ("no_extra_bufts", "0")):
        r = subprocess.run([sys.executable, "-c", AMX_WORKER, str(lm), str(mm), flag, str(px)], capture_output=True,
                           text=True, cwd=REPO, timeout=900)
        out[name] = {"returncode": r.returncode, "crashed": r.returncode < 0}
        if r.returncode == 0:
            out[name].update(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            out[name]["stderr_tail"] = [ln for ln in r.stderr.strip().splitlines() if "File" in ln][:4]
    a, b = out["extra_bufts"], out["no_extra_bufts"]
    if a["returncode"] == 0 and b["returncode"] == 0:
        la, lb = np.asarray(a.pop("prompt_logits")), np.asarray(b.pop("prompt_logits"))
        out["logits_rel"] = float(np.abs(la - lb).max() / (lb.max() - lb.min()))
        out["same_tokens"] = a["tokens"] == b["tokens"]
        out["decode_speedup"] = round(a["decode_tok_s"] / b["decode_tok_s"], 3)
    for r in out.values():
        if isinstance(r, dict):
            r.pop("prompt_logits", None)
    return out


def table(result: dict) -> str:
    rows = ["| job | artifact | vision | size MiB | export s | gate s | wall s | peak RSS GiB | image cos | image rel | "
            "logits rel | top-1 | gate |", "|" + "---|" * 13]
    for name, job in result["jobs"].items():
        for key, a in job.get("artifacts", {}).items():
            rows.append(f"| {name} | {key} | {a['options'].get('vision_quant', '')} | {a['bytes'] / 2**20:.0f} | "
                        f"{a['export_s']:.0f} | {a['gate_s']:.0f} | {job['wall_s']:.0f} | {job['peak_rss_gib']:.1f} | "
                        f"{a['image_cos']:.5f} | {a['image_rel']:.2e} | {a['logits_rel']:.2e} | {a['top1_agreement']:.2f} | "
                        f"{'pass' if a['passed'] else 'FAIL'} |")
    return "\n".join(rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before the checkpoint is built: a bad one is one `ap.error` (exit 2).
    a.work and a.out come back absolute, a.jobs as a list, a.earlier as the rows --update keeps (or None)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the checkpoint and bundles (several GB)")
    ap.add_argument("--out", help="where the JSON and table go (default: --work)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of: {', '.join(JOBS)}")
    ap.add_argument("--keep", action="store_true", help="keep the bundles (default: removed after measuring)")
    ap.add_argument("--update", action="store_true", help="replace only these jobs in --out's existing "
                    "export_full_shape.json (a rerun of some rows keeps the others)")
    ap.add_argument("--preset", default="mobilevlm-v2-1.7b", help="the shape (tiny-student for a quick try)")
    a = ap.parse_args(argv)
    from alignkd.model import PRESETS

    if a.preset not in PRESETS:
        ap.error(f"--preset: unknown preset {a.preset!r} (known: {', '.join(PRESETS)})")
    a.jobs = a.jobs.split(",")
    if unknown := [j for j in a.jobs if j not in JOBS]:
        ap.error(f"--jobs: unknown job(s) {', '.join(map(repr, unknown))} (known: {', '.join(JOBS)})")
    # absolute: the export processes run with cwd=REPO, a relative path would land inside the repository
    a.work = Path(a.work).resolve()
    a.out = Path(a.out).resolve() if a.out else a.work
    for flag, folder in (("--work", a.work), ("--out", a.out)):
        if folder.exists() and not folder.is_dir():
            ap.error(f"{flag}: {folder} exists and is not a folder")
    earlier = a.out / "export_full_shape.json"
    for f in (earlier, earlier.with_suffix(".md")):
        if f.is_dir():
            ap.error(f"--out: {f} is a folder, where the results go")
    a.earlier = None
    if a.update and earlier.is_file():
        try:
            a.earlier = json.loads(earlier.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--update: {earlier} is not readable JSON ({e})")
        if not (isinstance(a.earlier, dict) and isinstance(a.earlier.get("preset"), str)
                and isinstance(a.earlier.get("jobs"), dict) and all(isinstance(j, dict) for j in a.earlier["jobs"].values())):
            ap.error(f"--update: {earlier} is not this script's results (an object with preset and jobs)")
        if a.earlier["preset"] != a.preset:  # before any checkpoint is written
            ap.error(f"--update: {earlier} is of {a.earlier['preset']}, not {a.preset}")
    for flag, folder in (("--work", a.work), ("--out", a.out)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            ap.error(f"{flag}: cannot make the folder {folder}: {e}")
    return a


def main() -> None:
    a = parse()
    work, out = a.work, a.out
    ckpt, made = make_checkpoint(work, a.preset)
    result = a.earlier or {"preset": a.preset, "checkpoint": made, "jobs": {}}
    for name in a.jobs:
        bundle = work / f"bundle-{name}"
        print(f"{name}: alignkd-mobile export {' '.join(JOBS[name])}", flush=True)
        # --allow-failed-parity: random weights fail the 4-bit LM's logits gate (near-flat logits); the bundle
        # is still written, with its gate numbers, so every format goes through to the end
        job = run_measured([CLI, "export", str(ckpt), "--output-dir", str(bundle), "--overwrite", *JOBS[name],
                            "--allow-failed-parity"], work / f"{name}.log")
        job["args"] = JOBS[name]
        if (bundle / "manifest.json").exists() or bundle.with_name(bundle.name + ".failed").exists():
            job.update(bundle_facts(bundle))
            if name == "gguf":
                job["amx"] = amx_check(bundle, work, a.preset)
        result["jobs"][name] = job | {"measured": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps({k: v for k, v in job.items() if k != "artifacts"}), flush=True)
        if not a.keep:
            for d in (bundle, bundle.with_name(bundle.name + ".failed")):
                subprocess.run(["rm", "-rf", str(d)], check=True)
    from alignkd.fileio import atomic_write  # (--update rewrites earlier rows: never leave them torn)

    atomic_write(out / "export_full_shape.json", json.dumps(result, indent=2))
    atomic_write(out / "export_full_shape.md", table(result) + "\n")
    print(table(result))
    print(f"wrote {out / 'export_full_shape.json'} and .md")


if __name__ == "__main__":
    main()
