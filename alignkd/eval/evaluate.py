"""`alignkd-mobile eval`: checkpoints × benchmarks → answers (resumable JSONL) → scores → report."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_write
from ..model.checkpoint import load_model
from ..model.tokenizer import load_tokenizer
from .benchmarks import get_benchmark
from .report import render_markdown, build_report, write_report
from .runner import answer_items


def evaluate(checkpoints: list[str], benches: list[str], data_root: str | None, out_dir: str | Path,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 16,
             distilled: str | None = None, baseline: str | None = None, progress: bool = True, log=print) -> dict:
    """Answer every benchmark with every checkpoint; write report.{md,json} and report_radar.png.

    Checkpoint names in the report are their directory names; answers go to
    out_dir/answers/<name>/<bench>.jsonl (a rerun skips what is there: a killed eval resumes).
    """
    out = Path(out_dir)
    loaded = [(get_benchmark(b), *get_benchmark(b).load(Path(data_root) if data_root else None, limit=limit))
              for b in benches]
    for bench, items, stats in loaded:
        if stats.n_malformed:
            log(f"{bench.name}: {stats.n_malformed} malformed row(s) not scored, e.g. {stats.malformed[:2]}")
    results: dict[str, dict] = {}
    names = [Path(c).name or str(c) for c in checkpoints]
    if len(set(names)) != len(names):
        raise CheckpointError(f"checkpoint directory names must differ (they name the report's rows): {names}")
    for ckpt, name in zip(checkpoints, names):
        model, tok = load_model(ckpt), load_tokenizer(ckpt)
        results[name] = {}
        for bench, items, stats in loaded:
            preds = answer_items(model, tok, items, batch_size, max_new_tokens,
                                 answers_file=out / "answers" / name / f"{bench.name}.jsonl",
                                 desc=f"{name} {bench.name}", progress=progress)
            results[name][bench.name] = {**bench.score(items, preds), "n_malformed_rows": stats.n_malformed}
    paths = write_report(results, out, distilled=distilled, baseline=baseline, benchmarks=benches)
    log(render_markdown(build_report(results, distilled, baseline, benches)))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results
