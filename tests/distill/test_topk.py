import numpy as np
import pytest
import torch

from alignkd.distill.losses import kd_loss
from alignkd.distill.topk import teacher_topk, topk_kd_loss
from alignkd.errors import ConfigError


def _logits(seed: int, m: int = 6, v: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, v, generator=g) * 3, torch.randn(m, v, generator=g) * 3


@pytest.mark.parametrize("tail", ["rest", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_to_the_vocabulary_is_the_full_kd(tail, temperature):
    s, t = _logits(0)
    labels = torch.zeros(1, s.shape[0], dtype=torch.long)
    full = kd_loss(s[None], t[None], labels, torch.ones_like(labels), temperature, "tokens")  # every position
    logp, ids = teacher_topk(t, k=t.shape[-1], temperature=temperature)
    cached = topk_kd_loss(s, logp, ids, temperature, tail)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_rest_bucket_is_the_kl_of_the_coarsened_distributions():
    """Independent numpy computation: buckets = the teacher's top-k tokens + one bucket for the rest."""
    s, t = _logits(1)
    k, temperature = 5, 1.5
    logp, ids = teacher_topk(t, k, temperature)
    got = topk_kd_loss(s, logp, ids, temperature, "rest")

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(t.double().numpy() / temperature), softmax(s.double().numpy() / temperature)
    kls = []
    for row in range(p.shape[0]):
        top = np.argsort(-p[row])[:k]
        pb = np.append(p[row, top], 1 - p[row, top].sum())
        qb = np.append(q[row, top], 1 - q[row, top].sum())
        kls.append((pb * np.log(pb / qb)).sum())
    assert float(got) == pytest.approx(np.mean(kls) * temperature**2, rel=1e-5)
    # coarsening cannot increase a KL (data-processing inequality), and it stays positive here
    labels = torch.zeros(1, s.shape[0], dtype=torch.long)
    full = kd_loss(s[None], t[None], labels, torch.ones_like(labels), temperature, "tokens")
    assert 0 < float(got) <= float(full)


@pytest.mark.parametrize("tail", ["rest", "renorm"])
def test_a_student_equal_to_the_teacher_has_zero_loss_and_gradients_flow(tail):
    _, t = _logits(2)
    logp, ids = teacher_topk(t, 8)
    assert float(topk_kd_loss(t.clone(), logp, ids, 1.0, tail)) == pytest.approx(0.0, abs=1e-6)
    s = torch.zeros_like(t, requires_grad=True)
    topk_kd_loss(s, logp, ids, 1.0, tail).backward()
    assert s.grad.abs().sum() > 0


def test_renorm_ignores_the_students_tail_mass_and_rest_does_not():
    _, t = _logits(3, m=1)
    logp, ids = teacher_topk(t, 4)
    s = t.clone()
    others = torch.ones(t.shape[-1], dtype=torch.bool)
    others[ids[0]] = False
    s[0, others] += 5.0  # the student moves mass onto tokens outside the teacher's top 4
    assert float(topk_kd_loss(s, logp, ids, 1.0, "renorm")) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kd_loss(s, logp, ids, 1.0, "rest")) > 0.1


def test_unknown_tail_is_a_config_error():
    s, t = _logits(4)
    logp, ids = teacher_topk(t, 4)
    with pytest.raises(ConfigError, match="tail"):
        topk_kd_loss(s, logp, ids, tail="topk")


def _batch(seed: int, b: int = 2, t: int = 7, v: int = 40):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(b, t, v, generator=g) * 3, torch.randn(b, t, v, generator=g) * 3
    labels = torch.full((b, t), -100)
    labels[0, 3:6], labels[1, 2:4] = 5, 7  # answer tokens at different places
    return s, te, labels, torch.ones(b, t, dtype=torch.long)


def _kd_only(**kw):
    from alignkd.distill import AlignKDLoss, AlignKDLossConfig

    return AlignKDLoss(AlignKDLossConfig(att_weight=0.0, v_weight=0.0, **kw), 4, 4, 8, 8)


@pytest.mark.parametrize("tail", ["rest", "renorm"])
def test_the_loss_module_takes_top_k_from_live_logits_or_from_cached_rows(tail):
    from alignkd.distill import DistillInputs
    from alignkd.distill.losses import kd_positions_mask

    s, t, labels, mask = _batch(5)
    student = DistillInputs(s, labels, mask)
    pos = kd_positions_mask(labels, mask, "text")
    logp, ids = teacher_topk(t[pos], 6, 2.0)
    want = topk_kd_loss(s[pos], logp, ids, 2.0, tail)
    live = _kd_only(kd_topk=6, kd_tail=tail, temperature=2.0)(student, DistillInputs(t))["kd"]
    cached = _kd_only(kd_topk=6, kd_tail=tail, temperature=2.0)(
        student, DistillInputs(topk_logprobs=logp, topk_ids=ids))["kd"]
    assert float(live) == float(want) == float(cached) and float(want) > 0
    full = _kd_only(temperature=2.0)(student, DistillInputs(t))["kd"]
    assert float(full) == float(kd_loss(s, t, labels, mask, 2.0, "text"))
    every = _kd_only(temperature=2.0, kd_topk=40)(student, DistillInputs(t))["kd"]  # k = V is the full KD
    torch.testing.assert_close(every, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="the teacher's top-k has 4 rows, the batch 5 KD positions"):
        _kd_only(kd_topk=6)(student, DistillInputs(topk_logprobs=logp[:4], topk_ids=ids[:4]))
    with pytest.raises(ConfigError, match=r"teacher inputs lack \['logits'\]"):
        _kd_only()(student, DistillInputs())


def test_top_k_settings_are_checked():
    from alignkd.distill import AlignKDLossConfig

    with pytest.raises(ConfigError, match="kd_tail must be one of rest, renorm, got 'x'"):
        AlignKDLossConfig(kd_tail="x")
    with pytest.raises(ConfigError, match="kd_topk must be >= 1"):
        AlignKDLossConfig(kd_topk=0)
