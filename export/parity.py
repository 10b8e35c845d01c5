"""The parity gate: an artifact in its desktop runtime against the eager model, on fixed inputs.

Per graph: image tokens (max-abs, cosine, relative error), token embeddings (max-abs), prompt logits
(max-abs relative to the logits' range, cosine); then greedy decoding: the artifact's own greedy tokens vs
the reference's, and teacher-forced top-1 agreement along the reference's tokens. Each target states its
thresholds as data (per LM quant, per vision quant, ...) and combines them for an export (`combine`); a
failed check fails the export. `gate` runs the whole check for one exported artifact.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignkd.data import easyvqa
from alignkd.data.image import image_config, load_image, preprocess
from alignkd.data.templates import build_prompt
from alignkd.data.tokenize import tokenize_prompt

from .base import ExportOptions, ExportTarget, Runtime
from .runtime import forced_logits, generate

if TYPE_CHECKING:
    from PIL import Image

PARITY_QUESTION = "What shape is in the image?"


@dataclass(frozen=True)
class Thresholds:
    image_cos: float = 0.9999
    """Minimum cosine of the image tokens."""
    logits_rel: float = 1e-4
    """Maximum |Δlogits| / (max − min of the reference logits), prompt step."""
    top1: float = 1.0
    """Minimum teacher-forced top-1 agreement over the decoded steps."""
    exact_tokens: bool = True
    """Whether the artifact's free-running greedy tokens must equal the reference's."""
    image_rel: float = 1e-3
    """Maximum ‖Δ‖ / ‖reference‖ of the image tokens (all N × H values)."""


# The comparison with a same-quantization reference is reported, not gated: its tolerances depend on kernel
# details (e.g. XNNPACK keeps int4 group scales in bf16).
REPORT_ONLY = Thresholds(image_cos=-1.0, logits_rel=float("inf"), top1=0.0, exact_tokens=False, image_rel=float("inf"))


def lm_gate(logits_rel: float, top1: float = 1.0, exact_tokens: bool = True) -> Thresholds:
    """A part that touches only the text path (the LM, the embedding table): its logits, top-1 and tokens. The
    image tokens are the vision encoder's part of the gate (`combine`)."""
    return Thresholds(image_cos=1.0, image_rel=0.0, logits_rel=logits_rel, top1=top1, exact_tokens=exact_tokens)


def combine(*parts: Thresholds) -> Thresholds:
    """The gate of an export with several quantized parts (LM, vision encoder, embedding table, ...).

    Logit errors of independent quantizations add up, so the relative tolerances are summed; the image
    bounds and the top-1 floor take the loosest part.
    """
    return Thresholds(
        image_cos=min(p.image_cos for p in parts),
        logits_rel=sum(p.logits_rel for p in parts),
        top1=min(p.top1 for p in parts),
        exact_tokens=all(p.exact_tokens for p in parts),
        image_rel=max(p.image_rel for p in parts),
    )


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def check_parity(artifact: Runtime, reference: Runtime, prompt_ids: list[int], pixels: np.ndarray | None,
                 thresholds: Thresholds, n_tokens: int = 16) -> dict:
    """Run both runtimes on the same inputs; return a JSON-able report with `passed` and `failures`."""
    ref = generate(reference, prompt_ids, pixels, n_tokens, eos_id=-1)
    art = generate(artifact, prompt_ids, pixels, n_tokens, eos_id=-1)
    forced = forced_logits(artifact, prompt_ids, pixels, ref.tokens)
    agree = float(np.mean([int(np.argmax(lg)) == t for lg, t in zip(forced, ref.tokens)])) if ref.tokens else 1.0
    ids = np.asarray([i for i in prompt_ids if i >= 0], dtype=np.int64)
    span = float(ref.prompt_logits.max() - ref.prompt_logits.min()) or 1.0
    report = {
        "embed_max_abs": float(np.abs(artifact.embed(ids) - reference.embed(ids)).max()),
        "logits_max_abs": float(np.abs(art.prompt_logits - ref.prompt_logits).max()),
        "logits_rel": float(np.abs(art.prompt_logits - ref.prompt_logits).max()) / span,
        "logits_cos": _cos(art.prompt_logits, ref.prompt_logits),
        "top1_agreement": agree,
        "greedy_reference": ref.tokens,
        "greedy_artifact": art.tokens,
        "greedy_identical": ref.tokens == art.tokens,
        "thresholds": asdict(thresholds),
    }
    if ref.image_embeddings is not None:
        report["image_max_abs"] = float(np.abs(art.image_embeddings - ref.image_embeddings).max())
        report["image_cos"] = _cos(art.image_embeddings, ref.image_embeddings)
        report["image_rel"] = _rel(art.image_embeddings, ref.image_embeddings)
    failures = []
    if report.get("image_cos", 1.0) < thresholds.image_cos:
        failures.append(f"image tokens cosine {report['image_cos']:.6f} < {thresholds.image_cos}")
    if report.get("image_rel", 0.0) > thresholds.image_rel:
        failures.append(f"image tokens relative error {report['image_rel']:.2e} > {thresholds.image_rel:.0e}")
    if report["logits_rel"] > thresholds.logits_rel:
        failures.append(f"prompt logits relative error {report['logits_rel']:.2e} > {thresholds.logits_rel:.0e}")
    if agree < thresholds.top1:
        failures.append(f"top-1 agreement {agree:.3f} < {thresholds.top1}")
    if thresholds.exact_tokens and not report["greedy_identical"]:
        failures.append("greedy tokens differ from the reference")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def gate(target: ExportTarget, model, out_dir: Path, options: ExportOptions, prompt_ids: list[int],
         pixels: np.ndarray) -> dict:
    """The parity gate of one exported artifact: against `target.reference` with `target.thresholds`, then
    (reported, not gated) against its same-quantization reference, plus the target's extra report. One
    runtime or reference is alive beside the artifact at a time (a 1.7B reference is several GB), and each
    is closed after use."""
    with closing(target.load(out_dir, options)) as artifact:
        with closing(target.reference(model, options)) as ref:
            report = check_parity(artifact, ref, prompt_ids, pixels, target.thresholds(options))
        same = target.quantized_reference(model, options, out_dir)
        if same is not None:
            with closing(same):
                rep = check_parity(artifact, same, prompt_ids, pixels, REPORT_ONLY)
            report["same_quant_reference"] = {k: rep[k] for k in ("logits_rel", "logits_cos", "top1_agreement",
                                                                  "greedy_identical", "image_cos", "image_rel")}
        report.update(target.extra_report(model, artifact, prompt_ids, pixels))
    return report


# ---- the fixed inputs --------------------------------------------------------------------------------
def parity_image() -> "Image.Image":
    """A fixed real image: the first easy-vqa test image (ships in the easy-vqa package)."""
    return load_image(easyvqa.first_test_image())


def parity_inputs(model, tokenizer, template: str = "v1") -> tuple[list[int], np.ndarray]:
    ids = tokenize_prompt(build_prompt(template, PARITY_QUESTION), tokenizer)
    pixels = preprocess(parity_image(), image_config(model.config))[None].numpy()  # (1, 3, S, S)
    return ids, pixels
