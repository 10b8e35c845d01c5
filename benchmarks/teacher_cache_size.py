"""Bytes per KD position of an offline teacher cache (`alignkd-mobile teacher-cache`), measured on the files.

    python benchmarks/teacher_cache_size.py                      # k = 8, 32 and every token; 2,000 samples
    python benchmarks/teacher_cache_size.py --samples 500 --real-k 32,50,128

1. easy-vqa with the tiny presets (vocabulary 512): the real command path (`build_teacher_cache`) over the
   first --samples training samples at k = 8, 32 and 512 (every token), tiny teacher on this machine.
2. the real vocabulary (32,000) at --real-k: caches written through the same writer from random teacher
   logits, --real-rows KD positions per sample (an answer of that many tokens), so the per-sample overhead
   (32-byte key, 8-byte offset) is amortised as in LLaVA-style data.

Each row: KD positions, bytes on disk (shards; the manifest is not counted), bytes per KD position, and the
format's own account of it: 4·k (a float16 log-prob and a uint16 id per entry) + 40 bytes per sample +
the safetensors headers. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import torch

from alignkd.distill import teacher_topk
from alignkd.train.config import load_config
from alignkd.train.recipe import build_teacher_cache
from alignkd.train.teacher_cache import CacheSpec, CacheWriter, finalize


def easyvqa_row(root: Path, k: int, samples: int) -> dict:
    cfg = load_config(flags={"teacher": "tiny-teacher", "teacher_cache": str(root), "data.limit": samples,
                             "loss.kd_topk": k, "batch_size": 32, "progress": False})
    s = build_teacher_cache(cfg)
    return {"data": "easy-vqa, tiny presets", "vocab": 512, "k": s["k"], "samples": s["samples"],
            "kd_positions": s["kd_positions"], "bytes": s["bytes"], "samples_per_s": s["samples_per_s"]}


def real_vocab_row(root: Path, k: int, samples: int, rows: int, vocab: int = 32000) -> dict:
    spec = CacheSpec(teacher={"preset": "random"}, k=k, temperature=1.0, kd_positions="text", template="v1",
                     vocab_size=vocab)
    writer = CacheWriter(root, spec)
    g = torch.Generator().manual_seed(0)
    for i in range(samples):
        writer.add(hashlib.sha256(str(i).encode()).digest(), *teacher_topk(torch.randn(rows, vocab, generator=g) * 3, k))
    writer.flush()
    m = finalize(root, spec)
    return {"data": f"random, {rows} KD positions per sample", "vocab": vocab, "k": k, "samples": m["samples"],
            "kd_positions": m["rows"], "bytes": m["bytes"], "samples_per_s": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="easy-vqa training samples cached")
    ap.add_argument("--tiny-k", default="8,32,full")
    ap.add_argument("--real-k", default="8,32,50")
    ap.add_argument("--real-samples", type=int, default=256)
    ap.add_argument("--real-rows", type=int, default=100)
    ap.add_argument("--json", default="benchmarks/teacher_cache_size.json")
    a = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory(prefix="cache-size-") as tmp:
        for k in a.tiny_k.split(","):
            out.append(easyvqa_row(Path(tmp) / f"tiny-{k}", 512 if k == "full" else int(k), a.samples))
        for k in a.real_k.split(","):
            out.append(real_vocab_row(Path(tmp) / f"real-{k}", int(k), a.real_samples, a.real_rows))
    for r in out:
        r["bytes_per_kd_position"] = round(r["bytes"] / r["kd_positions"], 1)
        r["entries_bytes_per_kd_position"] = 4 * r["k"]  # float16 log-prob + uint16 id
        r["kd_positions_per_sample"] = round(r["kd_positions"] / r["samples"], 2)
    print(f"{'data':<36}{'vocab':>7}{'k':>6}{'samples':>9}{'KD pos':>9}{'pos/sample':>11}{'bytes':>12}"
          f"{'B/KD pos':>10}{'4k':>7}{'samples/s':>11}")
    for r in out:
        print(f"{r['data']:<36}{r['vocab']:>7}{r['k']:>6}{r['samples']:>9}{r['kd_positions']:>9}"
              f"{r['kd_positions_per_sample']:>11}{r['bytes']:>12}{r['bytes_per_kd_position']:>10}"
              f"{r['entries_bytes_per_kd_position']:>7}{r['samples_per_s'] or '':>11}")
    Path(a.json).write_text(json.dumps({"rows": out, "torch": torch.__version__}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
