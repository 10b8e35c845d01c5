"""Align-KD against the baseline on easy-vqa, paired over many seeds, term by term (issue 16).

    python benchmarks/easyvqa_seeds.py --seeds 0-9                     # the study: six students × 10 seeds
    python benchmarks/easyvqa_seeds.py --curve --seeds 2 student_steps=800 curve_every=100   # learning curve
    python benchmarks/easyvqa_seeds.py --seeds 0-9 methods=baseline,alignkd,alignkd-cache-k8 --pairs alignkd-cache-k8:alignkd

The study's defaults (key=value overrides any): the tiny-teacher-36 / tiny-student-36 presets (36 image tokens,
a one-layer frozen CLIP), 800 student steps at lr 3e-3 (chosen from the curves of two seeds; at 600 a seed's
baseline stayed stuck at 41.5 %), batch 16, 2,000 held-out questions; methods baseline, logit-kd, kd-att, kd-v,
alignkd, release; kd_from_cache (the paper-variant KD students read the teacher's logits from one cache of every
token, built once) and the demo's vision_feature_memo_gb (the frozen CLIP runs once per image per worker): the
same losses, and the whole study in about an hour (59 min on this machine).

One teacher (trained once in OUTPUT_DIR/teacher, shared by every seed through a link), then per seed every
student of `methods` (any of `alignkd.demo.STUDENTS`, baseline first) with identical data order, steps and
init. All are scored on ONE held-out set (eval_seed, default 2,000 questions): the seed varies training only.
Students train in `--workers` single-threaded processes side by side (tiny models use two processes better
than one process with two threads). Resumable: a finished student of the same recipe and teacher is
reused, a killed one resumes from its checkpoint, answers already given are read back (answer files are
keyed to the model's weights).

Per method: mean ± std of accuracy over seeds; the paired difference to the baseline (and to any
`--pairs A:B`) with a 95 % paired t interval and a 95 % percentile bootstrap over seeds (10,000
resamples), the paired t test's p, and seeds won/tied/lost (tied = the same number of right answers).
Then the layer-0 attention alignment of every student against the teacher (`easyvqa_alignment.py`).
Writes RESULTS.json, RESULTS.md (tables) and RESULTS.png (paired differences per seed); --curve writes
RESULTS-curve.json/.png (held-out accuracy against the step, one seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from alignkd.demo import (DemoConfig, answers_file, score, student_recipe, teacher_identity,
                          teacher_recipe, train_or_reuse)
from alignkd.errors import AlignKDError
from alignkd.eval.benchmarks import EasyVQA, EvalItem
from alignkd.eval.runner import answered
from alignkd.eval.scoring import normalize_short_answer
from alignkd.fileio import atomic_write
from alignkd.model.checkpoint import weights_digest
from alignkd.model.config import get_preset
from alignkd.train.config import load_config
from alignkd.train.recipe import build_teacher_cache, checkpoints
from easyvqa_alignment import METRICS, seed_alignment

STUDY = {"teacher_preset": "tiny-teacher-36", "student_preset": "tiny-student-36", "student_steps": 800, "lr": 0.003,
         "kd_from_cache": True}
STUDY_METHODS = "baseline,logit-kd,kd-att,kd-v,alignkd,release"
DEFAULT_PAIRS = ("logit-kd:baseline", "kd-att:logit-kd", "kd-v:logit-kd", "alignkd:logit-kd", "release:alignkd")
BOOTSTRAP = 10_000
# easy-vqa's question kinds by their answer; every other answer is one of the 8 colours. A model that ignores
# the image stays near chance on shape (1/3) and colour (1/8) and answers yes/no from the question alone.
QUESTION_TYPE = {"circle": "shape", "rectangle": "shape", "triangle": "shape", "yes": "yes/no", "no": "yes/no"}


# ============================================================================ statistics
def t_cdf(x: float, df: int) -> float:
    """Student's t CDF (no scipy in the stack). With x = √df·tan θ the density becomes
    Γ((df+1)/2) / (√π Γ(df/2)) · cos^(df−1) θ on the finite interval [0, atan(x/√df)]: Simpson's rule there."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    theta = np.linspace(0.0, math.atan(abs(x) / math.sqrt(df)), 2001)
    f = np.cos(theta) ** (df - 1)
    area = (theta[1] - theta[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(c * area, x)


def t_quantile(p: float, df: int) -> float:
    """The x with t_cdf(x, df) = p: bisection on θ in (−π/2, π/2), x = √df·tan θ."""
    lo, hi = -math.pi / 2, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(math.sqrt(df) * math.tan(mid), df) < p else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired(a: Sequence[int], b: Sequence[int], n: int) -> dict:
    """A − B over seeds, from the right-answer counts of each seed on the same n questions, in points of %
    (`differences`; tied = as many right answers)."""
    return differences((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * 100.0 / n)


def differences(d: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Paired differences over seeds: mean, std, 95 % paired t interval, 95 % percentile bootstrap interval
    (resampling seeds), the paired t test's two-sided p, and the seeds above / at / below 0."""
    d = np.asarray(d, dtype=float)  # (seeds,)
    k, mean = len(d), float(d.mean())
    out = {"mean": mean, "std": float(d.std(ddof=1)) if k > 1 else 0.0, "seeds": k,
           "won": int((d > 0).sum()), "tied": int((d == 0).sum()), "lost": int((d < 0).sum()),
           "t_ci": None, "bootstrap_ci": None, "p_t": None}
    if k < 2:
        return out
    se = out["std"] / math.sqrt(k)
    half = t_quantile(0.975, k - 1) * se
    out["t_ci"] = [mean - half, mean + half]
    means = d[np.random.default_rng(seed).integers(0, k, (resamples, k))].mean(1)  # (resamples,)
    out["bootstrap_ci"] = [float(x) for x in np.percentile(means, [2.5, 97.5])]
    out["p_t"] = 2 * (1 - t_cdf(abs(mean) / se, k - 1)) if se > 0 else float(mean == 0)
    return out


def spread(xs: Sequence[float]) -> dict:
    x = np.asarray(xs, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0}


def by_question_type(items: list[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    """Accuracy % per kind of question (shape, colour, yes/no), scored as EasyVQA scores."""
    right, n = Counter(), Counter()
    for it in items:
        kind = QUESTION_TYPE.get(it.meta["answer"], "colour")
        n[kind] += 1
        right[kind] += normalize_short_answer(predictions.get(it.id, "")) == normalize_short_answer(it.meta["answer"])
    return {k: 100.0 * right[k] / n[k] for k in sorted(n)}


# ============================================================================ the runs (worker processes)
def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _held_out(d: DemoConfig):
    bench = EasyVQA(seed=d.eval_seed)
    return bench, bench.load(None, limit=d.eval_limit)[0]


def run_student(job: tuple[DemoConfig, str]) -> dict:
    """Train (or reuse) one student and score it (and its curve checkpoints) on the held-out set."""
    d, name = job
    t0 = time.perf_counter()
    s = train_or_reuse(student_recipe(d, name), teacher_identity(d))
    t1 = time.perf_counter()
    bench, items = _held_out(d)
    ckpt = Path(d.output_dir) / name
    acc = score(ckpt, items, bench, name, progress=False, memo_gb=d.vision_feature_memo_gb)
    row = {"seed": d.seed, "method": name, "accuracy": acc, "correct": round(acc * len(items) / 100), "n": len(items),
           "train_wall_s": s["wall_s"], "final_losses": {k: v for k, v in s["final"].items() if k not in ("step", "lr")},
           "by_type": by_question_type(items, answered(answers_file(ckpt), items)),
           "digest": weights_digest(ckpt)[:16], "this_run_train_s": round(t1 - t0, 1),
           "this_run_eval_s": round(time.perf_counter() - t1, 1)}
    if d.curve_every:
        row["curve"] = [{"step": int(c.name.split("-")[1]),
                         "accuracy": score(c, items, bench, c.name, progress=False, memo_gb=d.vision_feature_memo_gb)}
                        for c in checkpoints(ckpt)]
    print(f"seed {d.seed} {name}: {acc:.2f} % (train {row['this_run_train_s']} s, eval {row['this_run_eval_s']} s)",
          flush=True)
    return row


def run_alignment(job: tuple[DemoConfig, int]) -> dict:
    d, samples = job
    got = seed_alignment(Path(d.output_dir), d.students(), d.student_preset, d.seed, samples, d.eval_seed)
    print(f"seed {d.seed}: alignment done", flush=True)
    return {"seed": d.seed, **got}


def share_teacher(d: DemoConfig, home: Path) -> None:
    """Make this seed's teacher/ a link to the one shared teacher."""
    link = Path(d.output_dir) / "teacher"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(home.resolve(), target_is_directory=True)


def in_pool(fn, jobs: list, workers: int) -> list:
    ctx = multiprocessing.get_context("spawn")  # the parent's OpenMP pool does not survive a fork
    with ctx.Pool(workers, initializer=_init_worker, initargs=(1,)) as pool:
        return list(pool.imap_unordered(fn, jobs))


# ============================================================================ reports
def summarize(rows: list[dict], teacher: dict, methods: list[str], pairs: list[tuple[str, str]]) -> dict:
    by = {(r["seed"], r["method"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    n = rows[0]["n"]
    correct = {m: [by[s, m]["correct"] for s in seeds] for m in methods}
    out = {"seeds": seeds, "questions": n, "teacher": teacher, "methods": {}, "pairs": {}}
    for m in methods:
        out["methods"][m] = {**spread([by[s, m]["accuracy"] for s in seeds]),
                             "per_seed": [by[s, m]["accuracy"] for s in seeds],
                             "by_type": {k: spread([by[s, m]["by_type"][k] for s in seeds]) for k in by[seeds[0], m]["by_type"]},
                             "vs_baseline": paired(correct[m], correct["baseline"], n) if m != "baseline" else None}
    for a, b in pairs:
        out["pairs"][f"{a} − {b}"] = paired(correct[a], correct[b], n)
    return out


def _ci(c: list[float] | None) -> str:
    return f"[{c[0]:+.2f}, {c[1]:+.2f}]" if c else "–"


def _p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def _pair_row(name: str, p: dict) -> str:
    return (f"| {name} | {p['mean']:+.2f} ± {p['std']:.2f} | {_ci(p['t_ci'])} | {_ci(p['bootstrap_ci'])} | {_p(p['p_t'])} "
            f"| {p['won']}/{p['tied']}/{p['lost']} |")


def accuracy_markdown(s: dict, setup: str = "") -> str:
    lines = [f"easy-vqa held-out accuracy, {s['questions']} questions (one fixed set), seeds {s['seeds'][0]}–"
             f"{s['seeds'][-1]} ({len(s['seeds'])}){setup}; Δ in points of %, paired over seeds; CIs 95 %.", "",
             "| method | accuracy % (mean ± std) | Δ vs baseline (mean ± std) | paired t CI | bootstrap CI | p (t) "
             "| won/tied/lost |", "|---|---|---|---|---|---|---|",
             f"| teacher | {s['teacher']['accuracy']:.2f} | | | | | |"]
    for m, r in s["methods"].items():
        head = f"| {m} | {r['mean']:.2f} ± {r['std']:.2f} "
        lines.append(head + ("| | | | | |" if r["vs_baseline"] is None else _pair_row("", r["vs_baseline"])[3:]))
    if s["pairs"]:
        lines += ["", "| contrast | Δ (mean ± std) | paired t CI | bootstrap CI | p (t) | won/tied/lost |",
                  "|---|---|---|---|---|---|"]
        lines += [_pair_row(k, p) for k, p in s["pairs"].items()]
    kinds = list(s["teacher"]["by_type"])
    lines += ["", "| accuracy % by question kind (mean ± std over seeds) | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 1) + "|",
              "| teacher | " + " | ".join(f"{s['teacher']['by_type'][k]:.1f}" for k in kinds) + " |"]
    lines += [f"| {m} | " + " | ".join(f"{r['by_type'][k]['mean']:.1f} ± {r['by_type'][k]['std']:.1f}" for k in kinds) + " |"
              for m, r in s["methods"].items()]
    methods = list(s["methods"])
    lines += ["", "| seed | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {seed} | " + " | ".join(f"{s['methods'][m]['per_seed'][i]:.2f}" for m in methods) + " |"
              for i, seed in enumerate(s["seeds"])]
    return "\n".join(lines)


def alignment_summary(per_seed: list[dict], methods: list[str]) -> dict:
    """Mean ± std over seeds of each metric per student (init first), and paired KL contrasts: did the
    alignment terms move the student's map toward the teacher's (negative = closer)?"""
    students = {}
    for m in ["init", *methods]:
        students[m] = {k: (spread(xs) if (xs := [r[m][k] for r in per_seed if r[m][k] is not None]) else None)
                       for k in METRICS}
    contrasts = [(m, "baseline") for m in methods if m != "baseline"] + [("kd-att", "logit-kd"), ("alignkd", "logit-kd")]
    kl = {f"{a} − {b}": differences([r[a]["kl"] - r[b]["kl"] for r in per_seed])
          for a, b in contrasts if a in methods and b in methods}
    return {"students": students, "kl_contrasts": kl,
            "teacher_image_share": spread([r["teacher_image_share"] for r in per_seed])}


def alignment_markdown(a: dict, samples: int, n_tokens: int) -> str:
    def cell(m: str, k: str, fmt: str) -> str:
        v = a["students"][m][k]
        return "–" if v is None else f"{v['mean']:{fmt}} ± {v['std']:{fmt}}"

    lines = [f"layer-0 text→vision attention, student against teacher, {samples} held-out samples, mean ± std over "
             f"seeds; head-averaged except L_att (through the trained head adapter). Teacher's share of attention "
             f"on the image {a['teacher_image_share']['mean']:.3f}; top-16 overlap by chance 16/{n_tokens} = "
             f"{16 / n_tokens:.3f}.", "",
             "| student | KL(teacher ‖ student) | correlation | MSE | top-16 overlap | image share | L_att (adapter) |",
             "|---|---|---|---|---|---|---|"]
    for m in a["students"]:
        lines.append(f"| {m} | {cell(m, 'kl', '.4g')} | {cell(m, 'corr', '.3f')} | {cell(m, 'mse', '.2e')} | "
                     f"{cell(m, 'top16', '.3f')} | {cell(m, 'image_share', '.3f')} | {cell(m, 'l_att', '.2e')} |")
    lines += ["", "| KL contrast (paired over seeds) | Δ KL (mean ± std) | paired t CI | bootstrap CI | p (t) "
              "| seeds higher/tied/lower |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {p['mean']:+.3g} ± {p['std']:.3g} | [{p['t_ci'][0]:+.3g}, {p['t_ci'][1]:+.3g}] | "
              f"[{p['bootstrap_ci'][0]:+.3g}, {p['bootstrap_ci'][1]:+.3g}] | {_p(p['p_t'])} | "
              f"{p['won']}/{p['tied']}/{p['lost']} |" for k, p in a["kl_contrasts"].items() if p["t_ci"]]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_differences(s: dict, path: Path) -> None:
    """Each seed's paired difference to the baseline per method (dots; a seed's dots joined), with the
    mean and its 95 % paired t interval."""
    from matplotlib.figure import Figure

    methods = [m for m in s["methods"] if m != "baseline"]
    base = s["methods"]["baseline"]["per_seed"]
    fig = Figure(figsize=(1.6 * len(methods) + 2, 4.5), dpi=120)
    ax = fig.add_subplot()
    ax.axhline(0, color="k", linewidth=0.8)
    diffs = np.array([[x - b for x, b in zip(s["methods"][m]["per_seed"], base)] for m in methods])  # (M, seeds)
    xs = np.arange(len(methods))
    for j in range(diffs.shape[1]):
        ax.plot(xs + (j - diffs.shape[1] / 2) * 0.02, diffs[:, j], color="0.8", linewidth=0.6, zorder=1)
    for i, m in enumerate(methods):
        p = s["methods"][m]["vs_baseline"]
        ax.scatter(np.full(diffs.shape[1], i) + (np.arange(diffs.shape[1]) - diffs.shape[1] / 2) * 0.02, diffs[i],
                   s=14, color="C0", zorder=2)
        lo, hi = p["t_ci"] or (p["mean"], p["mean"])
        ax.errorbar(i + 0.25, p["mean"], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="D", color="C3", capsize=4,
                    zorder=3)
    ax.set_xticks(xs, methods)
    ax.set_ylabel("accuracy − baseline (points of %)")
    ax.set_title(f"easy-vqa, {len(s['seeds'])} seeds, {s['questions']} held-out questions\n"
                 "each seed (dots, one seed joined by a line) and the mean with its 95 % paired t CI", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_write(path, _png(fig))


def plot_curve(rows: list[dict], teacher: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.add_subplot()
    for r in rows:
        ax.plot([c["step"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], marker="o", label=r["method"])
    ax.axhline(teacher, color="k", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("student step")
    ax.set_ylabel(f"held-out accuracy % ({rows[0]['n']} questions)")
    ax.set_title(f"easy-vqa learning curve, seed {rows[0]['seed']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, _png(fig))


# ============================================================================ main
def seed_list(text: list[str]) -> list[int]:
    """`0 1 2`, `0-9` or both; ValueError naming the bad one."""
    out = []
    for t in text:
        lo, dash, hi = t.partition("-")
        if not lo.isdecimal() or (dash and not hi.isdecimal()):
            raise ValueError(f"{t!r} is not a seed (N, a number >= 0) or a range of them (A-B)")
        if dash and int(hi) < int(lo):
            raise ValueError(f"{t!r} is an empty range")
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return sorted(set(out))


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int], DemoConfig, list[tuple[str, str]]]:
    """The arguments, the seeds, the study's config and the paired contrasts, every one checked: a bad one is
    one `ap.error` (exit 2) before the teacher trains."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", default=["0-9"], help="student seeds: 0 1 2, or 0-9")
    ap.add_argument("--output-dir", default="runs/easyvqa_seeds")
    ap.add_argument("--results", default="benchmarks/easyvqa_seeds", help="prefix of the .json, .md and .png")
    ap.add_argument("--workers", type=int, default=2, help="student processes side by side, one thread each")
    ap.add_argument("--pairs", help="more paired contrasts A:B,C:D (default: those of "
                    f"{','.join(DEFAULT_PAIRS)} whose methods are in the run)")
    ap.add_argument("--alignment-samples", type=int, default=512, help="held-out samples of the attention check (0: skip)")
    ap.add_argument("--curve", action="store_true", help="the learning curve of the first seed (needs curve_every=N)")
    ap.add_argument("overrides", nargs="*", help="DemoConfig key=value (student_steps=, methods=, eval_limit=, ...)")
    a = ap.parse_args(argv)
    # --seeds (nargs="+") swallows the key=value overrides written right after it, as the documented commands do
    a.overrides = [t for t in a.seeds if "=" in t] + a.overrides
    a.seeds = [t for t in a.seeds if "=" not in t]
    if not a.seeds:
        ap.error("--seeds: no seeds given (0 1 2, or 0-9)")
    try:
        seeds = seed_list(a.seeds)
    except ValueError as e:
        ap.error(f"--seeds: {e}")
    if a.workers < 1:
        ap.error(f"--workers must be at least 1, got {a.workers}")
    if a.alignment_samples < 0:
        ap.error(f"--alignment-samples must be >= 0 (0: skip), got {a.alignment_samples}")
    try:  # the config and every recipe the run will build from it
        d = load_config(None, a.overrides, cls=DemoConfig, flags={
            "output_dir": str(Path(a.output_dir)), "progress": False, "eval_limit": 2000, **STUDY,
            "methods": "baseline,alignkd" if a.curve else STUDY_METHODS})
        for preset in (d.teacher_preset, d.student_preset):
            if not Path(preset).is_dir():  # a preset name (train also takes a checkpoint folder)
                get_preset(preset)
        teacher_recipe(d)
        for m in d.students():
            student_recipe(d, m)
    except AlignKDError as e:
        ap.error(f"key=value overrides: {e}")
    if a.curve != bool(d.curve_every):
        ap.error("--curve needs curve_every=N, and curve_every needs --curve")
    methods = d.students()
    pairs = [tuple(p.split(":")) for p in (a.pairs or ",".join(DEFAULT_PAIRS)).split(",") if p]
    if a.pairs and any(len(p) != 2 or not set(p) <= set(methods) for p in pairs):
        ap.error(f"--pairs {a.pairs}: each must be A:B with both in methods ({d.methods})")
    pairs = [p for p in pairs if set(p) <= set(methods)] if not a.curve else []
    return a, seeds[:1] if a.curve else seeds, d, pairs


def main() -> None:
    a, seeds, d, pairs = parse()
    t_start = time.perf_counter()
    out = Path(a.output_dir)
    methods = d.students()

    torch.set_num_threads(a.workers)
    t0 = time.perf_counter()
    tsum = train_or_reuse(teacher_recipe(d))
    bench, items = _held_out(d)
    teacher = {"accuracy": score(out / "teacher", items, bench, "teacher", progress=False, memo_gb=d.vision_feature_memo_gb),
               "by_type": by_question_type(items, answered(answers_file(out / "teacher"), items)), "steps": tsum["steps"],
               "train_wall_s": tsum["wall_s"], "digest": weights_digest(out / "teacher")[:16],
               "this_run_s": round(time.perf_counter() - t0, 1)}
    print(f"teacher: {teacher['accuracy']:.2f} %", flush=True)

    root = out / "curve" if a.curve else out
    per_seed = [dataclasses.replace(d, output_dir=str(root / f"seed{s}"), seed=s) for s in seeds]
    for ds in per_seed:
        share_teacher(ds, out / "teacher")
    t0 = time.perf_counter()
    for m in methods:  # a teacher cache (in the teacher's folder) serves every seed: built once, here, not per worker
        recipe = student_recipe(per_seed[0], m)
        if recipe.teacher_cache and recipe.method != "baseline":
            print(f"teacher cache of {m}: {json.dumps(build_teacher_cache(recipe, overwrite=True))}", flush=True)
    teacher["caches_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    rows = in_pool(run_student, [(ds, m) for ds in per_seed for m in methods], a.workers)
    rows.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    students_s = time.perf_counter() - t0
    res = Path(a.results + ("-curve" if a.curve else ""))
    res.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": dataclasses.asdict(d), "workers": a.workers, "rows": rows, "teacher": teacher,
              "wall_s": {"teacher_and_its_eval": teacher["this_run_s"], "teacher_caches": teacher["caches_s"],
                         "students": round(students_s, 1)}}
    if a.curve:
        plot_curve(rows, teacher["accuracy"], res.with_suffix(".png"))
        record["wall_s"]["total"] = round(time.perf_counter() - t_start, 1)
        atomic_write(res.with_suffix(".json"), json.dumps(record, indent=2))
        for r in rows:
            print(r["method"], " ".join(f"{c['step']}:{c['accuracy']:.2f}" for c in r["curve"]))
        print(f"wrote {res.with_suffix('.json')} and {res.with_suffix('.png')}")
        return

    record["summary"] = summary = summarize(rows, teacher, methods, pairs)
    text = accuracy_markdown(summary, f"; {d.student_preset} students, {d.student_steps} steps × batch {d.batch_size}, "
                                      f"lr {d.lr}; {d.teacher_preset} teacher, {d.teacher_steps} steps")
    if len(methods) > 1:
        plot_differences(summary, res.with_suffix(".png"))
    if a.alignment_samples:
        t0 = time.perf_counter()
        per = sorted(in_pool(run_alignment, [(ds, a.alignment_samples) for ds in per_seed], a.workers),
                     key=lambda r: r["seed"])
        record["alignment"] = {"samples": a.alignment_samples, "per_seed": per,
                               "summary": alignment_summary(per, methods)}
        record["wall_s"]["alignment"] = round(time.perf_counter() - t0, 1)
        text += "\n\n" + alignment_markdown(record["alignment"]["summary"], a.alignment_samples,
                                            get_preset(d.student_preset).num_image_tokens)
    record["wall_s"]["total"] = round(time.perf_counter() - t_start, 1)
    text += (f"\n\nwall time {record['wall_s']['total']:.0f} s on {a.workers} single-threaded workers "
             f"({record['wall_s']})\n")
    atomic_write(res.with_suffix(".json"), json.dumps(record, indent=2))
    atomic_write(res.with_suffix(".md"), text)
    print(text)
    print(f"wrote {res.with_suffix('.json')}, {res.with_suffix('.md')} and {res.with_suffix('.png')}")


if __name__ == "__main__":
    main()
