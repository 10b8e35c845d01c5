"""Time to first token at the real MobileVLM-V2-1.7B shape: our runtimes beside llama.cpp's own multimodal path.

    python benchmarks/ttft.py --work /work/scratch/me/ttft                 # 1.7B, random weights (cached artifacts)
    python benchmarks/ttft.py --preset tiny-student --rounds 2 --work /tmp/ttft-tiny   # smoke run
    flock /tmp/heavy.lock python benchmarks/ttft.py ...                  # on a shared machine: nothing else running

One 336×336 image (easy-vqa test image 0, upscaled) and a question of exactly --question-tokens tokens in the
`v1` template, the same for every path:
- ExecuTorch (the `--target android` default bundle), ONNX (the default desktop export) and GGUF Q4_0 through
  our GGUF runtime, each through the desktop emulator (`BundleRunner`), as `run` / `bench` / the app step them;
- llama.cpp's own path, driven directly through its C API: `llama_model_load_from_file` /
  `llama_init_from_model`, `mtmd_tokenize`, `mtmd_encode_chunk` + `mtmd_helper_decode_image_chunk` for the
  image, `mtmd_helper_eval_chunk_single` for the text, `llama_decode` per token; LM Q4_0 with our mmproj at
  F16 and at Q8_0, each with and without llama.cpp's extra buffer types (its default: AMX / repacked weights
  on x86; a path whose process crashes is reported and left out), flash attention as --flash.
Per path: load, image encode (the encoder alone), prefill of image + prompt, TTFT (= encode + prefill, as
`bench` defines it; preprocessing reported apart), warm TTFT (ours only: a follow-up question about the same
image, as the emulator and the app answer it: image tokens from the image-token cache and the prompt's KV up
to the image kept, so only the question is prefilled; and, apart, with the image tokens cached but the
prefix prefilled again: "tokens cached only"), decode tokens/s (--decode tokens, EOS ignored), peak RSS (and
the RSS after imports, before loading), artifact size. Each path runs in a fresh process per round (load
included), one warm-up ask on another image first; rounds interleave the paths, with a rotating order;
medians over rounds; ratios per round against the faster llama.cpp path of that round.

Artifacts are built once from a random-weight checkpoint written with our saver, through `alignkd-mobile
export` (export time and peak RSS recorded), and cached under --work: a rerun only measures. Writes
ttft.json, ttft.md and ttft.png to --out. Weights are random: speed only; parity is the exporter's job.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bundle name → `alignkd-mobile export` flags (besides the checkpoint and --output-dir)
BUNDLES: dict[str, list[str]] = {
    "android": ["--target", "android"],
    "onnx": ["--target", "desktop", "--format", "onnx"],
    "gguf": ["--target", "desktop", "--format", "gguf", "--quant", "q4_0"],
    "gguf-f16": ["--target", "desktop", "--format", "gguf", "--quant", "q4_0", "--vision-quant", "fp16"],
}
# path → (label, how it runs): ("emulator", bundle, format), or ("llama.cpp", LM (bundle, file prefix), mmproj
# (bundle, prefix), extra buffer types: llama.cpp's default, AMX tiles / repacked weights on this CPU)
PATHS: dict[str, tuple] = {
    "pte": ("ExecuTorch, android default", "emulator", "android", "pte"),
    "onnx": ("ONNX, default export", "emulator", "onnx", "onnx"),
    "gguf": ("GGUF Q4_0 + mmproj Q8_0, our runtime", "emulator", "gguf", "gguf"),
    "llama-f16": ("llama.cpp mtmd, Q4_0 + mmproj F16", "llama.cpp", ("gguf", "model-"), ("gguf-f16", "mmproj-"), False),
    "llama-q8_0": ("llama.cpp mtmd, Q4_0 + mmproj Q8_0", "llama.cpp", ("gguf", "model-"), ("gguf", "mmproj-"), False),
    "llama-f16-xb": ("llama.cpp mtmd, Q4_0 + mmproj F16, extra buffer types", "llama.cpp", ("gguf", "model-"),
                     ("gguf-f16", "mmproj-"), True),
    "llama-q8_0-xb": ("llama.cpp mtmd, Q4_0 + mmproj Q8_0, extra buffer types", "llama.cpp", ("gguf", "model-"),
                      ("gguf", "mmproj-"), True),
}
TIMES = ("load_s", "image_encode_s", "prefill_s", "ttft_s")  # ratios to llama.cpp: lower is better
RATES = ("decode_tok_s",)  # higher is better
FLASH = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


# ---- the worker: one path, one round, in its own process ---------------------------------------------
def rss_mb(key: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_images(size: int, work: Path) -> tuple[Path, Path]:
    """The measured image (easy-vqa test image 0, bicubic to size × size) and a different warm-up image."""
    from PIL import Image, ImageOps

    from alignkd.data import easyvqa

    paths = work / f"image-{size}.png", work / f"image-{size}-mirrored.png"
    img = Image.open(easyvqa.first_test_image()).convert("RGB").resize((size, size), Image.BICUBIC)
    img.save(paths[0])
    ImageOps.mirror(img).save(paths[1])
    return paths


def load_rgb(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


def run_emulator(spec: dict) -> dict:
    """Our runtime through the desktop emulator, as `run` and `bench` step it."""
    from alignkd.export.emulator import BundleRunner

    base = rss_mb()
    t0 = time.perf_counter()
    runner = BundleRunner(spec["bundle"], spec["format"], None, spec["threads"])
    load_s = time.perf_counter() - t0
    image, other = load_rgb(spec["image"]), load_rgb(spec["other_image"])
    q = spec["question"]
    runner.answer(other, q, max_new_tokens=4)  # first-run costs, on another image (the cache stays cold for ours)
    t0 = time.perf_counter()
    runner.pixels(image)
    pre_s = time.perf_counter() - t0
    cold = runner.answer(image, q, max_new_tokens=spec["decode"], stop_at_eos=False).generation
    # a follow-up: the image tokens come from the cache and the prompt's KV up to the image is kept
    warm = runner.answer(image, q, max_new_tokens=1).generation
    runner.prefix.clear()  # the same follow-up with the image tokens cached but the prefix's KV not kept
    tokens_only = runner.answer(image, q, max_new_tokens=1).generation
    if cold.timings["image_cached"] or not (warm.timings["prefix_reused"] and tokens_only.timings["image_cached"]):
        raise RuntimeError("the image-token cache / prompt prefix did not miss then hit")
    runner.close()
    t = cold.timings
    return {"load_s": load_s, "preprocess_s": pre_s, "image_encode_s": t["image_s"], "prefill_s": t["prefill_s"],
            "ttft_s": t["image_s"] + t["prefill_s"], "ttft_warm_s": warm.timings["image_s"] + warm.timings["prefill_s"],
            "ttft_tokens_cached_s": tokens_only.timings["image_s"] + tokens_only.timings["prefill_s"], "decode_tok_s": t["decode_steps"] / t["decode_s"],
            "positions": cold.prompt_len, "base_rss_mb": base, "peak_rss_mb": rss_mb("VmHWM")}


class LlamaCpp:
    """llama.cpp's multimodal path through its C API (llama-cpp-python's bindings), as llama-mtmd-cli runs it."""

    def __init__(self, lm: str, mmproj: str, threads: int, n_ctx: int, extra_bufts: bool, flash: str):
        import llama_cpp as lc
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self.lc, self.mtmd = lc, mtmd
        lc.llama_log_set(llama_log_callback, ctypes.c_void_p(0))  # quiet (llama-cpp-python's logger, not verbose)
        mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts  # AMX tiles / repacked weights on x86
        self.model = lc.llama_model_load_from_file(lm.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {lm}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = FLASH[flash]
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_batch = n_ctx
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False  # our runtimes do no warm-up at load either; every path warms up with one ask
        params.n_threads = threads
        params.flash_attn_type = FLASH[flash]
        self.mctx = mtmd.mtmd_init_from_file(mmproj.encode(), self.model, params)
        if not self.mctx:
            raise RuntimeError(f"llama.cpp could not load the mmproj {mmproj}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def logits(self):
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def ask(self, prompt: str, image, n_new: int) -> dict:
        """prompt with `<image>`; image (H, W, 3) uint8. Times: tokenize (+ preprocess), encode, prefill, decode."""
        import numpy as np

        lc, mtmd = self.lc, self.mtmd
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        text = prompt.replace("<image>", mtmd.mtmd_default_marker().decode()).encode()
        image = np.ascontiguousarray(image, dtype=np.uint8)
        t0 = time.perf_counter()
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
        if mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        mtmd.mtmd_bitmap_free(bitmap)
        t1 = time.perf_counter()
        encode_s, n_past = 0.0, 0
        n = mtmd.mtmd_input_chunks_size(chunks)
        for i in range(n):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            new = lc.llama_pos(n_past)  # the text helper adds its tokens to *new_n_past, the image helper sets it
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                te = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self.mctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                encode_s += time.perf_counter() - te
                rc = mtmd.mtmd_helper_decode_image_chunk(self.mctx, self.ctx, chunk, mtmd.mtmd_get_output_embd(self.mctx),
                                                         n_past, 0, self.n_batch, ctypes.byref(new),
                                                         mtmd.mtmd_helper_post_decode_callback(), None)
            else:
                rc = mtmd.mtmd_helper_eval_chunk_single(self.mctx, self.ctx, chunk, n_past, 0, self.n_batch, i == n - 1,
                                                        ctypes.byref(new))
            if rc != 0 or new.value != n_past + mtmd.mtmd_input_chunk_get_n_pos(chunk):
                raise RuntimeError(f"llama.cpp failed to evaluate chunk {i} (at position {n_past}, returned {new.value})")
            n_past = new.value
        tok = int(np.argmax(self.logits()))  # the first token
        t2 = time.perf_counter()
        mtmd.mtmd_input_chunks_free(chunks)
        for _ in range(n_new - 1):  # as our loop: n_new tokens cost n_new − 1 decode steps
            ids = (lc.llama_token * 1)(tok)
            if lc.llama_decode(self.ctx, lc.llama_batch_get_one(ids, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            tok = int(np.argmax(self.logits()))
        t3 = time.perf_counter()
        return {"preprocess_s": t1 - t0, "image_encode_s": encode_s, "prefill_s": t2 - t1 - encode_s,
                "ttft_s": t2 - t1, "decode_tok_s": (n_new - 1) / (t3 - t2), "positions": n_past}

    def close(self) -> None:
        self.mtmd.mtmd_free(self.mctx)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def run_llama(spec: dict) -> dict:
    import numpy as np

    base = rss_mb()
    t0 = time.perf_counter()
    ll = LlamaCpp(spec["lm"], spec["mmproj"], spec["threads"], spec["n_ctx"], spec["extra_bufts"], spec["flash"])
    load_s = time.perf_counter() - t0
    image, other = load_rgb(spec["image"]), load_rgb(spec["other_image"])
    ll.ask(spec["prompt"], np.asarray(other), 4)
    row = ll.ask(spec["prompt"], np.asarray(image), spec["decode"])
    ll.close()
    return {"load_s": load_s, **row, "base_rss_mb": base, "peak_rss_mb": rss_mb("VmHWM")}


# ---- artifacts -------------------------------------------------------------------------------------
def make_checkpoint(preset: str, work: Path, log) -> Path:
    """A random-weight checkpoint of the preset with a tokenizer of its vocabulary size (cached)."""
    ckpt = work / f"ckpt-{preset}"
    if (ckpt / "config.json").is_file():
        return ckpt
    sys.path.insert(0, str(HERE))
    from runtime_latency import synthetic_tokenizer

    from alignkd.model import build_model, save_model

    log(f"writing a random-weight {preset} checkpoint to {ckpt} ...")
    model = build_model(preset, seed=0)
    tok = synthetic_tokenizer(model.config.text.vocab_size, work / f"tok-{preset}")
    save_model(model, ckpt, tokenizer=tok)
    return ckpt


def export_bundle(ckpt: Path, name: str, work: Path, max_seq_len: int, log) -> tuple[Path, dict]:
    """`alignkd-mobile export` in a child process (its peak RSS is its own); cached with its flags."""
    out = work / f"bundle-{ckpt.name}-{name}"
    record = out.with_name(out.name + ".export.json")
    # random weights: near-flat logits flip top-1 on near-ties, so a 4-bit LM fails its gate; kept for speed
    flags = BUNDLES[name] + ["--max-seq-len", str(max_seq_len), "--allow-failed-parity"]
    if (out / "manifest.json").is_file() and record.is_file() and json.loads(record.read_text())["flags"] == flags:
        return out, json.loads(record.read_text())
    cmd = [str(Path(sys.executable).with_name("alignkd-mobile")), "export", str(ckpt), "--output-dir", str(out),
           "--overwrite", *flags]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (Popen.wait would not give it)
    export_s = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export {name} failed:\n{output[-3000:]}")
    report = json.loads((out / "parity_report.json").read_text())["artifacts"]
    info = {"flags": flags, "export_s": round(export_s, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "gate": {k: {m: v.get(m) for m in ("passed", "image_cos", "image_rel", "logits_rel", "top1_agreement")}
                     for k, v in report.items()}}
    record.write_text(json.dumps(info, indent=2))
    return out, info


def artifact(bundle: Path, fmt: str) -> tuple[dict, list[Path]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == fmt)
    return art, [bundle / f for f in art["files"]]


def question_of(tokenizer, n: int) -> str:
    """A question of whole words that the bundle's tokenizer splits into exactly n tokens."""
    words = ("what color is the shape in the image and is there a circle or a rectangle or a triangle near the top "
             "left corner of the picture next to the other shapes on a white background").split()
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = ""
    for w in words * 8:  # take each next word that still fits
        if count(f"{text} {w}?".strip()) <= n:
            text = f"{text} {w}".strip()
        if count(text + "?") == n:
            return text + "?"
    raise SystemExit(f"could not build a {n}-token question from whole words")


# ---- the run ---------------------------------------------------------------------------------------
def busy_fraction(seconds: float = 1.0) -> float:
    """The share of this machine's CPU time that was busy over the next `seconds` (this process sleeps)."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_until_idle(log, limit: float = 0.15, timeout_s: float = 300) -> float:
    """Start a worker only on a quiet machine (the lock keeps benchmarks apart, not every test run): wait
    while other processes keep more than `limit` of the CPU busy, at most timeout_s. Returns the last reading."""
    t0, busy = time.monotonic(), busy_fraction()
    while busy > limit and time.monotonic() - t0 < timeout_s:
        busy = busy_fraction()
    if busy > limit:
        log(f"the machine is still {100 * busy:.0f} % busy after {timeout_s:.0f} s: measuring anyway")
    return busy


def worker_cmd(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{r.stderr.strip()[-1500:]}\n(the worker exited with {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict[str, dict]], sizes: dict[str, float]) -> list[dict]:
    llama = [p for p in rounds[0] if PATHS[p][1] == "llama.cpp"]
    rows = []
    for path in rounds[0]:
        got = [r[path] for r in rounds]
        row = {"path": path, "label": PATHS[path][0], "size_mib": sizes[path], "size_gib": round(sizes[path] / 1024, 3)}
        for k in got[0]:
            row[k] = round(statistics.median(g[k] for g in got), 4)
        for k in (TIMES + RATES) if llama else ():  # per round against the faster llama.cpp path of that round
            best = [(min if k in TIMES else max)(r[p][k] for p in llama) for r in rounds]
            row[f"{k}_x_llamacpp"] = round(statistics.median(g[k] / b for g, b in zip(got, best)), 3)
        for k in ("ttft_warm_s", "ttft_tokens_cached_s"):
            if k in got[0]:
                row[k.removesuffix("_s") + "_x_cold"] = round(statistics.median(g[k] / g["ttft_s"] for g in got), 3)
        rows.append(row)
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Issue 12's goals for the android default, as measured (not asserted)."""
    a = next(r for r in rows if r["path"] == "pte")
    return [{"goal": g, "measured": a[k], "target": t, "met": bool(ok(a[k], t))} for g, k, t, ok in (
        ("image encode × llama.cpp mtmd", "image_encode_s_x_llamacpp", 0.4, float.__le__),
        ("TTFT × llama.cpp", "ttft_s_x_llamacpp", 0.5, float.__le__),
        ("warm TTFT × cold (follow-up: image tokens cached, prompt prefix kept)", "ttft_warm_x_cold", 0.15,
         float.__le__),
        ("decode × llama.cpp", "decode_tok_s_x_llamacpp", 0.95, float.__ge__),
        ("bundle size (GiB)", "size_gib", 1.1, float.__le__))]


COLUMNS = (("label", "path"), ("size_mib", "MiB"), ("load_s", "load s"), ("image_encode_s", "encode s"),
           ("prefill_s", "prefill s"), ("ttft_s", "TTFT s"), ("ttft_warm_s", "warm TTFT s"),
           ("decode_tok_s", "decode tok/s"), ("peak_rss_mb", "peak RSS MiB"), ("base_rss_mb", "RSS before load"),
           ("image_encode_s_x_llamacpp", "encode ×"), ("ttft_s_x_llamacpp", "TTFT ×"),
           ("decode_tok_s_x_llamacpp", "decode ×"), ("ttft_warm_x_cold", "warm/cold"),
           ("ttft_tokens_cached_s", "TTFT, tokens cached only s"), ("ttft_tokens_cached_x_cold", "tokens-only/cold"))


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    fmt = lambda v: "–" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))  # noqa: E731
    return head + "\n" + "\n".join("| " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows)


def chart(rows: list[dict]) -> bytes:
    import io

    from matplotlib.figure import Figure

    panels = (("image_encode_s", "image encode (s)"), ("ttft_s", "time to first token (s)"),
              ("ttft_warm_s", "follow-up TTFT (s)"), ("decode_tok_s", "decode tokens/s"))
    fig = Figure(figsize=(16, 1.2 + 0.45 * len(rows)), dpi=100)
    for i, (k, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = [r.get(k) or 0 for r in rows]
        ax.barh(range(len(rows)), vals, color=["C1" if PATHS[r["path"]][1] == "llama.cpp" else "C0" for r in rows])
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows] if i == 0 else [""] * len(rows), fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.3g}" if v else " –", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mobilevlm-v2-1.7b")
    ap.add_argument("--work", default="runs/ttft/work", help="cache of the checkpoint and the bundles (GiBs at 1.7B)")
    ap.add_argument("--out", default="runs/ttft", help="ttft.json, ttft.md, ttft.png")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per ask (EOS ignored)")
    ap.add_argument("--max-seq-len", type=int, default=512, help="the exports' KV cache / context")
    ap.add_argument("--flash", choices=list(FLASH), default="auto", help="llama.cpp's flash attention (its default: auto)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps((run_llama if spec["kind"] == "llama.cpp" else run_emulator)(spec)))
        return
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if unknown := [p for p in paths if p not in PATHS]:
        ap.error(f"--paths: unknown {unknown} (known: {', '.join(PATHS)})")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    ckpt = make_checkpoint(a.preset, work, log)
    needed = sorted({PATHS[p][2] for p in paths if PATHS[p][1] == "emulator"}
                    | {b for p in paths if PATHS[p][1] == "llama.cpp" for b, _ in PATHS[p][2:4]})
    bundles = {name: export_bundle(ckpt, name, work, a.max_seq_len, log) for name in needed}

    from alignkd.model.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    question = question_of(tok, a.question_tokens)
    android = bundles.get("android") or bundles[needed[0]]
    manifest = json.loads((android[0] / "manifest.json").read_text())
    template = json.loads((android[0] / manifest["template"]).read_text())
    image_size, max_seq_len = manifest["model"]["image_size"], manifest["model"]["max_seq_len"]
    image, other = write_images(image_size, work)
    specs, sizes = {}, {}
    for p in paths:
        kind = PATHS[p][1]
        if kind == "emulator":
            _, _, b, fmt = PATHS[p]
            art, files = artifact(bundles[b][0], fmt)
            specs[p] = {"kind": kind, "bundle": str(bundles[b][0]), "format": fmt, "question": question,
                        "decode": a.decode, "threads": a.threads, "image": str(image), "other_image": str(other)}
            sizes[p] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        else:
            (lb, lp), (mb, mp), extra_bufts = PATHS[p][2:]
            lm = next(f for f in artifact(bundles[lb][0], "gguf")[1] if f.name.startswith(lp))
            mm = next(f for f in artifact(bundles[mb][0], "gguf")[1] if f.name.startswith(mp))
            specs[p] = {"kind": kind, "lm": str(lm), "mmproj": str(mm), "decode": a.decode, "threads": a.threads,
                        "n_ctx": max_seq_len, "image": str(image), "other_image": str(other),
                        "prompt": template["prompt_format"].replace("{question}", question),
                        "extra_bufts": extra_bufts, "flash": a.flash}
            sizes[p] = round((lm.stat().st_size + mm.stat().st_size) / 2**20, 1)
    log(f"question ({a.question_tokens} tokens): {question!r}")
    rounds, failed = [], {}
    for r in range(a.rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]  # no path always first (or last) in a round
        got = {}
        for p in order:
            busy = wait_until_idle(log)
            try:
                got[p] = {**worker_cmd(specs[p]), "busy_before": round(busy, 3)}
            except RuntimeError as e:
                if PATHS[p][1] != "llama.cpp":
                    raise
                failed[p] = str(e)[-500:]  # e.g. a crash with extra buffer types: left out of every round
                log(f"{p} failed, left out: {failed[p]}")
        paths = [p for p in paths if p not in failed]
        rounds = [{p: rd[p] for p in paths} for rd in rounds] + [{p: got[p] for p in paths}]
        log(f"round {r + 1}/{a.rounds}: " + "; ".join(f"{p}: encode {got[p]['image_encode_s']:.2f} s, TTFT "
                                                    f"{got[p]['ttft_s']:.2f} s, decode {got[p]['decode_tok_s']:.1f}/s"
                                                    for p in paths))
    rows = summarize(rounds, sizes)
    result = {"preset": a.preset, "threads": a.threads, "question": question, "question_tokens": a.question_tokens,
              "decode_tokens": a.decode, "image": f"easy-vqa test image 0, bicubic to {image_size}×{image_size}",
              "rounds": a.rounds, "llama_cpp_flash_attn": a.flash, "exports": {k: v[1] for k, v in bundles.items()},
              "rows": rows, "failed_paths": failed, "goals": goals(rows) if "pte" in paths and any(PATHS[p][1] == "llama.cpp" for p in paths) else None,
              "per_round": rounds, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    from alignkd.fileio import atomic_write

    md = table(rows) + "\n"
    atomic_write(out / "ttft.png", chart(rows))  # the chart first: a report never lacks it
    atomic_write(out / "ttft.json", json.dumps(result, indent=2))
    atomic_write(out / "ttft.md", md)
    log("\n" + md)
    for g in result["goals"] or []:
        log(f"goal {g['goal']}: {g['measured']} (target {g['target']}): {'met' if g['met'] else 'NOT met'}")
    log(f"wrote {out / 'ttft.json'}, {out / 'ttft.md'}, {out / 'ttft.png'}")


if __name__ == "__main__":
    main()
