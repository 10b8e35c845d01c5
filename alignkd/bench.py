"""`alignkd-mobile bench`: latency and accuracy of bundles, side by side (distilled vs baseline).

Per artifact (format × quant) of each bundle: load time, image-encode time, time to first token with the
image encoded (cold) and with its tokens from the image-token cache (warm: a follow-up question about the
same image), prefill and decode tokens/s, peak RSS — on this machine through the desktop emulator
(`--device host`, each artifact in its own process so peak RSS is its own), or on a phone through the
demo app's headless benchmark mode (`--device adb[:SERIAL]`, the same FIELDS, which the app's
`BenchmarkResult.FIELDS` repeats). Beside latency: easy-vqa held-out accuracy through the same emulator,
so one table shows accuracy and speed together.

This is the command layer: it drives the export side (the emulator) and scores with the eval side
(easy-vqa), which the export package itself never imports.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from alignkd.errors import AlignKDError, ConfigError, DataError, shown
from alignkd.export.base import check_threads
from alignkd.export.bundle import DEVICE_DIR, read_manifest
from alignkd.export.parity import PARITY_QUESTION, parity_image
from alignkd.figures import can_draw
from alignkd.fileio import atomic_write

FIELDS = ("bundle", "format", "quant", "n_runs", "load_s", "image_encode_s", "ttft_s", "ttft_warm_s",
          "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
APP_PACKAGE = "org.alignkd.demo"
APP_BENCH_ACTIVITY = f"{APP_PACKAGE}/.BenchmarkActivity"


def check_options(n_runs: int, threads: int, max_new_tokens: int, accuracy_limit: int) -> None:
    """Refuse, before any bundle is loaded, options that measure nothing."""
    check_threads(threads)
    for name, value, least in (("n_runs (--n-runs)", n_runs, 1),
                               ("max_new_tokens (--max-new-tokens)", max_new_tokens, 1),
                               ("accuracy_limit (--accuracy-limit)", accuracy_limit, 0)):
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")


def bench_artifact(bundle: str, fmt: str, quant: str, n_runs: int = 3, threads: int = 2, max_new_tokens: int = 32,
                   accuracy_limit: int = 0) -> dict:
    """Measure one artifact in this process (the host worker). Medians over n_runs after one warm-up.

    Each run asks about the image with an empty image-token cache (cold: the encoder runs), decoding
    max_new_tokens with EOS ignored, then asks again about the same image (warm: its tokens come from the
    cache; timed to the first token).
    """
    from alignkd.export.emulator import BundleRunner

    runner = BundleRunner(bundle, fmt, quant, threads)
    if not runner.parity_passed:
        click.echo(f"warning: {runner.name} failed its parity gate at export (--allow-failed-parity)", err=True)
    try:
        image = parity_image()
        cold, warm = [], []
        for i in range(n_runs + 1):
            runner.image_cache.clear()
            # EOS ignored, as llama-bench: a trained model's one-word answer would leave no decode step to time
            c = runner.answer(image, PARITY_QUESTION, max_new_tokens=max_new_tokens, stop_at_eos=False).generation
            w = runner.answer(image, PARITY_QUESTION, max_new_tokens=1).generation
            if c.timings["image_cached"] or not w.timings["image_cached"]:
                raise RuntimeError("the image-token cache did not miss then hit on the same image")
            if i:
                cold.append(c)
                warm.append(w)
        med = statistics.median
        image_s = med([g.timings["image_s"] for g in cold])
        prefill_s = med([g.timings["prefill_s"] for g in cold])
        decode = [g.timings["decode_steps"] / g.timings["decode_s"] for g in cold if g.timings["decode_steps"]]
        row = {"bundle": Path(bundle).name, "format": fmt, "quant": quant, "n_runs": n_runs,
               "load_s": round(runner.load_s, 4), "image_encode_s": round(image_s, 4),
               "ttft_s": round(image_s + prefill_s, 4),
               "ttft_warm_s": round(med([g.timings["image_s"] + g.timings["prefill_s"] for g in warm]), 4),
               "prefill_tok_s": round(cold[0].prompt_len / prefill_s, 1),
               "decode_tok_s": round(med(decode), 1) if decode else None,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if accuracy_limit:
            row.update(easyvqa_accuracy(runner, accuracy_limit))
    finally:
        runner.close()
    return row


def easyvqa_accuracy(runner, limit: int) -> dict:
    """Held-out easy-vqa exact-match accuracy of the artifact through the emulator, scored as `eval` does."""
    from alignkd.eval.benchmarks import get_benchmark

    bench = get_benchmark("easyvqa")
    items, _ = bench.load(None, limit=limit)
    preds = {it.id: runner.answer(it.image, it.question, max_new_tokens=6).text for it in items}
    return {"easyvqa_accuracy": bench.score(items, preds)["accuracy"], "easyvqa_n": len(items)}


class SomeFailed(DataError):
    """Some artifacts failed after others were measured: the measured rows travel with the error, so the
    command writes them before it names the failures (minutes of measurement are not thrown away)."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def _all_or_some(rows: list[dict], failed: list[str]) -> list[dict]:
    """The rows, or SomeFailed naming each failure and carrying the rows measured before it."""
    if failed:
        kept = f"; the {len(rows)} measured row(s) are written" if rows else ""
        raise SomeFailed(f"benchmark of {'; '.join(failed)} failed{kept}", rows)
    return rows


def bench_host(bundles: list[str], n_runs: int = 3, threads: int = 2, max_new_tokens: int = 32,
               accuracy_limit: int = 0, log=print) -> list[dict]:
    check_options(n_runs, threads, max_new_tokens, accuracy_limit)
    manifests = {b: read_manifest(b) for b in bundles}  # every bundle verified before the first is measured
    rows, failed = [], []
    for b in bundles:
        for art in manifests[b]["artifacts"]:
            log(f"bench {Path(b).name} {art['format']}/{art['quant']} ...")
            args = [sys.executable, "-m", "alignkd.bench", b, art["format"], art["quant"], str(n_runs),
                    str(threads), str(max_new_tokens), str(accuracy_limit)]
            r = subprocess.run(args, capture_output=True, text=True)
            for line in r.stderr.splitlines():  # the worker's warnings (a failed parity gate) reach the user
                if line.startswith("warning: "):
                    click.echo(line, err=True)
            if r.returncode == 0:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                continue
            lines = r.stderr.strip().splitlines()
            why = lines[-1].removeprefix("error: ") if lines else f"the worker exited with status {r.returncode}"
            failed.append(f"{b} {art['format']}/{art['quant']} ({why})")
    return _all_or_some(rows, failed)


def bench_adb(bundles: list[str], serial: str | None = None, n_runs: int = 3, max_new_tokens: int = 32,
              timeout_s: float = 600, log=print) -> list[dict]:
    """Run the demo app's headless benchmark on a phone for each pushed bundle and pull its JSON (the app
    runs ExecuTorch with its default thread count, the phone's big cores)."""
    from alignkd.export.exporter import adb_device  # torch and the targets load only for a phone run

    check_options(n_runs, 1, max_new_tokens, 0)
    base = adb_device(serial, "--device adb")

    def call(*cmd: str) -> str:
        r = subprocess.run(base + list(cmd), capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"adb {' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def phone_rows(b: str) -> list[dict]:
        name = Path(b).name
        remote_bundle = f"{DEVICE_DIR}/{name}"
        out_name = f"bench-{name}.json"
        log(f"bench {name} on the phone ...")
        call("shell", "run-as", APP_PACKAGE, "rm", "-f", f"files/{out_name}")
        call("shell", "am", "start", "-W", "-n", APP_BENCH_ACTIVITY, "--es", "bundle", remote_bundle,
             "--ei", "n_runs", str(n_runs), "--ei", "max_new_tokens", str(max_new_tokens), "--es", "out", out_name)
        deadline = time.monotonic() + timeout_s
        while True:
            r = subprocess.run(base + ["exec-out", "run-as", APP_PACKAGE, "cat", f"files/{out_name}"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip().startswith(("{", "[")):
                break
            if time.monotonic() > deadline:
                raise DataError(f"the app wrote no {out_name} within {timeout_s:.0f} s (is the bundle pushed to {remote_bundle}?)")
            time.sleep(2)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            raise DataError(f"the app's {out_name} is not JSON") from None
        rows = []
        for row in data if isinstance(data, list) else [data]:
            if not isinstance(row, dict):
                raise DataError(f"the app's {out_name} holds {shown(row)}, not a row")
            if "error" in row:
                raise DataError(f"the app's benchmark of {remote_bundle} failed: {row['error']}")
            missing = [f for f in FIELDS if f not in row]
            if missing:
                raise DataError(f"the app's {out_name} lacks field(s) {', '.join(missing)}: is the app older than this alignkd?")
            rows.append({**row, "device": f"adb:{serial or 'default'}"})
        return rows

    rows, failed = [], []
    for b in bundles:  # a failing bundle does not throw away the rows of those measured before it
        try:
            rows += phone_rows(b)
        except DataError as e:
            failed.append(f"{b} ({e})")
    return _all_or_some(rows, failed)


def render_table(rows: list[dict]) -> str:
    cols = ["bundle", "format", "quant", "load_s", "image_encode_s", "ttft_s", "ttft_warm_s", "prefill_tok_s",
            "decode_tok_s", "peak_rss_mb", "easyvqa_accuracy"]
    cols = [c for c in cols if any(c in r for r in rows)]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    body = "\n".join("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows)
    return head + "\n" + body


def render_png(rows: list[dict]) -> bytes:
    """Bar charts: decode tokens/s, time to first token cold and warm, (when measured) accuracy, per artifact."""
    import io

    from matplotlib.figure import Figure

    metrics = [("decode_tok_s", "decode tokens/s"), ("ttft_s", "time to first token (s)"),
               ("ttft_warm_s", "TTFT, image tokens cached (s)")]
    if any("easyvqa_accuracy" in r for r in rows):
        metrics.append(("easyvqa_accuracy", "easy-vqa accuracy (%)"))
    fig = Figure(figsize=(4 * len(metrics), 3.6 + 0.15 * len(rows)), dpi=100)
    labels = [f"{r['bundle']}\n{r['format']}/{r['quant']}" for r in rows]
    bundles = sorted({r["bundle"] for r in rows})
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        vals = [r.get(key) or 0 for r in rows]
        ax.barh(range(len(rows)), vals, color=[f"C{bundles.index(r['bundle']) % 10}" for r in rows])
        ax.set_yticks(range(len(rows)), labels if i == 0 else [""] * len(rows), fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:g}", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """The chart first, then the report: a full disk may leave a new chart beside the previous report, never
    a new report without its chart (without matplotlib: no chart, and none of an earlier run). Each file is
    written atomically."""
    out_dir = Path(out_dir)
    paths = {"png": out_dir / "bench.png", "json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    if can_draw(paths["png"]):
        atomic_write(paths["png"], render_png(rows))
    else:
        del paths["png"]
    atomic_write(paths["json"], json.dumps({"rows": rows}, indent=2))
    atomic_write(paths["markdown"], render_table(rows) + "\n")
    return paths


if __name__ == "__main__":  # the host worker: one artifact per process, so peak RSS is its own
    b, f, q, n, th, mx, acc = sys.argv[1:8]
    try:
        row = bench_artifact(b, f, q, int(n), int(th), int(mx), int(acc))
    except AlignKDError as e:  # the parent quotes this line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row))
