"""Comparison report of evaluated checkpoints: Markdown table, JSON, and a radar plot like Align-KD's
Figure 1.

Input: {checkpoint_name: {benchmark: metrics}} where metrics is what `Benchmark.score` returned
("score" is the table's number; "n", "n_missing", "n_unknown_ids", "n_malformed_rows" fill the
coverage table), and per benchmark the official rule its number follows and the files it read.
Output (each written atomically: a temp file in the same folder, then `os.replace`; the PNG first,
so that a full disk never leaves a report without its plot): `{stem}_radar.png`, `{stem}.json`,
`{stem}.md`.

The average is the Align-KD paper's: the mean of GQA, SQA-I, TextVQA, POPE, MME-P / 20 and MMB-dev
over those of them that are in the table (a checkpoint lacking one of them gets no average);
easy-vqa is shown but never averaged.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignkd.errors import ConfigError
from alignkd.figures import can_draw
from alignkd.fileio import atomic_write

PAPER_BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
BENCHMARK_ORDER = PAPER_BENCHMARKS + ("easyvqa",)
DISPLAY_NAMES = {
    "gqa": "GQA",
    "sqa": "SQA-I",
    "textvqa": "TextVQA",
    "pope": "POPE",
    "mme": "MME-P",
    "mmbench": "MMB-dev",
    "easyvqa": "easy-vqa",
}
MME_DIVISOR = 20.0  # MME-P is out of 2000; /20 puts it on a 0-100 scale for the average
# metrics counting what was scored: questions, questions without an answer (scored as wrong),
# answers to unknown question ids, unusable benchmark rows
COVERAGE_KEYS = ("n", "n_missing", "n_unknown_ids", "n_malformed_rows")


def _display(b: str) -> str:
    return DISPLAY_NAMES.get(b, b)


def _score_of(metrics: Any) -> float | None:
    if isinstance(metrics, Mapping):
        v = metrics.get("score")
    else:
        v = metrics
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def _scaled(bench: str, v: float) -> float:
    return v / MME_DIVISOR if bench == "mme" else v


def build_report(
    results: Mapping[str, Mapping[str, Any]],
    distilled: str | None = None,
    baseline: str | None = None,
    benchmarks: Sequence[str] | None = None,
    info: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """JSON-able report: checkpoints x benchmarks "score", the paper's average, the difference
    distilled - baseline (when both are named; each must be a key of `results`), and per benchmark
    the official rule and source of `info` ({bench: {"rule", "source", "notes"}})."""
    if not results:
        raise ConfigError("report: no results to compare")
    ckpts = list(results)
    if (distilled is None) != (baseline is None):
        raise ConfigError("report: name both the distilled and the baseline checkpoint, or neither")
    for role, name in (("distilled", distilled), ("baseline", baseline)):
        if name is not None and name not in results:
            raise ConfigError(f"report: {role} checkpoint {name!r} is not among {', '.join(ckpts)}")
    if benchmarks is None:
        present = {b for r in results.values() for b in r}
        benchmarks = [b for b in BENCHMARK_ORDER if b in present] + sorted(present - set(BENCHMARK_ORDER))
    benchmarks = list(benchmarks)

    scores = {c: {b: _score_of(results[c].get(b)) for b in benchmarks} for c in ckpts}
    avg_over = [b for b in benchmarks if b in PAPER_BENCHMARKS]
    average: dict[str, float | None] = {}
    for c in ckpts:
        vals = [scores[c][b] for b in avg_over]
        average[c] = (
            sum(_scaled(b, v) for b, v in zip(avg_over, vals)) / len(vals)
            if avg_over and all(v is not None for v in vals)
            else None
        )

    diff = None
    if distilled is not None:
        def sub(a, b):
            return None if a is None or b is None else a - b

        diff = {
            "distilled": distilled,
            "baseline": baseline,
            "scores": {b: sub(scores[distilled][b], scores[baseline][b]) for b in benchmarks},
            "average": sub(average[distilled], average[baseline]),
        }

    notes = []
    if avg_over:
        names = ", ".join(_display(b) + (" / 20" if b == "mme" else "") for b in avg_over)
        note = f"Avg: mean of {names}, as the Align-KD paper averages (MME-P is divided by 20 first)"
        missing = [_display(b) for b in PAPER_BENCHMARKS if b not in avg_over]
        if missing:
            note += f"; the paper's average also has {', '.join(missing)}, not evaluated here"
        if any(b not in PAPER_BENCHMARKS for b in benchmarks):
            note += "; " + ", ".join(_display(b) for b in benchmarks if b not in PAPER_BENCHMARKS)
            note += " not averaged"
        notes.append(note + ".")
    info = info or {}
    notes.append("Scores: in % (POPE: mean F1 of its splits; MMB-dev: circular accuracy); MME-P: sum of 10 subtasks, "
                 "out of 2000" + ("; each number's official rule is listed below." if info else "."))
    if any(v is None for s in scores.values() for v in s.values()):
        notes.append("–: not evaluated.")
    coverage = {c: {b: {k: results[c][b][k] for k in COVERAGE_KEYS if k in results[c][b]}
                    for b in benchmarks if isinstance(results[c].get(b), Mapping)} for c in ckpts}
    return {
        "benchmarks": benchmarks,
        "benchmark_names": {b: _display(b) for b in benchmarks},
        "checkpoints": ckpts,
        "scores": scores,
        "average_over": avg_over,
        "average": average,
        "difference": diff,
        "notes": notes,
        "rules": {b: info[b].get("rule", "") for b in benchmarks if b in info},
        "sources": {b: info[b].get("source", "") for b in benchmarks if b in info},
        "coverage": coverage,
    }


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def render_markdown(report: dict) -> str:
    """The report as a Markdown table (rows: checkpoints, then the difference row) with footnotes."""
    benches = report["benchmarks"]
    has_avg = bool(report["average_over"])
    head = ["checkpoint"] + [report["benchmark_names"][b] for b in benches] + (["Avg¹"] if has_avg else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c in report["checkpoints"]:
        row = [c] + [_fmt(report["scores"][c][b]) for b in benches]
        if has_avg:
            row.append(_fmt(report["average"][c]))
        lines.append("| " + " | ".join(row) + " |")
    d = report["difference"]
    if d is not None:
        row = [f"Δ {d['distilled']} − {d['baseline']}"] + [_fmt(d["scores"][b], True) for b in benches]
        if has_avg:
            row.append(_fmt(d["average"], True))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for i, n in enumerate(report["notes"]):
        lines.append(f"{'¹ ' if i == 0 and has_avg else ''}{n}")
    if report.get("rules"):
        lines += ["", "Each number as the official scorer computes it:"]
        for b, rule in report["rules"].items():
            src = report["sources"].get(b)
            lines.append(f"- {report['benchmark_names'][b]}: {rule}" + (f" (data: {src})" if src else ""))
    rows = [(c, b, m) for c, per in report.get("coverage", {}).items() for b, m in per.items() if m]
    if rows:
        lines += ["", "| run | benchmark | questions | no answer (scored wrong) | unknown question ids | unusable rows |",
                  "|---|---|---:|---:|---:|---:|"]
        for c, b, m in rows:
            cells = [_count(m.get(k)) for k in COVERAGE_KEYS]
            lines.append(f"| {c} | {report['benchmark_names'][b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _count(v: Any) -> str:
    return "–" if v is None else str(int(v))


def render_radar_png(report: dict, title: str | None = None) -> bytes:
    """PNG bytes of a radar plot: one axis per benchmark, one polygon per checkpoint.

    Axes are scaled each on its own (like Align-KD's Figure 1): the lowest score on an axis sits at
    0.45 of the radius, the highest at 0.9; the real values are written at the vertices. MME-P is
    shown /20 like the average.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    benches = report["benchmarks"]
    ckpts = report["checkpoints"]
    if not benches:
        raise ConfigError("report: no benchmarks to plot")
    if len(benches) < 3:  # a radar needs three axes; fewer read better as bars
        return _bars_png(report, title)
    n = len(benches)
    angles = [2 * math.pi * i / n for i in range(n)]  # clockwise from the top (see offset below)

    radius: dict[str, list[float]] = {c: [] for c in ckpts}
    for b in benches:
        vals = [report["scores"][c][b] for c in ckpts]
        real = [_scaled(b, v) for v in vals if v is not None]
        lo, hi = (min(real), max(real)) if real else (0.0, 1.0)
        span = max(hi - lo, 0.01 * abs(hi), 1e-6)
        for c, v in zip(ckpts, vals):
            radius[c].append(0.0 if v is None else 0.45 + 0.45 * (_scaled(b, v) - lo) / span)

    fig = Figure(figsize=(6.4, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111, projection="polar")
    ax.set_theta_offset(math.pi / 2)
    ax.set_theta_direction(-1)
    closed = angles + angles[:1]
    for c in ckpts:
        r = radius[c] + radius[c][:1]
        ax.plot(closed, r, linewidth=1.8, label=c)
        ax.fill(closed, r, alpha=0.12)
        for a, rr, b in zip(angles, radius[c], benches):
            v = report["scores"][c][b]
            if v is not None:
                ax.annotate(_fmt(v), (a, rr), fontsize=7, ha="center", va="bottom")
    ax.set_xlim(0, 2 * math.pi)
    ax.set_xticks(angles)
    ax.set_xticklabels([report["benchmark_names"][b] for b in benches], fontsize=10)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels([])
    ax.set_ylim(0, 1.0)
    ax.legend(loc="upper right", bbox_to_anchor=(1.15, 1.12), fontsize=8)
    if title:
        ax.set_title(title, pad=24)
    fig.text(0.01, 0.01, "each axis scaled on its own (MME-P /20); labels are the measured scores", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _bars_png(report: dict, title: str | None) -> bytes:
    """Grouped bars (one group per benchmark, one bar per checkpoint) for one or two benchmarks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    benches, ckpts = report["benchmarks"], report["checkpoints"]
    fig = Figure(figsize=(5.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / len(ckpts)
    for i, c in enumerate(ckpts):
        xs = [j + i * width for j in range(len(benches))]
        vals = [_scaled(b, report["scores"][c][b] or 0.0) for b in benches]
        ax.bar(xs, vals, width, label=c)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(ckpts) - 1) / 2 for j in range(len(benches))], [_display(b) for b in benches])
    ax.set_ylabel("score (MME-P / 20)")
    ax.set_title(title or "distilled vs baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    distilled: str | None = None,
    baseline: str | None = None,
    benchmarks: Sequence[str] | None = None,
    stem: str = "report",
    plot: bool = True,
    info: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Build the report and write `{stem}_radar.png`, `{stem}.json` (report + full metrics + the
    benchmarks' info) and `{stem}.md` into out_dir, in that order: the Markdown, written last, is
    there only when the rest is. Returns the paths written, by kind ("radar", "json", "markdown")."""
    rep = build_report(results, distilled, baseline, benchmarks, info=info)
    out_dir = Path(out_dir)
    paths = {}
    if plot and can_draw(out_dir / f"{stem}_radar.png"):
        paths["radar"] = out_dir / f"{stem}_radar.png"
        atomic_write(paths["radar"], render_radar_png(rep))
    paths["json"] = out_dir / f"{stem}.json"
    full = dict(rep, metrics={c: {b: dict(m) if isinstance(m, Mapping) else m for b, m in r.items()} for c, r in results.items()},
                benchmark_info={b: dict(v) for b, v in (info or {}).items()})
    atomic_write(paths["json"], json.dumps(full, indent=2, sort_keys=False) + "\n")
    paths["markdown"] = out_dir / f"{stem}.md"
    atomic_write(paths["markdown"], render_markdown(rep))
    return paths
