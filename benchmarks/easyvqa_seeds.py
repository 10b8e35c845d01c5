"""Align-KD vs the baseline on easy-vqa over several seeds: mean ± std of held-out accuracy.

    python benchmarks/easyvqa_seeds.py --seeds 0 1 2            # the embedded recipe, 3 seeds
    python benchmarks/easyvqa_seeds.py student_steps=100 methods=baseline,logit-kd,alignkd --seeds 0 1 2

One teacher (seed 0, trained once and reused), then for each seed the students with identical data order,
steps and init. Every seed and method is scored on the same held-out questions (eval_seed, default 0):
the seed changes training only. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from alignkd.demo import DemoConfig, run_demo
from alignkd.train.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", default="runs/easyvqa_seeds")
    ap.add_argument("--json", default="benchmarks/easyvqa_seeds.json")
    ap.add_argument("overrides", nargs="*", help="DemoConfig key=value (student_steps=, lr=, eval_limit=...)")
    a = ap.parse_args()
    out = Path(a.output_dir)
    rows = []
    for seed in a.seeds:
        # the teacher keeps seed 0 in a shared folder: the students' seed changes init and data order only
        cfg = load_config(None, a.overrides, cls=DemoConfig,
                          flags={"output_dir": str(out / f"seed{seed}"), "seed": seed, "progress": False})
        teacher_home = out / "teacher"
        _share_teacher(cfg, teacher_home)
        s = run_demo(cfg)
        rows.append({"seed": seed, "teacher": s["teacher"]["accuracy"],
                     **{m: r["accuracy"] for m, r in s["methods"].items()}})
    cols = [k for k in rows[0] if k != "seed"]
    summary = {}
    for k in cols:
        xs = [r[k] for r in rows]
        summary[k] = {"mean": round(statistics.mean(xs), 2), "std": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0}
    deltas = [r["alignkd"] - r["baseline"] for r in rows]
    summary["delta"] = {"mean": round(statistics.mean(deltas), 2),
                        "std": round(statistics.stdev(deltas), 2) if len(deltas) > 1 else 0.0,
                        "wins": sum(d > 0 for d in deltas), "of": len(deltas)}
    print(f"{'seed':>5}" + "".join(f"{c:>10}" for c in cols) + f"{'Δ alkd-base':>13}")
    for r in rows:
        print(f"{r['seed']:>5}" + "".join(f"{r[c]:>10.2f}" for c in cols) + f"{r['alignkd'] - r['baseline']:>+13.2f}")
    for stat in ("mean", "std"):
        print(f"{stat:>5}" + "".join(f"{summary[c][stat]:>10.2f}" for c in cols) + f"{summary['delta'][stat]:>+13.2f}")
    print(f"Align-KD better in {summary['delta']['wins']} of {len(rows)} seeds")
    Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary, "overrides": a.overrides}, indent=2))
    print(f"wrote {a.json}")


def _share_teacher(cfg: DemoConfig, home: Path) -> None:
    """Make this seed's teacher/ a link to one shared teacher (trained on first use, then reused)."""
    link = Path(cfg.output_dir) / "teacher"
    link.parent.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(home.resolve(), target_is_directory=True)


if __name__ == "__main__":
    main()
