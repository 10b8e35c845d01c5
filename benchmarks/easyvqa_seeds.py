"""Align-KD vs the baseline on easy-vqa over several seeds: mean ± std of held-out accuracy.

    python benchmarks/easyvqa_seeds.py --seeds 0 1 2            # the embedded recipe, 3 seeds
    python benchmarks/easyvqa_seeds.py --seeds 0 1 2 student_steps=100

One teacher (seed 0, trained once and reused), then for each seed the baseline and the Align-KD student
with identical data order, steps and init. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from alignkd.train.config import load_config
from alignkd.train.easyvqa_demo import DemoConfig, run_demo


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
        cfg = load_config(None, a.overrides, cls=DemoConfig, output_dir=str(out / f"seed{seed}"), seed=seed, progress=False)
        teacher_home = out / "teacher"
        _share_teacher(cfg, teacher_home)
        s = run_demo(cfg)
        rows.append({"seed": seed, "baseline": s["methods"]["baseline"]["accuracy"],
                     "alignkd": s["methods"]["alignkd"]["accuracy"], "teacher": s["teacher"]["accuracy"]})
    summary = {}
    for k in ("teacher", "baseline", "alignkd"):
        xs = [r[k] for r in rows]
        summary[k] = {"mean": round(statistics.mean(xs), 2), "std": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0}
    deltas = [r["alignkd"] - r["baseline"] for r in rows]
    summary["delta"] = {"mean": round(statistics.mean(deltas), 2),
                        "std": round(statistics.stdev(deltas), 2) if len(deltas) > 1 else 0.0,
                        "wins": sum(d > 0 for d in deltas), "of": len(deltas)}
    print(f"{'seed':>5}{'teacher':>10}{'baseline':>10}{'alignkd':>10}{'delta':>8}")
    for r in rows:
        print(f"{r['seed']:>5}{r['teacher']:>10.2f}{r['baseline']:>10.2f}{r['alignkd']:>10.2f}{r['alignkd'] - r['baseline']:>+8.2f}")
    print(f"{'mean':>5}{summary['teacher']['mean']:>10.2f}{summary['baseline']['mean']:>10.2f}"
          f"{summary['alignkd']['mean']:>10.2f}{summary['delta']['mean']:>+8.2f}")
    print(f"{'std':>5}{summary['teacher']['std']:>10.2f}{summary['baseline']['std']:>10.2f}"
          f"{summary['alignkd']['std']:>10.2f}{summary['delta']['std']:>8.2f}")
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
