"""Artifact size and export time per format × quantization, tiny or trained student (parity gate in its own
column). The full 1.7B shape: benchmarks/export_full_shape.py.

    python benchmarks/export_size.py                       # tiny student (random weights)
    python benchmarks/export_size.py --checkpoint DIR      # a trained student, e.g. runs/easyvqa/alignkd
    python benchmarks/export_size.py --formats gguf,onnx

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from alignkd.export.base import ExportOptions, get_target
from alignkd.export.parity import gate, parity_inputs
from alignkd.model import build_model, load_model
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="mtgv student directory (default: tiny-student, random weights)")
    ap.add_argument("--formats", default="pte,onnx,gguf")
    ap.add_argument("--json", default="benchmarks/export_size.json")
    a = ap.parse_args()
    if a.checkpoint:
        model, tok = load_model(a.checkpoint), load_tokenizer(a.checkpoint)
    else:
        model, tok = build_model("tiny-student", seed=0), load_tokenizer(tiny_tokenizer_dir())
    ids, pixels = parity_inputs(model, tok)
    rows = []
    for fmt in a.formats.split(","):
        target = get_target(fmt)
        for quant in target.quants:
            with tempfile.TemporaryDirectory() as d:
                opts = ExportOptions(quant=quant, threads=2)
                t0 = time.perf_counter()
                files = target.export(model, tok, Path(d), opts)
                export_s = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in files)
                t0 = time.perf_counter()
                rep = gate(target, model, Path(d), opts, ids, pixels)
                rows.append({"format": fmt, "quant": quant, "size_bytes": size, "export_s": round(export_s, 2),
                             "parity_s": round(time.perf_counter() - t0, 2), "parity_passed": rep["passed"],
                             "logits_rel": rep["logits_rel"], "top1": rep["top1_agreement"]})
    print(f"model: {model.config.name}")
    print(f"{'format':<8}{'quant':<9}{'size KiB':>10}{'export s':>10}{'parity':>8}{'logits rel':>12}{'top-1':>7}")
    for r in rows:
        print(f"{r['format']:<8}{r['quant']:<9}{r['size_bytes'] / 1024:>10.1f}{r['export_s']:>10.2f}"
              f"{'pass' if r['parity_passed'] else 'FAIL':>8}{r['logits_rel']:>12.2e}{r['top1']:>7.2f}")
    Path(a.json).write_text(json.dumps({"model": model.config.name, "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
