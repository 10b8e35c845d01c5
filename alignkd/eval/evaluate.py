"""`alignkd-mobile eval`: checkpoints (or exported bundles, through the emulator) × benchmarks → answer files
(LLaVA format, resumable) → the official scores → report; or, with `answers`, existing answer files → scores →
report, no model.

Everything a user can get wrong is checked before any model loads: benchmark names and numbers,
--data-root, the answer files, the run names against --distilled / --baseline, each checkpoint's
tokenizer against its config, then every benchmark's files. Our own answers are scored from the answer file, the
same path as `--answers`, so both give the same number for the same file.
"""

from __future__ import annotations

import functools
import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, shown
from ..fileio import BAD_JSON, atomic_write
from ..model.checkpoint import load_config, load_model, weights_digest
from ..model.tokenizer import check_tokenizer_matches, load_tokenizer
from .answers import match_answers, read_answer_rows
from .benchmarks import Benchmark, EvalItem, LoadStats, get_benchmark
from .report import build_report, render_markdown, write_report
from .runner import answer_with, model_replies


def evaluate(checkpoints: Sequence[str], benches: Sequence[str], data_root: str | None, out_dir: str | Path,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 16,
             distilled: str | None = None, baseline: str | None = None, progress: bool = True,
             log: Callable[[str], object] = print, answers: Sequence[str | Path] = (), device: str = "auto",
             dtype: str = "auto", open_bundle: Callable[[str], "Answerer"] | None = None) -> dict:
    """Score every checkpoint (or exported bundle, or answer file) on every benchmark; write report.{md,json} and
    report_radar.png into out_dir. Returns {run name: {benchmark: metrics}}.

    Run names are the checkpoint (bundle) directory names, answer files' their stems. A run's answers go to
    out_dir/answers/<name>/<bench>.jsonl; a rerun skips what is there. device: auto (a GPU when there is one),
    cpu, cuda or cuda:N; dtype: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16. A folder holding an
    exported bundle (manifest.json) answers through `open_bundle(path)` (the CLI layer's: the emulator, as the
    app runs it; eval knows nothing of export).
    """
    _check_request(list(checkpoints), list(benches), data_root, limit, batch_size, max_new_tokens, distilled,
                   baseline, [Path(a) for a in answers])
    models = [c for c in checkpoints if not is_bundle(c)]
    place = placement(device, dtype) if models else None  # bundles and answer files load no torch model
    if len(models) < len(checkpoints) and open_bundle is None:
        raise ConfigError(f"{next(c for c in checkpoints if is_bundle(c))} is an exported bundle: "
                          "`alignkd-mobile eval` answers with one through the emulator")
    bundles = {c: open_bundle(c) for c in checkpoints if is_bundle(c)}  # manifests and checksums verified
    names = _names(list(checkpoints), [Path(a) for a in answers], distilled, baseline, bundles)
    sources = [*answers, *checkpoints]
    distilled, baseline = (None if n is None else _run_name(n, names, sources) for n in (distilled, baseline))
    # every checkpoint's tokenizer is checked here, before any model loads
    answerers = [bundles[c] if c in bundles else CheckpointAnswerer(c, place) for c in checkpoints]
    out = Path(out_dir)
    for n, a in zip(names, answerers):
        _check_answers_folder(out / "answers" / n, a, max_new_tokens)
    loaded = {b: _load(get_benchmark(b), data_root, limit, log) for b in benches}
    # answers to questions --limit left out are told apart from unknown ones (all questions read only then)
    everything = {b: functools.cache(functools.partial(_all_ids, get_benchmark(b), data_root)) for b in benches}
    created = not out.exists()
    try:
        results = _answer_and_score(names, answerers, loaded, out, [Path(a) for a in answers], batch_size,
                                    max_new_tokens, progress, log, everything)
    except BaseException:
        # an eval that stops before its first answer (a prompt beyond the model's context) leaves no folder
        if created and not any(p.stat().st_size for p in out.rglob("*.jsonl")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    info = {b: {"rule": bench.rule, "source": stats.source, "notes": stats.notes} for b, (bench, _, stats) in loaded.items()}
    paths = write_report(results, out, distilled=distilled, baseline=baseline, benchmarks=list(benches), info=info)
    log(render_markdown(build_report(results, distilled, baseline, list(benches), info=info)))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def is_bundle(path: str | Path) -> bool:
    """An `alignkd-mobile export` bundle (its manifest.json), not an mtgv checkpoint."""
    return (Path(path) / "manifest.json").is_file() and not (Path(path) / "config.json").is_file()


class Answerer(ABC):
    """What answers a run's questions. `identity` stamps its answers (a checkpoint's weights digest, a bundle's
    manifest digest); `setting` is (flag, value) of what else changes them (--dtype, --artifact): answers of
    another identity or setting are never mixed into a resumed file."""

    path: str
    identity: str
    setting: tuple[str, str]
    run_name: str  # (bundles: the folder's name and the artifact's)

    @abstractmethod
    def reply(self, batch: list[EvalItem], max_new_tokens: int) -> list[str | None]:
        """The replies to a batch of questions (None: left unanswered, scored wrong)."""

    def close(self) -> None:
        pass


class CheckpointAnswerer(Answerer):
    """An mtgv checkpoint, loaded on first use onto the placement's device and dtype: batched greedy decoding."""

    def __init__(self, path: str, place: "Placement"):
        self.path, self.place, self.tokenizer = path, place, _matching_tokenizer(path)
        self.identity, self.setting = weights_digest(path), ("--dtype", place.dtype_name)
        self._reply = None

    def reply(self, batch: list[EvalItem], max_new_tokens: int) -> list[str]:
        if self._reply is None:
            model = load_model(self.path).to(self.place.device, self.place.dtype)
            self._reply = model_replies(model, self.tokenizer, max_new_tokens)
        return self._reply(batch)

    def close(self) -> None:
        self._reply = None  # the model with it


def _answer_and_score(names: list[str], answerers: list[Answerer], loaded: dict, out: Path, answers: list[Path],
                      batch_size: int, max_new_tokens: int, progress: bool, log, everything: dict) -> dict:
    """{run name: {benchmark: metrics}}: each checkpoint or bundle answers each benchmark (resuming its answer
    file), or an answer file is read; then scored."""
    results: dict[str, dict] = {}
    for i, name in enumerate(names):
        results[name] = {}
        who = answerers[i] if answerers else None
        if who is not None:
            _claim_answers(out / "answers" / name, who, max_new_tokens, log)
        try:
            for b, (bench, items, stats) in loaded.items():
                if who is None:
                    path = Path(answers[i])
                else:
                    path = out / "answers" / name / f"{b}.jsonl"
                    answer_with(functools.partial(_replies, who, max_new_tokens), items, batch_size,
                                answers_file=path, desc=f"{name} {b}", progress=progress,
                                answer_keys=bench.answer_keys, model_id=name, log=log)
                results[name][b] = _score(bench, items, stats, path, name, log, everything[b])
        finally:
            if who is not None:
                who.close()
    return results


def _replies(who: Answerer, max_new_tokens: int, batch: list[EvalItem]) -> list[str]:
    return who.reply(batch, max_new_tokens)


def _check_request(checkpoints: list[str], benches: list[str], data_root: str | None, limit: int | None,
                   batch_size: int, max_new_tokens: int, distilled: str | None, baseline: str | None,
                   answers: list[Path]) -> None:
    """Every check that needs no model, no bundle and no benchmark file."""
    if not benches:
        raise ConfigError("--bench names no benchmark")
    for b in benches:
        get_benchmark(b)
    if len(set(benches)) != len(benches):
        raise ConfigError(f"--bench names a benchmark twice: {','.join(benches)}")
    for flag, v in (("--limit", limit), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{flag} must be a positive integer, got {v!r}")
    need = [b for b in benches if b != "easyvqa"]
    if need and data_root is None:
        raise ConfigError(f"--data-root is required for {', '.join(need)}: the benchmark's folder, or the folder "
                          "holding one folder per benchmark (LLaVA-1.5's playground/data/eval)")
    if data_root is not None and not Path(data_root).is_dir():
        raise DataError(f"--data-root {data_root} is not a folder")
    if answers and checkpoints:
        raise ConfigError("give checkpoints or --answers files, not both")
    if not answers and not checkpoints:
        raise ConfigError("nothing to evaluate: give checkpoint directories, or --answers FILE to score an answer file")
    if answers and len(benches) != 1:
        raise ConfigError(f"an answer file answers one benchmark: give one --bench, not {','.join(benches)}")
    for a in answers:  # a file the user names must hold answers: one with none is not a score of 0
        rows = read_answer_rows(a)
        if not rows.rows:
            raise DataError(f"answer file {a} has no answer rows (JSON lines with a question_id and a text"
                            + (f"; {rows.n_bad_lines} line(s) are not" if rows.n_bad_lines else "; it is empty") + ")")
    if (distilled is None) != (baseline is None):
        raise ConfigError("name both --distilled and --baseline, or neither")


def _names(checkpoints: list[str], answers: list[Path], distilled: str | None, baseline: str | None,
           bundles: Mapping[str, "Answerer"]) -> list[str]:
    """The run names: a checkpoint folder's or answer file's name; a bundle's folder name and its artifact
    (alignkd-pte-8da4w: a checkpoint and the bundle exported from it may share a folder name)."""
    names = [Path(a).stem for a in answers] or [bundles[c].run_name if c in bundles else Path(c).name or str(c)
                                                for c in checkpoints]
    if len(set(names)) != len(names):
        raise ConfigError("the runs need different names (the checkpoint folders' or answer files' names): "
                          + ", ".join(sorted({n for n in names if names.count(n) > 1})) + " is given twice; evaluate "
                          "them in two commands with two --output-dir")
    for flag, n in (("--distilled", distilled), ("--baseline", baseline)):
        if n is not None and _run_name(n, names, [*answers, *checkpoints]) is None:
            raise ConfigError(f"{flag} {n!r} is not one of the runs: {', '.join(names)}")
    return names


def _run_name(given: str, names: list[str], sources: list) -> str | None:
    """The run --distilled / --baseline names: by its name, or by its checkpoint or answer file's path."""
    if given in names:
        return given
    return next((n for n, src in zip(names, sources) if _same_path(given, str(src))), None)


def _stamp(folder: Path) -> dict | None:
    """What a folder's model.json says made its answers (None: no stamp, or one that cannot be read)."""
    try:
        stamp = json.loads((folder / "model.json").read_text())
    except (OSError, *BAD_JSON):
        return None
    return stamp if isinstance(stamp, dict) else None


_STAMP_KEYS = {"--dtype": "dtype", "--artifact": "artifact"}
# stamps written before --dtype hold none: those evals ran on the CPU in fp32
_STAMP_DEFAULTS = {"dtype": "fp32"}


def _check_answers_folder(folder: Path, who: Answerer, max_new_tokens: int) -> None:
    """Refuse what would lose or mix answers: a folder holding another checkpoint's answers (one of the same
    folder name, evaluated earlier into this --output-dir), or this model's at another --max-new-tokens or
    --dtype (a bundle's: another --artifact). Nothing is written here."""
    stamp = _stamp(folder)
    if stamp is None or not any(folder.glob("*.jsonl")):
        return
    made_by = stamp.get("checkpoint")  # (stamps before this version hold the path as it was given)
    if stamp.get("weights_digest") != who.identity and not (isinstance(made_by, str) and _same_path(made_by, who.path)):
        raise DataError(f"{folder} holds the answers of another checkpoint ({shown(stamp.get('checkpoint'))}, also "
                        "named by its folder): name another --output-dir, or remove that folder to answer again")
    flag, value = who.setting
    key = _STAMP_KEYS[flag]
    for flag, made, asked in (("--max-new-tokens", stamp.get("max_new_tokens"), max_new_tokens),
                              (flag, stamp.get(key, _STAMP_DEFAULTS.get(key)), value)):
        if stamp.get("weights_digest") == who.identity and made is not None and made != asked:
            raise DataError(f"{folder} holds answers made with {flag} {shown(made)}, this eval asks "
                            f"{asked}: give {flag} {shown(made)} to resume them, or name another --output-dir")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the checkpoints answer."""

    device: torch.device
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """--device / --dtype resolved: auto is a GPU when there is one, answering in bf16 there (fp32 on the CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: " + ("this machine has no CUDA device" if not torch.cuda.is_available()
                                                     else f"it has {torch.cuda.device_count()} CUDA device(s)"))
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return Placement(dev, dtype)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        return False


def _claim_answers(folder: Path, who: Answerer, max_new_tokens: int, log) -> None:
    """Answers resume a killed eval of the same model only: a checkpoint retrained in place (same folder, other
    weights) starts over instead of being scored with the previous model's answers, whose weights are gone."""
    stamp = _stamp(folder)
    if any(folder.glob("*.jsonl")):
        if stamp is None:  # copied or written by hand: whose they are is unknown
            log(f"{folder}: answers without a model.json stamp, taken as {who.path}'s (remove them to answer again)")
        elif stamp.get("weights_digest") != who.identity:
            for p in sorted(folder.glob("*.jsonl")):
                p.unlink()
            log(f"{folder}: answers of the checkpoint's earlier weights (retrained in place); answering again")
    flag, value = who.setting
    atomic_write(folder / "model.json", json.dumps({"checkpoint": str(Path(who.path).resolve()),
                                                    "weights_digest": who.identity, "max_new_tokens": max_new_tokens,
                                                    _STAMP_KEYS[flag]: value}))


def _matching_tokenizer(ckpt: str):
    """The checkpoint's tokenizer, refused (as train and export refuse it) when it cannot drive the model."""
    cfg = load_config(ckpt)
    tok = load_tokenizer(ckpt)
    check_tokenizer_matches(tok, cfg.text.vocab_size, cfg.text.bos_token_id, cfg.text.eos_token_id,
                            where=f"checkpoint {ckpt}")
    return tok


def _load(bench: Benchmark, data_root: str | None, limit: int | None, log) -> tuple[Benchmark, list[EvalItem], LoadStats]:
    items, stats = bench.load(Path(data_root) if data_root else None, limit=limit)
    stats.limited = limit is not None
    if not items:  # a score over no question is no score
        raise DataError(f"{bench.name}: no usable question in {stats.source}" + (
            f" ({stats.n_malformed} unusable row(s), e.g. {'; '.join(stats.malformed[:2])})" if stats.n_malformed else ""))
    log(f"{bench.name}: {len(items)} questions from {stats.source}")
    if stats.n_malformed:
        log(f"{bench.name}: {stats.n_malformed} unusable row(s) not scored, e.g. {'; '.join(stats.malformed[:2])}")
    for note in stats.notes:
        log(f"{bench.name}: {note}")
    return bench, items, stats


def _all_ids(bench: Benchmark, data_root: str | None) -> set[str]:
    return {it.id for it in bench.load(Path(data_root) if data_root else None)[0]}


def _score(bench: Benchmark, items: list[EvalItem], stats: LoadStats, path: Path, name: str, log,
           all_ids: Callable[[], set[str]]) -> dict:
    """The benchmark's metrics of an answer file, with what did not fit counted."""
    rows = read_answer_rows(path)
    ids = {it.id for it in items}
    m = match_answers(rows.rows, ids, bench.answer_keys, stats.unscored)
    if m.n_unknown and stats.limited:  # answers beyond --limit (a fuller eval's) are no unknown questions
        stats.unscored |= all_ids() - ids
        m = match_answers(rows.rows, ids, bench.answer_keys, stats.unscored)
    metrics = {**bench.score(items, m.predictions), "n_unknown_ids": float(m.n_unknown),
               "n_duplicate_answers": float(m.n_duplicates), "n_bad_lines": float(rows.n_bad_lines),
               "n_malformed_rows": float(stats.n_malformed)}
    n_missing = len(items) - len(m.predictions)
    if m.n_unknown:
        log(f"{name} {bench.name}: {m.n_unknown} answer(s) to questions the benchmark does not know, not scored "
            f"(question ids e.g. {', '.join(m.unknown)})")
    if m.n_unscored and stats.limited:
        log(f"{name} {bench.name}: {m.n_unscored} answer(s) to questions outside the {len(items)} scored (--limit), "
            "not scored")
    if n_missing:
        log(f"{name} {bench.name}: {n_missing} of {len(items)} questions have no answer in {path}: scored as wrong")
    if rows.n_bad_lines:
        log(f"{name} {bench.name}: {rows.n_bad_lines} line(s) of {path} are not answer rows, skipped")
    if m.n_duplicates:
        log(f"{name} {bench.name}: {m.n_duplicates} question(s) answered more than once in {path}: the last answer counts")
    return metrics
