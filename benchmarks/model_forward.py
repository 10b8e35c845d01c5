"""Forward throughput of the MobileVLM presets on this machine: tokens/s of a multimodal forward.

    python benchmarks/model_forward.py                 # tiny presets
    python benchmarks/model_forward.py --full          # + mobilevlm-v2-1.7b with random weights (slow, ~7 GB)
    python benchmarks/model_forward.py --json out.json

Prints a table and writes JSON. Each row: one forward of batch × (text + 144 image) positions, CLIP
included, no grad, fp32, median of `--repeats` after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from alignkd.model import IMAGE_TOKEN_INDEX, build_model


def bench(preset: str, batch: int, text_len: int, repeats: int) -> dict:
    model = build_model(preset, seed=0)
    cfg = model.config
    s = cfg.vision.image_size
    ids = torch.randint(3, cfg.text.vocab_size, (batch, text_len))
    ids[:, 0] = cfg.text.bos_token_id
    ids[:, 1] = IMAGE_TOKEN_INDEX
    pixels = torch.randn(batch, 3, s, s)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(ids, pixel_values=pixels)
            if i:
                times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    positions = batch * (text_len - 1 + cfg.num_image_tokens)
    return {"preset": preset, "batch": batch, "positions": positions, "seconds": round(t, 4),
            "tokens_per_s": round(positions / t, 1), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also the real 1.7B shape (random weights)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/model_forward.json")
    a = ap.parse_args()
    presets = ["tiny-student", "tiny-teacher"] + (["mobilevlm-v2-1.7b"] if a.full else [])
    rows = [bench(p, a.batch if p.startswith("tiny") else 1, a.text_len, a.repeats) for p in presets]
    print(f"{'preset':<20}{'batch':>6}{'positions':>11}{'seconds':>10}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['preset']:<20}{r['batch']:>6}{r['positions']:>11}{r['seconds']:>10.4f}{r['tokens_per_s']:>12.1f}")
    with open(a.json, "w") as f:
        json.dump({"rows": rows, "torch": torch.__version__}, f, indent=2)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
