"""The GGUF `ExportTarget`: files, options, parity thresholds, reference, and the divergence report.

Files, for LM quant q and mmproj quant v: `model-<q>.gguf` (LLaMA, the student's SentencePiece vocabulary)
and `mmproj-<v>.gguf` (arch `clip`, projector `ldpv2`); <q>, <v> are llama.cpp's spellings (f32, f16, q8_0,
q4_0, q4_k_m). ExportOptions.quant also takes fp32 / fp16. `q4_k_m` re-quantizes an F32 LM file with
llama.cpp's own quantizer. Runtime: `GgufRuntime` (llama-cpp-python). The target's own option is
`vision_quant` (`GgufOptions`).

The parity gate compares against `reference()`: the eager model with llama.cpp's semantics (the upstream
class-token fault, ggml's table activations and F16 convs; see `reference.py`), carrying the LM weights as
the file stores them — so the logits measure ggml's arithmetic — and the fp32 vision weights (as an mmproj
holds them: its two conv kernels are always F16) — so the image tokens are gated against the fp32 encoder,
as every target's are. `faithful_divergence` reports what the fault costs against the faithful model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkd.errors import DataError
from alignkd.model.mobilevlm import MobileVLM

from ..base import EagerRuntime, ExportOptions, Runtime, TargetBase
from ..parity import REPORT_ONLY, Thresholds, check_parity, combine, lm_gate
from .reference import LlamaCppReferenceRuntime, llamacpp_model
from .runtime import GgufRuntime
from .tensors import QUANTS, VISION_QUANTS, dequantized, iter_lm_tensors, lm_tensors, mmproj_tensors, read_gguf_tensors, \
    resolve_quant
from .writer import llama_quantize, placeholder_vocab, sentencepiece_vocab, tokenizer_model_path, write_lm, write_mmproj

# Parity of the LM against `reference()` (llama.cpp's semantics), so what remains is ggml's arithmetic; what each
# bound was set against: docs/parity_gates.md. The image tokens are the mmproj's part (VISION_THRESHOLDS, `combine`).
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": lm_gate(1e-4),  # the reference emulates ggml's FP16-table GELUs: only summation order differs
    "fp16": lm_gate(1e-2, top1=0.9, exact_tokens=False),  # activations rounded to F16 before F16 matmuls
    # activations quantized to Q8_0 / Q8_K; top-1 flips on a random LM's near-ties, 0.75 catches a broken file
    "q8_0": lm_gate(3e-2, top1=0.75, exact_tokens=False),
    "q4_0": lm_gate(3e-2, top1=0.75, exact_tokens=False),
    "q4_k_m": lm_gate(3e-2, top1=0.75, exact_tokens=False),
}
# The vision gate: image tokens against the fp32 encoder (llama.cpp's semantics) and what they add to the logits.
VISION_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(image_cos=0.99999, image_rel=1e-3, logits_rel=0.0),
    "fp16": Thresholds(image_cos=0.9999, image_rel=5e-3, logits_rel=1e-3, top1=0.9, exact_tokens=False),
    "q8_0": Thresholds(image_cos=0.999, image_rel=4e-2, logits_rel=1e-2, top1=0.75, exact_tokens=False),
}


@dataclass(frozen=True)
class GgufOptions:
    """The GGUF target's own options (`ExportOptions.extra`)."""

    vision_quant: str = "auto"
    """The mmproj's quant: fp32 (f32), fp16 (f16) or q8_0; "auto": the float type of an fp32 / fp16 LM,
    q8_0 beside a quantized one."""

    def __post_init__(self):
        if self.vision_quant != "auto":
            resolve_quant(self.vision_quant, VISION_QUANTS, "vision_quant")

    def resolved(self, quant: str) -> GgufOptions:
        v = QUANTS[quant].vision if self.vision_quant == "auto" else resolve_quant(self.vision_quant, VISION_QUANTS)
        return dataclasses.replace(self, vision_quant=v)


def artifact_files(out_dir: Path, quant: str) -> tuple[Path, Path]:
    """The LM file of `quant` and the one mmproj beside it."""
    lm_file = Path(out_dir) / f"model-{QUANTS[resolve_quant(quant)].tag}.gguf"
    mmprojs = sorted(Path(out_dir).glob("mmproj-*.gguf"))
    if not lm_file.is_file() or len(mmprojs) != 1:
        raise DataError(f"{lm_file} and one mmproj-*.gguf beside it not found: export with quant {quant!r} first")
    return lm_file, mmprojs[0]


def faithful_divergence(model: MobileVLM, runtime: Runtime, prompt_ids: list[int], pixels: np.ndarray,
                        n_tokens: int = 16) -> dict:
    """What llama.cpp's class-token fault (and its arithmetic) costs against the faithful eager model:
    image-token cosine / max-abs, prompt-logit error, greedy tokens of both and teacher-forced top-1."""
    report = check_parity(runtime, EagerRuntime(model), prompt_ids, pixels, REPORT_ONLY, n_tokens)
    for k in ("thresholds", "failures", "passed"):
        report.pop(k)
    return report


class GgufTarget(TargetBase):
    """`ExportTarget` for llama.cpp. Reads options.quant, max_seq_len (the GGUF context), threads; the Q4_0 /
    Q8_0 block is fixed by the format (32)."""

    name = "gguf"
    quants = tuple(QUANTS)
    """Also accepted: llama.cpp's spellings "f32" / "f16" (ALIASES)."""
    default_quant = "q4_0"
    Options = GgufOptions

    def options(self, options: ExportOptions) -> GgufOptions:
        return super().options(options).resolved(resolve_quant(options.quant))

    def check(self, model: MobileVLM, options: ExportOptions) -> None:
        super().check(model, dataclasses.replace(options, quant=resolve_quant(options.quant)))

    def export(self, model: MobileVLM, tokenizer, out_dir: Path, options: ExportOptions) -> list[Path]:
        self.check(model, options)
        quant = resolve_quant(options.quant)
        q, o = QUANTS[quant], self.options(options)
        vision_type, vision_file_type, vision_tag = VISION_QUANTS[o.vision_quant]
        out_dir = Path(out_dir)
        lm_file, mm_file = out_dir / f"model-{q.tag}.gguf", out_dir / f"mmproj-{vision_tag}.gguf"
        model = model.eval()
        vocab = sentencepiece_vocab(tokenizer_model_path(tokenizer), model.config.text.vocab_size)
        write_mmproj(mm_file, model, mmproj_tensors(model, o.vision_quant), int(vision_file_type))
        if q.llama_ftype is None:
            write_lm(lm_file, model, vocab, options.max_seq_len, lm_tensors(model, quant), int(q.file_type))
        else:
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                src = Path(tmp) / "model-f32.gguf"
                write_lm(src, model, vocab, options.max_seq_len, lm_tensors(model, quant), int(q.file_type))
                llama_quantize(src, lm_file, q.llama_ftype, options.threads)
        return [lm_file, mm_file]

    def load(self, out_dir: Path, options: ExportOptions) -> GgufRuntime:
        return GgufRuntime(*artifact_files(out_dir, options.quant), threads=options.threads)

    def reference(self, model: MobileVLM, options: ExportOptions) -> LlamaCppReferenceRuntime:
        """The eager model with llama.cpp's semantics, the LM weights exactly as the GGUF stores them and the
        fp32 vision weights as an F32 mmproj holds them (module docstring)."""
        quant = resolve_quant(options.quant)
        q = QUANTS[quant]
        mm = {name: dequantized(*t) for name, t in mmproj_tensors(model, "fp32").items()}
        if q.llama_ftype is None:
            lm = {name: dequantized(*t) for name, t in iter_lm_tensors(model, quant)}
        else:  # the K-quant mix is llama.cpp's: quantize a temporary file and read it back
            with tempfile.TemporaryDirectory() as tmp:
                src, dst = Path(tmp) / "f32.gguf", Path(tmp) / "q.gguf"
                t = model.config.text
                write_lm(src, model, placeholder_vocab(t.vocab_size), t.max_position_embeddings, lm_tensors(model, quant),
                         int(q.file_type))
                llama_quantize(src, dst, q.llama_ftype, options.threads)
                lm = read_gguf_tensors(dst)
        return LlamaCppReferenceRuntime(llamacpp_model(model, lm, mm))

    def thresholds(self, options: ExportOptions) -> Thresholds:
        return combine(THRESHOLDS[resolve_quant(options.quant)], VISION_THRESHOLDS[self.options(options).vision_quant])

    def extra_report(self, model: MobileVLM, artifact: Runtime, prompt_ids: list[int], pixels: np.ndarray) -> dict:
        return {"faithful_divergence": faithful_divergence(model, artifact, prompt_ids, pixels),
                "reference": "eager model with llama.cpp's CLIP semantics (llama.cpp issue #25814), LM weights as stored"}
