"""Where the image-encode time of an ExecuTorch bundle goes: an ETDump of its `vision_encoder` method.

    python benchmarks/encoder_profile.py BUNDLE [--runs 5] [--threads 2] [--json runs/ttft/encoder_profile.json]

Loads the bundle's `.pte` with ETDump on (ExecuTorch's devtools: the XNNPACK delegate records each of its
operators, ExecuTorch each kernel it runs outside the delegate), runs `vision_encoder` once to warm up and
then --runs times on one image, and reports the median time per operator type per run, rolled up into what
a ViT spends time on (ROLLUP): the linears, attention's matmuls and softmax, layer norms, GELUs, the
convolutions, dynamic activation quantization, elementwise ops, layout changes. The method's own total is
printed beside the sum of the parts (the rest is the delegate's call overhead). Profiling adds a timer per
operator: the total is a little above an unprofiled encode (ttft.py measures that).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

# category → substrings of the operator names that belong to it (XNNPACK's names, ExecuTorch's kernel names);
# the first match wins, so the order matters (e.g. "Convert" before anything with "conv").
ROLLUP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("activation quantization (int8, dynamic)", ("Convert",)),
    ("linears (q, k, v, out, fc1, fc2, projector MLP)", ("Fully Connected",)),
    ("attention matmuls (Q·Kᵀ, P·V)", ("Batch Matrix Multiply", "bmm", "matmul")),
    ("attention softmax", ("Softmax", "softmax")),
    # what torch's exported SDPA adds around the softmax for fully masked rows (where / eq / any / logical_not /
    # full_like on the (heads, T, T) scores), run by ExecuTorch's portable kernels outside XNNPACK
    ("attention masking guards (portable kernels)", ("where", "eq.", "logical_not", "any.", "full_like")),
    ("layer norms", ("layer_norm", "Layer Norm")),
    ("GELU / quick-GELU", ("GELU", "Sigmoid", "sigmoid", "gelu")),
    ("convolutions (patch embedding, PEG)", ("Convolution", "convolution")),
    ("pooling (LDPv2)", ("Pooling", "avg_pool")),
    ("elementwise (residual adds, scaling, products)", ("Add", "Multiply", "Subtract", "Divide", "add", "mul", "sub",
                                                        "div")),
    ("layout (transpose, copy, reshape, slice, concat)", ("Transpose", "Copy", "Reshape", "Slice", "Concatenate",
                                                          "copy", "permute", "view", "slice", "cat", "expand",
                                                          "clone")),
)
WRAPPERS = ("DELEGATE_CALL", "OPERATOR_CALL", "Method::", "Program::")


def category(op: str) -> str:
    return next((name for name, keys in ROLLUP if any(k in op for k in keys)), "other")


def profile(bundle: Path, runs: int, threads: int) -> dict:
    import numpy as np
    import torch

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (kernels the program's decoder names)
    import executorch.kernels.quantized  # noqa: F401
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    from alignkd.data.image import ImageProcessingConfig, preprocess
    from alignkd.data import easyvqa
    from PIL import Image

    manifest = json.loads((bundle / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == "pte")
    pte = bundle / next(f for f in art["files"] if f.endswith(".pte"))
    cfg = ImageProcessingConfig.from_dict(json.loads((bundle / manifest["preprocessing"]).read_text()))
    img = Image.open(easyvqa.first_test_image()).convert("RGB").resize((cfg.image_size,) * 2, Image.BICUBIC)
    px = preprocess(img, cfg)[None].contiguous()  # (1, 3, S, S)
    _unsafe_reset_threadpool(threads)
    module = _load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    for _ in range(runs + 1):
        out = module.run_method("vision_encoder", (px,))
    assert isinstance(out[0], torch.Tensor) and np.isfinite(out[0].numpy()).all()
    with tempfile.TemporaryDirectory() as d:
        etdump = Path(d) / "vision.etdp"
        module.write_etdump_result_to_file(str(etdump))
        inspector = Inspector(etdump_path=str(etdump))
    per_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    total = delegate = delegated = 0.0
    for block in inspector.event_blocks:
        for e in block.events:
            if e.perf_data is None or len(e.perf_data.raw) < runs + 1:
                continue
            ms = statistics.median(e.perf_data.raw[1:])  # the warm-up run left out
            if e.name == "Method::execute":
                total += ms
            elif e.name == "DELEGATE_CALL":
                delegate += ms
            elif not e.name.startswith(WRAPPERS):
                op = re.sub(r"\s*#\d+$", "", e.name).removeprefix("native_call_")
                per_op[op] += ms
                count[op] += 1
                delegated += ms if e.is_delegated_op else 0.0
    rollup: dict[str, float] = defaultdict(float)
    for op, ms in per_op.items():
        rollup[category(op)] += ms
    parts = sum(per_op.values())
    return {
        "bundle": str(bundle), "artifact": f"pte/{art['quant']}", "threads": threads, "runs": runs,
        "method_total_ms": round(total, 2), "sum_of_ops_ms": round(parts, 2),
        "delegate_overhead_ms": round(delegate - delegated, 2),
        "rollup": sorted(({"category": k, "ms": round(v, 2), "share": round(v / parts, 4)} for k, v in rollup.items()),
                         key=lambda r: -r["ms"]),
        "operators": sorted(({"op": k, "ms": round(v, 2), "count": count[k], "category": category(k)}
                             for k, v in per_op.items()), key=lambda r: -r["ms"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("runs/ttft/encoder_profile.json"))
    a = ap.parse_args()
    r = profile(a.bundle, a.runs, a.threads)
    print(f"{r['artifact']} vision_encoder, {a.threads} threads, median of {a.runs} runs: method {r['method_total_ms']:.1f} ms, "
          f"operators {r['sum_of_ops_ms']:.1f} ms, delegate call overhead {r['delegate_overhead_ms']:.1f} ms")
    print("| where | ms | share |\n|---|---|---|")
    for row in r["rollup"]:
        print(f"| {row['category']} | {row['ms']:.1f} | {100 * row['share']:.1f} % |")
    print("\n| operator | calls | ms |\n|---|---|---|")
    for row in r["operators"][:15]:
        print(f"| {row['op']} | {row['count']} | {row['ms']:.1f} |")
    from alignkd.fileio import atomic_write

    atomic_write(a.json, json.dumps(r, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
