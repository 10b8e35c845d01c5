"""The measured column of docs/parity_gates.md: each quantized part of each export target on its own (the
others fp32), gated as `export` gates it, on the tiny student with spread norms (`spread_norms`: a fresh
model's unit norms hide a norm fault) and two inputs: the parity image (what `export` uses) and random pixels.

    python benchmarks/parity_gates.py                     # every row (about 10 min on 2 cores)
    python benchmarks/parity_gates.py --formats gguf,onnx

Prints measured against bound per row and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from alignkd.export.base import ExportOptions, get_target
from alignkd.export.parity import gate, parity_inputs
from alignkd.model import build_model, spread_norms
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

# (format, part, LM quant, options): one quantized part per row, every other part fp32 (the fp32 LM row is
# also the fp32 vision row).
PTE_FP32 = {"embedding_quant": "fp32", "vision_quant": "fp32"}
ROWS: list[tuple[str, str, str, dict]] = [
    *[("pte", "LM", q, PTE_FP32) for q in ("fp32", "8da4w", "8da8w", "int8")],
    *[("pte", "embedding", "fp32", {**PTE_FP32, "embedding_quant": q}) for q in ("8", "4")],
    *[("pte", "vision", "fp32", {**PTE_FP32, "vision_quant": q}) for q in ("8da8w", "8da4w")],
    *[("onnx", "LM", q, {"vision_quant": "fp32"}) for q in ("fp32", "fp16", "int8", "int4")],
    ("onnx", "LM", "int4", {"vision_quant": "fp32", "group_size": 32}),
    *[("onnx", "vision", "fp32", {"vision_quant": q}) for q in ("fp16", "int8", "int4")],
    *[("gguf", "LM", q, {"vision_quant": "fp32"}) for q in ("fp32", "fp16", "q8_0", "q4_0", "q4_k_m")],
    *[("gguf", "vision", "fp32", {"vision_quant": q}) for q in ("fp16", "q8_0")],
]
KEYS = ("logits_rel", "top1_agreement", "greedy_identical", "image_cos", "image_rel", "passed")


def measure(model, tok, fmt: str, quant: str, extra: dict, inputs: dict[str, tuple]) -> dict:
    """Export once; gate the artifact on each input."""
    target = get_target(fmt)
    opts = ExportOptions(quant=quant, threads=2, extra=extra)
    with tempfile.TemporaryDirectory() as d:
        target.export(model, tok, Path(d), opts)
        out = {}
        for name, (ids, pixels) in inputs.items():
            rep = gate(target, model, Path(d), opts, ids, pixels)
            out[name] = {k: rep.get(k) for k in KEYS}
        out["bound"] = rep["thresholds"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="pte,onnx,gguf")
    ap.add_argument("--json", default="benchmarks/parity_gates.json")
    a = ap.parse_args(argv)
    formats = a.formats.split(",")
    unknown = [f for f in formats if f not in {r[0] for r in ROWS}]
    if unknown:
        ap.error(f"--formats: unknown format {', '.join(unknown)} (pte, onnx, gguf)")
    torch.set_num_threads(2)
    model, tok = spread_norms(build_model("tiny-student", seed=0), seed=0), load_tokenizer(tiny_tokenizer_dir())
    ids, image = parity_inputs(model, tok)
    noise = np.random.default_rng(0).standard_normal(image.shape).astype(np.float32)
    inputs = {"image": (ids, image), "noise": (ids, noise)}
    rows = []
    print(f"{'format':<8}{'part':<11}{'LM':<7}{'options':<26}{'logits rel':>19}{'top-1':>13}{'same':>6}"
          f"{'image 1-cos':>19}{'image rel':>19}  gate")
    for fmt, part, quant, extra in (r for r in ROWS if r[0] in formats):
        m = measure(model, tok, fmt, quant, extra, inputs)
        rows.append({"format": fmt, "part": part, "quant": quant, "options": extra, **m})
        i, n, b = m["image"], m["noise"], m["bound"]

        def pair(k, f):
            return f"{f(i[k])} / {f(n[k])}"
        opt = ",".join(f"{k}={v}" for k, v in extra.items() if v != "fp32")
        print(f"{fmt:<8}{part:<11}{quant:<7}{opt:<26}{pair('logits_rel', '{:.1e}'.format):>19}"
              f"{pair('top1_agreement', '{:.2f}'.format):>13}{'yes' if i['greedy_identical'] and n['greedy_identical'] else 'no':>6}"
              f"{pair('image_cos', lambda c: f'{1 - c:.0e}'):>19}{pair('image_rel', '{:.1e}'.format):>19}"
              f"  {'pass' if i['passed'] and n['passed'] else 'FAIL'} (rel ≤ {b['logits_rel']:g}, top-1 ≥ {b['top1']:g}, "
              f"1-cos ≤ {1 - b['image_cos']:g}, image rel ≤ {b['image_rel']:g})", flush=True)
    Path(a.json).write_text(json.dumps({"model": "tiny-student, spread norms (seed 0)", "inputs": list(inputs),
                                        "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
