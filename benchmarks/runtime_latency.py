"""Decode and prefill speed of the student's LM through each export path, as ratios to llama.cpp.

    python benchmarks/runtime_latency.py                          # mobilevlm-v2-1.7b shape, random weights
    python benchmarks/runtime_latency.py --preset tiny-student    # smoke run
    python benchmarks/runtime_latency.py --formats gguf,onnx      # skip the 8-minute ExecuTorch export
    python benchmarks/runtime_latency.py --formats gguf,onnx:32,onnx:64,onnx:128   # ONNX int4 block sizes

Measured in one run, same thread count for every runtime: ExecuTorch 8da4w (4-bit embeddings), ONNX int4
(MatMulNBits, accuracy_level 4), each at its target's default group size unless `FORMAT:GROUP` names one,
GGUF Q4_0 through our runtime (embeddings fed to llama.cpp's C API) and llama.cpp itself (token ids,
llama-cpp-python). Each path runs in its own process,
timed in interleaved rounds; the reference of each round is the faster llama.cpp path in it. Also the
memory-bandwidth bound: bytes of weights read per decoded token over a measured one-thread read bandwidth.
Text-only prompt (the LM is what differs between paths; image encode and time to first token at the full
shape: `ttft.py`).
Prints a table and writes JSON. Weights are random: speed only, parity is the exporter's job.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import torch

from alignkd.export.base import ExportOptions, get_target, option_names

from alignkd.model import MobileVLM, get_preset
from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

QUANT = {"pte": "8da4w", "onnx": "int4", "gguf": "q4_0"}


def synthetic_tokenizer(vocab_size: int, out: Path):
    """The tiny SentencePiece model padded with dummy pieces to `vocab_size` (the GGUF vocabulary must
    match the embedding table; the benchmark feeds fixed ids, so the pieces' text does not matter)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    src = tiny_tokenizer_dir()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    for i in range(len(proto.pieces), vocab_size):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"▁dummy{i}", -1000.0 - i, 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_text((src / name).read_text())
    return load_tokenizer(out)


def read_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """One thread reading memory: sum of a 1 GiB int64 array, best of 3."""
    a = np.ones(n_bytes // 8, dtype=np.int64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def round_runtime(rt, prompt: np.ndarray, n_decode: int) -> tuple[float, float]:
    """One round through the Runtime interface: (prefill tokens/s, decode tokens/s)."""
    emb = rt.embed(prompt)
    t0 = time.perf_counter()
    logits = rt.decode(emb, 0)
    pre = len(prompt) / (time.perf_counter() - t0)
    pos = len(prompt)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(logits))
        logits = rt.decode(rt.embed(np.asarray([tok], dtype=np.int64)), pos)
        pos += 1
    return pre, n_decode / (time.perf_counter() - t0)


class LlamaCppTokens:
    """llama.cpp on token ids through llama-cpp-python's Llama.eval: the plain llama.cpp path."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                         verbose=False)

    def round(self, prompt: np.ndarray, n_decode: int) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt.tolist())
        pre = len(prompt) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([tok])
        return pre, n_decode / (time.perf_counter() - t0)


def _worker(kind: str, where: Path, opts: ExportOptions, prompt: np.ndarray, n_decode: int, n_ctx: int, conn) -> None:
    """One path in its own process: load, say "ready", then time a round per "round" message."""
    try:
        if kind == "llama-tokens":
            ll = LlamaCppTokens(where, opts.threads, n_ctx)
            run = lambda: ll.round(prompt, n_decode)  # noqa: E731
        else:
            rt = get_target(kind).load(where, opts)
            run = lambda: round_runtime(rt, prompt, n_decode)  # noqa: E731
    except Exception as e:  # the parent reports it
        conn.send(f"error: {e}")
        return
    conn.send("ready")
    while conn.recv() == "round":
        conn.send(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mobilevlm-v2-1.7b")
    ap.add_argument("--formats", default="gguf,onnx,pte",
                    help="comma-separated FORMAT or FORMAT:GROUP (4-bit group size; GGUF Q4_0 is always 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--layers", type=int, default=None, help="cut the LM to this many layers (quick experiments)")
    ap.add_argument("--full-vision", action="store_true", help="export the preset's real vision tower too")
    ap.add_argument("--json", default="benchmarks/runtime_latency.json")
    a = ap.parse_args()
    formats = [(f.partition(":")[0], int(f.partition(":")[2]) if f.partition(":")[2] else None)
               for f in a.formats.split(",")]  # (format, group size or None = the target's default)
    if any(f not in QUANT for f, _ in formats):  # repeats are caught by their labels below
        ap.error(f"--formats: FORMAT[:GROUP] entries, FORMAT one of {', '.join(QUANT)}")
    n_ctx = max(a.prompt + a.decode + 8, 256)  # exporters want room for the 144 image tokens
    work = Path(tempfile.mkdtemp(prefix="rtlat-"))
    cfg = get_preset(a.preset)
    if a.layers:  # every width kept, fewer layers: quick experiments (per-layer cost scales linearly)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=a.layers))
    if not a.full_vision:  # the LM is what is timed: a tiny tower (same 24×24 grid) saves minutes of export
        cfg = cfg.replace(vision=get_preset("tiny-student").vision, vision_tower="vision_tower")
    torch.manual_seed(0)
    model = MobileVLM(cfg).eval()
    tok = synthetic_tokenizer(model.config.text.vocab_size, work / "tok")
    prompt = np.random.default_rng(0).integers(3, model.config.text.vocab_size, a.prompt).astype(np.int64)
    n_lm_params = sum(p.numel() for p in model.lm.model.layers.parameters()) + model.lm.lm_head.weight.numel()
    artifacts = {}
    for fmt, group in formats:  # export everything first, then free the eager model before timing
        target = get_target(fmt)
        if group is not None and "group_size" not in option_names(target):
            ap.error(f"--formats {fmt}:{group}: {fmt} has no group size")
        # the targets' defaults otherwise (ExecuTorch: 4-bit embedding table beside 8da4w)
        opts = ExportOptions(quant=QUANT[fmt], max_seq_len=n_ctx, threads=a.threads,
                             extra={} if group is None else {"group_size": group})
        label = f"{fmt} {QUANT[fmt]}" + ("" if fmt == "gguf" else f" g{target.options(opts).group_size}")
        if label in artifacts:
            ap.error(f"--formats names {label} twice")
        d = work / label.replace(" ", "_")
        d.mkdir()
        t0 = time.perf_counter()
        files = target.export(model, tok, d, opts)
        artifacts[label] = (fmt, d, opts, files, time.perf_counter() - t0)
        print(f"exported {label} in {artifacts[label][4]:.0f} s", flush=True)
    del model
    gc.collect()
    # Each path runs in its own process (runtimes' thread pools must not share the 2 cores while idle: in
    # one process llama.cpp measured ~20 % slower beside onnxruntime and ExecuTorch), and the rounds
    # interleave the processes: this machine's speed drifts by 10-20 % over minutes, so timing one path
    # after another would fold the drift into the ratios. Each ratio is the median over rounds of
    # (path / llama.cpp in the same round).
    jobs: dict[str, tuple] = {}
    rows = []
    for label, (fmt, d, opts, files, export_s) in artifacts.items():
        name = label + (" (llama.cpp C API, embeddings in)" if fmt == "gguf" else "")
        jobs[name] = (fmt, d, opts)
        rows.append({"path": name, "size_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
                     "export_s": round(export_s, 1)})
    if "gguf q4_0" in artifacts:
        _, d, opts, files, _ = artifacts["gguf q4_0"]
        lm_file = next(f for f in files if f.name.startswith("model-"))
        jobs["llama.cpp q4_0 (llama-cpp-python, token ids)"] = ("llama-tokens", lm_file, opts)
        rows.append({"path": "llama.cpp q4_0 (llama-cpp-python, token ids)",
                     "size_mib": round(lm_file.stat().st_size / 2**20, 1), "export_s": None})
    ctx = mp.get_context("spawn")
    runners = {}
    for name, (kind, where, opts) in jobs.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(kind, where, opts, prompt, a.decode, n_ctx, child), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"{name}: the worker failed to load its runtime")
        runners[name] = (proc, parent)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for r in range(a.repeats):
        for name, (_, conn) in runners.items():
            conn.send("round")
            rounds[name].append(conn.recv())
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(f"{n.split(' (')[0]} {rounds[n][-1][1]:.1f}" for n in runners),
              flush=True)
    for proc, conn in runners.values():
        conn.send("stop")
        proc.join(timeout=30)
    llama = [n for n in runners if n.startswith(("gguf", "llama.cpp"))]
    for row in rows:
        got = rounds[row["path"]]
        row["prefill_tok_s"] = round(statistics.median(g[0] for g in got), 1)
        row["decode_tok_s"] = round(statistics.median(g[1] for g in got), 2)
        row["decode_tok_s_best"] = round(max(g[1] for g in got), 2)
        if llama:  # the reference of each round: llama.cpp's faster path in that round
            for i, key in ((1, "decode_x_llamacpp"), (0, "prefill_x_llamacpp")):
                ref = [max(rounds[n][k][i] for n in llama) for k in range(a.repeats)]
                row[key] = round(statistics.median(g[i] / f for g, f in zip(got, ref)), 2)
    bw = read_bandwidth_gbs()
    q4_bytes = n_lm_params * (4.5 / 8)  # Q4_0: 18 bytes per 32 weights
    bound = bw * 1e9 / q4_bytes
    print(f"\npreset {a.preset}{f' cut to {a.layers} layers' if a.layers else ''}, {a.threads} threads, prompt {a.prompt}, decode {a.decode}; "
          f"read bandwidth {bw:.1f} GB/s → 4.5-bit weights bound {bound:.1f} tokens/s")
    print(f"{'path':<48}{'MiB':>8}{'export s':>10}{'prefill/s':>11}{'decode/s':>11}{'best':>11}{'decode x llama.cpp':>20}")
    for r in rows:
        print(f"{r['path']:<48}{r['size_mib']:>8}{(r['export_s'] or 0):>10.0f}{r['prefill_tok_s']:>11.1f}"
              f"{r['decode_tok_s']:>11.2f}{r['decode_tok_s_best']:>11.2f}{r.get('decode_x_llamacpp', 0):>20.2f}")
    Path(a.json).write_text(json.dumps({"preset": a.preset, "layers": a.layers, "threads": a.threads, "prompt": a.prompt, "decode": a.decode,
                                        "read_bandwidth_gbs": round(bw, 2), "bound_tok_s": round(bound, 1),
                                        "rows": rows}, indent=2))
    print(f"wrote {a.json}")
    shutil.rmtree(work, ignore_errors=True)  # the exports: gigabytes at the full shape


if __name__ == "__main__":
    main()
