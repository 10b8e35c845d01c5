"""The shared decoding loop over the eager runtime equals MobileVLM.generate, and the parity gate can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkd.errors import DataError
from alignkd.export.base import EagerRuntime
from alignkd.export.parity import Thresholds, check_parity
from alignkd.export.runtime import generate

PROMPT = [1, 17, -200, 23, 9, 40]


def test_eager_runtime_loop_equals_model_generate(tiny_student, pixels):
    px = pixels[:1].numpy()
    got = generate(EagerRuntime(tiny_student), PROMPT, px, max_new_tokens=10, eos_id=-1)
    want = tiny_student.generate(torch.tensor([PROMPT]), pixel_values=pixels[:1], max_new_tokens=10, eos_token_id=-1)[0]
    assert got.tokens == want
    assert got.prompt_len == len(PROMPT) + 143
    logits = tiny_student(torch.tensor([PROMPT]), pixel_values=pixels[:1]).logits[0, -1].detach().numpy()
    np.testing.assert_allclose(got.prompt_logits, logits, atol=1e-5)


def test_prompt_checks_happen_before_compute(tiny_student, pixels):
    rt = EagerRuntime(tiny_student)
    with pytest.raises(DataError, match="exceeds max_seq_len 100"):
        generate(rt, PROMPT, pixels[:1].numpy(), 8, eos_id=2, max_seq_len=100)
    with pytest.raises(DataError, match="no image was given"):
        generate(rt, PROMPT, None, 8, eos_id=2)
    with pytest.raises(DataError, match="has no <image> token"):
        generate(rt, [1, 5, 6], pixels[:1].numpy(), 8, eos_id=2)


def test_parity_gate_passes_on_itself_and_fails_on_a_perturbed_model(tiny_student, pixels):
    import copy

    px = pixels[:1].numpy()
    same = check_parity(EagerRuntime(tiny_student), EagerRuntime(tiny_student), PROMPT, px, Thresholds())
    assert same["passed"] and same["logits_max_abs"] == 0.0 and same["image_cos"] > 0.99999
    other = copy.deepcopy(tiny_student)
    with torch.no_grad():
        other.lm.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    diff = check_parity(EagerRuntime(other), EagerRuntime(tiny_student), PROMPT, px, Thresholds())
    assert not diff["passed"] and any("relative error" in f for f in diff["failures"])


def test_no_eos_id_decodes_every_requested_token():
    """Speed runs (bench) must time decode steps even when the model answers EOS at once."""
    from fake_runtime import FakeRuntime

    stops = generate(FakeRuntime(512, 8, eos_id=2, eos_after=1), [1, 5, 6], None, 12, eos_id=2)
    assert stops.tokens == [] and stops.timings["decode_steps"] == 0
    rt = FakeRuntime(512, 8, eos_id=2, eos_after=1)
    full = generate(rt, [1, 5, 6], None, 12, eos_id=None)
    assert full.tokens == [2] * 12 and full.timings["decode_steps"] == 11
    assert [c for c in rt.calls if c[0] == "decode"][-1] == ["decode", 13, 1]  # steps at positions 3..13
