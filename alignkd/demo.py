"""The embedded default: `alignkd-mobile train` with no arguments, or `train --demo [KEY=VALUE ...]`.

Offline on a laptop CPU, in minutes: train (or reuse) a tiny teacher on easy-vqa, then the students — the
baseline, Align-KD and any ablation in `methods` — with identical data, steps and seed; score every model
on one fixed held-out set (`eval_seed`, independent of the training seed), and write `summary.json` + a
table. The students are sized so that they do not saturate the task, and the comparison is honest:
whatever the numbers are, they are printed.

Every model sees images through one frozen, randomly initialised CLIP tower: the teacher's (seeded by
`teacher_seed` and never trained; no pretrained CLIP can be downloaded), which each student copies, as
MobileVLM's students share their teacher's frozen tower. A random frozen ViT still gives features that
the projector and LM learn the task from; the teacher's edge is its wider, deeper LM and longer training.

Answers are kept per model, in `<checkpoint>/eval/easyvqa-<weights digest>.jsonl`: a rerun scores only
the questions it has not answered, and a retrained checkpoint is never scored with an earlier model's answers.

This is the CLI layer: it runs the training recipe and the evaluation, which know nothing of each other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import click

from .errors import ConfigError
from .eval.benchmarks import EasyVQA, EvalItem
from .eval.runner import answer_items
from .fileio import atomic_write
from .model.checkpoint import load_model, weights_digest
from .model.config import PRESETS, TINY_VOCAB
from .model.tokenizer import load_tokenizer
from .model.vision import attach_feature_memo
from .train.config import MAX_BATCH, MAX_SEED, MAX_STEPS, TrainConfig, check_values, load_config, run_differences
from .train.recipe import build_teacher_cache, checkpoint_differences, checkpoints, train

# Students the demo can train: name → (method, loss keys). The ablations switch single terms off.
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "logit-kd": ("logit-kd", {}),
    "kd-att": ("alignkd", {"loss.v_weight": 0.0}),  # KD + L_att
    "kd-v": ("alignkd", {"loss.att_weight": 0.0}),  # KD + V-all + V-focus
    "alignkd": ("alignkd", {}),
    "release": ("alignkd", {"loss.variant": "release"}),  # the public code's computation
    # Align-KD with logit KD from an offline teacher cache (issue 15): the teacher's top 8 / 32 tokens, or every
    # token (k = the tiny tokenizer's vocabulary). The cache (a folder in the teacher's, shared by every seed) is
    # built before the student's first step.
    "alignkd-cache-k8": ("alignkd", {"loss.kd_topk": 8, "teacher_cache": "cache-k8"}),
    "alignkd-cache-k32": ("alignkd", {"loss.kd_topk": 32, "teacher_cache": "cache-k32"}),
    "alignkd-cache-full": ("alignkd", {"loss.kd_topk": TINY_VOCAB, "teacher_cache": "cache-full"}),
}


@dataclass
class DemoConfig:
    """The easy-vqa recipe; every field can be set in YAML (`train --demo --config`) or as key=value."""

    KEYS_COMMAND: ClassVar[str] = "alignkd-mobile train-keys --demo"  # named when a key is unknown

    output_dir: str = "runs/easyvqa"
    """Holds teacher/ and one folder per student (mtgv checkpoints), and summary.json."""
    teacher_preset: str = "tiny-teacher"
    """Model preset of the teacher."""
    student_preset: str = "tiny-student"
    """Model preset of every student."""
    teacher_steps: int = 600
    """Teacher optimizer steps (reused when teacher/ already holds a finished teacher of the same recipe)."""
    student_steps: int = 300
    """Optimizer steps of each student."""
    batch_size: int = 16
    """Samples per step."""
    teacher_lr: float = 1e-3
    """Teacher learning rate."""
    lr: float = 1e-3
    """Student learning rate (LM, projector and adapters)."""
    eval_limit: int = 500
    """Held-out questions scored: a fixed subset (eval_seed) of the 9,673 test questions (more = all)."""
    eval_seed: int = 0
    """Picks the held-out subset, independently of `seed`: every seed and method is scored on the same questions."""
    seed: int = 0
    """Seed of the students' init and data order."""
    teacher_seed: int = 0
    """Seed of the teacher and of the CLIP tower all models share (kept apart so several student seeds can
    share one teacher)."""
    methods: str = "baseline,alignkd"
    """Students to train, comma-separated, baseline first: baseline, logit-kd, kd-att (KD + L_att), kd-v
    (KD + L_v), alignkd, release (the public code's variant), alignkd-cache-k8 / -k32 / -full (logit KD from
    an offline teacher cache of the top 8 / 32 tokens / every token)."""
    vision_feature_memo_gb: float = 2.0
    """Every model shares one frozen CLIP tower, so each image's features are computed once per process and
    kept (up to this many GiB) for every later use: in training, by later students, and in scoring (the
    train key `vision_feature_memo_gb`). 0 = off."""
    kd_from_cache: bool = False
    """The paper-variant KD students (logit-kd, kd-att, kd-v, alignkd) read the teacher's logits from a cache
    of every token (teacher/cache-full, built once and shared by every seed) instead of running the whole
    teacher at each step: the same logit KD to float tolerance; the teacher then runs only its embeddings,
    projector and layer 0 (for logit-kd not at all). release always runs the whole teacher: its KD positions
    include padding, which no cache can hold."""
    curve_every: int = 0
    """Also score each student's checkpoint every N steps: a held-out learning curve in summary.json (0 = off)."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        check_values(self, positive=("teacher_steps", "student_steps", "batch_size", "teacher_lr", "lr", "eval_limit"),
                     non_negative=("eval_seed", "seed", "teacher_seed", "curve_every", "vision_feature_memo_gb"),
                     at_most={"teacher_steps": MAX_STEPS, "student_steps": MAX_STEPS, "batch_size": MAX_BATCH,
                              "seed": MAX_SEED, "teacher_seed": MAX_SEED, "eval_seed": MAX_SEED})
        for key in ("teacher_preset", "student_preset"):  # before the teacher trains, not after
            if getattr(self, key) not in PRESETS:
                raise ConfigError(f"{key} {getattr(self, key)!r} is not a preset (known: {', '.join(PRESETS)})")
        names = self.students()
        unknown = [m for m in names if m not in STUDENTS]
        if unknown or not names or names[0] != "baseline":
            raise ConfigError(f"methods must list baseline first, then any of {', '.join(list(STUDENTS)[1:])}; "
                              f"got {self.methods!r}")

    def students(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def _recipe(d: DemoConfig, name: str, keys: dict[str, Any]) -> TrainConfig:
    return load_config(flags={"warmup_ratio": 0.05, "batch_size": d.batch_size, "progress": d.progress,
                              "vision_feature_memo_gb": d.vision_feature_memo_gb,
                              "output_dir": str(Path(d.output_dir) / name), **keys})


def teacher_recipe(d: DemoConfig) -> TrainConfig:
    return _recipe(d, "teacher", {"method": "baseline", "student": d.teacher_preset, "steps": d.teacher_steps,
                                  "lr": d.teacher_lr, "seed": d.teacher_seed})


def student_recipe(d: DemoConfig, name: str) -> TrainConfig:
    method, loss = STUDENTS[name]
    teacher = str(Path(d.output_dir) / "teacher")
    # every curve_every steps, and the final step: ceil(steps / curve_every) checkpoints
    curve = {"save_every": d.curve_every, "keep_last": -(-d.student_steps // d.curve_every)} if d.curve_every else {}
    if d.kd_from_cache and method != "baseline" and loss.get("loss.variant") != "release" and "teacher_cache" not in loss:
        loss = {**loss, **STUDENTS["alignkd-cache-full"][1]}  # one cache of every token for every such student
    if "teacher_cache" in loss:  # a folder in the teacher's
        loss = {**loss, "teacher_cache": str(Path(teacher) / loss["teacher_cache"])}
    return _recipe(d, name, {"method": method, "student": d.student_preset, "init_vision_from": teacher,
                             "teacher": teacher if method != "baseline" else None, "steps": d.student_steps,
                             "lr": d.lr, "seed": d.seed, **curve, **loss})


def train_or_reuse(recipe: TrainConfig, inputs: dict[str, str] | None = None) -> dict:
    """A finished run of exactly this recipe is reused (the teacher is the expensive part); otherwise it
    trains, resuming a checkpoint of this recipe or replacing one of another. The checkpoint cadence counts
    as part of the recipe here: the learning curve is read from the checkpoints.

    inputs: what the run learns from beyond its config, e.g. {"teacher": weights digest}. The config names
    the teacher's folder, not the model in it: a student of an earlier teacher in the same folder is
    neither reused nor resumed but retrained. Recorded in `<output_dir>/train/inputs.json`."""
    out = Path(recipe.output_dir)
    marker = out / "train" / "inputs.json"
    same_inputs = inputs is None or _read_json(marker) == inputs
    done = _read_json(out / "train" / "summary.json")
    same = ("save_every",)
    if (same_inputs and isinstance(done, dict) and isinstance(done.get("config"), dict)
            and not run_differences(done["config"], recipe, same)):
        click.echo(f"reusing the finished run in {out}")
        return done
    if inputs is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(inputs))  # before training: a checkpoint it leaves is of these inputs
    if recipe.teacher_cache and recipe.method != "baseline":  # the demo's own: one of an earlier teacher is replaced
        click.echo(f"teacher cache: {json.dumps(build_teacher_cache(recipe, overwrite=True))}")
    return train(recipe.replace(resume=same_inputs and not checkpoint_differences(recipe, also=same)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def teacher_identity(d: DemoConfig) -> dict[str, str]:
    """The trained teacher's identity, for `train_or_reuse` of its students."""
    return {"teacher": weights_digest(Path(d.output_dir) / "teacher")}


def answers_file(ckpt: Path) -> Path:
    """Where the easy-vqa answers of the model in `ckpt` are kept: named by its weights."""
    return ckpt / "eval" / f"easyvqa-{weights_digest(ckpt)[:16]}.jsonl"


def score(ckpt: Path, items: list[EvalItem], bench: EasyVQA, name: str, progress: bool, memo_gb: float = 0.0) -> float:
    """Held-out accuracy of the model in `ckpt`, through an answer file keyed to its weights; with memo_gb the
    CLIP features of images seen before in this process (by any model of the same tower) are reused."""
    answers = answers_file(ckpt)
    digest = answers.stem.split("-")[1]
    for stale in answers.parent.glob("easyvqa*.jsonl"):  # earlier models' answers
        if stale != answers:
            stale.unlink()
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    if memo_gb:
        attach_feature_memo(model.vision_tower, int(memo_gb * 2**30))
    preds = answer_items(model, tok, items, batch_size=32, max_new_tokens=4, answers_file=answers,
                         desc=f"eval {name}", progress=progress, model_id=f"{name}-{digest}")
    return bench.score(items, preds)["accuracy"]


def run_demo(d: DemoConfig) -> dict:
    out = Path(d.output_dir)
    tsum = train_or_reuse(teacher_recipe(d))
    bench = EasyVQA(seed=d.eval_seed)
    items, _ = bench.load(None, limit=d.eval_limit)
    results: dict[str, dict] = {}
    for name in d.students():
        s = train_or_reuse(student_recipe(d, name), teacher_identity(d))
        results[name] = {"steps": s["steps"], "wall_s": s["wall_s"],
                         "final_losses": {k: v for k, v in s["final"].items() if k not in ("step", "lr")}}
    teacher_acc = score(out / "teacher", items, bench, "teacher", d.progress, d.vision_feature_memo_gb)
    for name, r in results.items():
        r["accuracy"] = score(out / name, items, bench, name, d.progress, d.vision_feature_memo_gb)
        r["delta_vs_baseline"] = round(r["accuracy"] - results["baseline"]["accuracy"], 2)
        if d.curve_every:
            r["curve"] = [{"step": int(c.name.split("-")[1]),
                           "accuracy": score(c, items, bench, c.name, d.progress, d.vision_feature_memo_gb)}
                          for c in checkpoints(out / name)]
    summary = {
        "methods": results,
        "teacher": {"accuracy": teacher_acc, "steps": tsum["steps"], "wall_s": tsum["wall_s"]},
        "eval": {"benchmark": "easyvqa (held-out test split)", "questions": len(items), "eval_seed": d.eval_seed,
                 "metric": "exact match %"},
        "config": asdict(d),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    click.echo(format_table(summary))
    return summary


def format_table(s: dict) -> str:
    rows = [("teacher", s["teacher"]["accuracy"], None, None, s["teacher"]["steps"], s["teacher"]["wall_s"])]
    for m, r in s["methods"].items():
        rows.append((m, r["accuracy"], r["delta_vs_baseline"], r["final_losses"], r["steps"], r["wall_s"]))
    lines = [f"easy-vqa held-out accuracy ({s['eval']['questions']} questions, eval_seed {s['eval']['eval_seed']})", "",
             f"{'model':<19}{'accuracy %':>11}{'vs baseline':>12}{'steps':>7}{'wall s':>8}   final loss terms",
             "-" * 107]
    for name, acc, delta, losses, steps, wall in rows:
        terms = " ".join(f"{k}={v:.3f}" for k, v in (losses or {}).items() if v and k != "grad_norm")
        shown = f"{delta:+.2f}" if delta is not None and name != "baseline" else ""
        lines.append(f"{name:<19}{acc:>11.2f}{shown:>12}{steps:>7}{wall:>8.0f}   {terms}")
    return "\n".join(lines)
