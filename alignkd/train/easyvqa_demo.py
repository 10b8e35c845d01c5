"""The embedded default: `alignkd-mobile train` with no arguments.

Offline on a laptop CPU, in minutes: train (or reuse) a tiny teacher on easy-vqa, then the baseline
student and the Align-KD student with identical data, steps and seed, score both on the held-out split,
and write `summary.json` + a table. The students are sized so that they do not saturate the task, and
the comparison is honest: whatever the numbers are, they are printed.

Like MobileVLM, the students use the teacher's (frozen) vision tower; the teacher's own CLIP is trained
with it here, since no pretrained CLIP can be downloaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ..errors import ConfigError
from ..eval.benchmarks import BENCHMARKS
from ..eval.runner import answer_items
from ..model.checkpoint import load_model
from ..model.tokenizer import load_tokenizer
from .config import TrainConfig
from ..fileio import atomic_write
from .recipe import train


@dataclass
class DemoConfig:
    """The easy-vqa recipe; every field can be overridden with key=value."""

    output_dir: str = "runs/easyvqa"
    """Holds teacher/, baseline/, alignkd/ (mtgv checkpoints) and summary.json."""
    teacher_steps: int = 600
    """Teacher optimizer steps (reused when teacher/ already holds a teacher of the same recipe)."""
    student_steps: int = 300
    """Optimizer steps of each student."""
    batch_size: int = 16
    """Samples per step."""
    teacher_lr: float = 1e-3
    """Teacher learning rate."""
    lr: float = 1e-3
    """Student learning rate (LM, projector and adapters)."""
    eval_limit: int = 500
    """Held-out questions scored (a seeded subset of the 9.7k test questions)."""
    seed: int = 0
    """Seed of the students' init and data order, and of the eval subset."""
    teacher_seed: int = 0
    """Seed of the teacher (kept apart so several student seeds can share one teacher)."""
    methods: str = "baseline,alignkd"
    """Students to train, comma-separated (add logit-kd for the KD-only ablation); baseline and alignkd are required."""
    progress: bool = True
    """Progress bars."""


def _teacher_recipe(d: DemoConfig) -> TrainConfig:
    return TrainConfig(method="baseline", student="tiny-teacher", steps=d.teacher_steps, batch_size=d.batch_size,
                       lr=d.teacher_lr, warmup_ratio=0.05, seed=d.teacher_seed, output_dir=str(Path(d.output_dir) / "teacher"),
                       progress=d.progress)


def _student_recipe(d: DemoConfig, method: str) -> TrainConfig:
    teacher = str(Path(d.output_dir) / "teacher")
    return TrainConfig(method=method, student="tiny-student", teacher=teacher if method != "baseline" else None,
                       init_vision_from=teacher, steps=d.student_steps, batch_size=d.batch_size, lr=d.lr,
                       warmup_ratio=0.05, seed=d.seed, output_dir=str(Path(d.output_dir) / method), progress=d.progress)


def _reusable(out: Path, recipe: TrainConfig) -> bool:
    """A finished run of exactly this recipe is reused (the teacher is the expensive part)."""
    summary = out / "train" / "summary.json"
    saved = out / "train" / "config.yaml"
    if not (summary.is_file() and saved.is_file() and (out / "config.json").is_file()):
        return False
    import yaml

    ignore = ("output_dir", "progress")  # where it was written and how it was displayed do not change it
    keep = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    return keep(yaml.safe_load(saved.read_text())) == keep(recipe.to_dict())


def _accuracy(ckpt: Path, items, bench, d: DemoConfig, name: str) -> float:
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    preds = answer_items(model, tok, items, batch_size=32, max_new_tokens=4, answers_file=ckpt / "eval" / "easyvqa.jsonl",
                         desc=f"eval {name}", progress=d.progress)
    return bench.score(items, preds)["accuracy"]


def run_demo(d: DemoConfig) -> dict:
    out = Path(d.output_dir)
    results: dict[str, dict] = {}
    teacher = _teacher_recipe(d)
    if _reusable(out / "teacher", teacher):
        click.echo(f"reusing the teacher in {out / 'teacher'}")
        tsum = json.loads((out / "teacher" / "train" / "summary.json").read_text())
    else:
        tsum = train(teacher)
    bench = BENCHMARKS["easyvqa"]
    bench.seed = d.seed
    items, _ = bench.load(None, limit=d.eval_limit)
    methods = [m.strip() for m in d.methods.split(",") if m.strip()]
    if not {"baseline", "alignkd"} <= set(methods):
        raise ConfigError(f"methods must include baseline and alignkd, got {d.methods!r}")
    for method in methods:
        recipe = _student_recipe(d, method)
        t0 = time.perf_counter()
        summary = train(recipe)
        results[method] = {"steps": summary["steps"], "wall_s": round(time.perf_counter() - t0, 1),
                           "final_losses": {k: v for k, v in summary["final"].items() if k not in ("step", "lr")}}
    for name, path in [("teacher", out / "teacher")] + [(m, out / m) for m in methods]:
        acc = _accuracy(path, items, bench, d, name)
        if name == "teacher":
            tsum["accuracy"] = acc
        else:
            results[name]["accuracy"] = acc
    summary = {
        "methods": results,
        "teacher": {"accuracy": tsum["accuracy"], "steps": tsum["steps"], "wall_s": tsum["wall_s"]},
        "delta_accuracy": round(results["alignkd"]["accuracy"] - results["baseline"]["accuracy"], 2),
        "eval": {"benchmark": "easyvqa (held-out test split)", "questions": len(items), "metric": "exact match %"},
        "config": asdict(d),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    click.echo(format_table(summary))
    return summary


def format_table(s: dict) -> str:
    rows = [("teacher (tiny-teacher)", s["teacher"]["accuracy"], None, s["teacher"]["steps"], s["teacher"]["wall_s"])]
    for m, r in s["methods"].items():
        rows.append((f"{m} (tiny-student)", r["accuracy"], r["final_losses"], r["steps"], r["wall_s"]))
    lines = [f"easy-vqa held-out accuracy ({s['eval']['questions']} questions)", "",
             f"{'model':<24}{'accuracy %':>11}{'steps':>7}{'wall s':>8}   final loss terms",
             "-" * 100]
    for name, acc, losses, steps, wall in rows:
        terms = " ".join(f"{k}={v:.3f}" for k, v in (losses or {}).items() if v and k != "grad_norm")
        lines.append(f"{name:<24}{acc:>11.2f}{steps:>7}{wall:>8.0f}   {terms}")
    lines.append("")
    lines.append(f"Align-KD - baseline: {s['delta_accuracy']:+.2f} points")
    return "\n".join(lines)
