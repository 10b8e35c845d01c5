"""The parity gate: an artifact in its desktop runtime against the eager model, on fixed inputs.

Per graph: image tokens (max-abs, cosine), token embeddings (max-abs), prompt logits (max-abs relative to
the logits' range, cosine); then greedy decoding: the artifact's own greedy tokens vs the reference's,
and teacher-forced top-1 agreement along the reference's tokens. Each target states thresholds per
quantization as data; a failed check fails the export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import Runtime
from .runtime import forced_logits, generate


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


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


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
    failures = []
    if report.get("image_cos", 1.0) < thresholds.image_cos:
        failures.append(f"image tokens cosine {report['image_cos']:.6f} < {thresholds.image_cos}")
    if report["logits_rel"] > thresholds.logits_rel:
        failures.append(f"prompt logits relative error {report['logits_rel']:.2e} > {thresholds.logits_rel:.0e}")
    if agree < thresholds.top1:
        failures.append(f"top-1 agreement {agree:.3f} < {thresholds.top1}")
    if thresholds.exact_tokens and not report["greedy_identical"]:
        failures.append("greedy tokens differ from the reference")
    report["failures"] = failures
    report["passed"] = not failures
    return report
