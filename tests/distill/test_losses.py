"""Align-KD loss terms against direct loop computations on small hand-built batches."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignkd.distill.attention import capture_layer0_attention
from alignkd.distill.losses import (
    AlignKDLoss,
    AlignKDLossConfig,
    DistillInputs,
    HeadAdapter,
    attention_loss,
    ce_loss,
    focus_indices,
    kd_loss,
    release_vision_text_block,
    text_vision_block,
    vision_loss,
)
from alignkd.errors import ConfigError

B, T, N, V = 4, 12, 3, 7
H_S, H_T, D_S, D_T = 2, 3, 4, 5
# (image start or None, real length, answer positions); the image sits at a different place in each sample
SAMPLES = [(1, 10, [7, 8, 9]), (5, 12, [10, 11]), (None, 8, [5, 6, 7]), (2, 7, [6])]
IMG = [b for b, (s, _, _) in enumerate(SAMPLES) if s is not None]  # samples with an image, batch order


def layout():
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100)
    for b, (start, length, answer) in enumerate(SAMPLES):
        attention_mask[b, :length] = 1
        if start is not None:
            image_mask[b, start : start + N] = True
        labels[b, answer] = torch.arange(len(answer)) % V
    return labels, attention_mask, image_mask


def causal_probs(H, attention_mask, seed):
    g = torch.Generator().manual_seed(seed)
    scores = 2 * torch.randn(B, H, T, T, generator=g)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, T, T)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels, attention_mask, image_mask = layout()
    s = DistillInputs(
        logits=torch.randn(B, T, V, generator=g), labels=labels, attention_mask=attention_mask,
        image_mask=image_mask, image_features=torch.randn(len(IMG), N, D_S, generator=g),
        attn_probs=causal_probs(H_S, attention_mask, seed + 1),
    )
    t = DistillInputs(
        logits=torch.randn(B, T, V, generator=g), image_features=torch.randn(len(IMG), N, D_T, generator=g),
        attn_probs=causal_probs(H_T, attention_mask, seed + 2),
    )
    return s, t


def text_rows(b):
    """Real text positions after sample b's image: the only text that can see it."""
    start, length, _ = SAMPLES[b]
    return list(range(start + N, length))


def adapt_heads(adapter, x, b, row, col):
    """HeadAdapter applied by hand at one (row, col) of sample b: a list over student heads."""
    w, bias = adapter.conv.weight[:, :, 0, 0], adapter.conv.bias
    return [bias[hs] + sum(w[hs, ht] * x[b, ht, row, col] for ht in range(H_T)) for hs in range(H_S)]


# ----------------------------------------------------------------------------- CE / KD

def test_ce_matches_loop():
    s, _ = inputs()
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if s.labels[b, t] != -100:
                total += -torch.log_softmax(s.logits[b, t - 1], -1)[s.labels[b, t]]
                count += 1
    torch.testing.assert_close(ce_loss(s.logits, s.labels), total / count)


@pytest.mark.parametrize("positions", ["text", "tokens", "all"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_loop(positions, temperature):
    s, t = inputs()
    terms = []
    for b in range(B):
        for pos in range(T):
            if positions == "text":
                keep = pos + 1 < T and s.labels[b, pos + 1] != -100
            elif positions == "tokens":
                keep = bool(s.attention_mask[b, pos])
            else:
                keep = True
            if keep:
                p = torch.softmax(t.logits[b, pos] / temperature, -1)
                q = torch.softmax(s.logits[b, pos] / temperature, -1)
                terms.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(V)))
    want = sum(terms) / len(terms) * temperature**2
    got = kd_loss(s.logits, t.logits, s.labels, s.attention_mask, temperature, positions)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32))


def test_kd_pinned():
    # teacher (.5, .5), student (.25, .75): KL = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3)
    teacher = torch.zeros(1, 2, 2)
    student = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0]]]))
    labels = torch.tensor([[-100, 1]])
    got = kd_loss(student, teacher, labels, torch.ones(1, 2))
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)


# ----------------------------------------------------------------------------- blocks and terms

@pytest.mark.parametrize("starts", [None, [1, 5, 3, 2], [2, 2, None, 2]])
def test_text_vision_block_matches_loop(starts, monkeypatch):
    """The standard layout (images at other places, one sample without), every sample with an image at another
    place, and one place shared by the samples that have one: a gather each (not the one-template slice)."""
    if starts is not None:  # the layout helpers read these module globals
        monkeypatch.setitem(globals(), "SAMPLES", [(st, n, a) for st, (_, n, a) in zip(starts, SAMPLES)])
        monkeypatch.setitem(globals(), "IMG", [b for b, st in enumerate(starts) if st is not None])
    s, _ = inputs()
    block, rows = text_vision_block(s.attn_probs, s.image_mask, s.attention_mask)
    assert block.shape[:2] == (len(IMG), H_S) and block.shape[3] == N
    for i, b in enumerate(IMG):
        want_rows = text_rows(b)
        start = SAMPLES[b][0]
        assert rows[i].sum() == len(want_rows)
        for j, pos in enumerate(want_rows):  # rows are in position order from the image's end
            assert rows[i, j]
            assert torch.equal(block[i, :, j], s.attn_probs[b, :, pos, start : start + N])
        assert torch.all(block[i, :, ~rows[i]] == 0)


def test_text_vision_block_of_one_template_matches_loop():
    """Every image at one place (the usual batch of one prompt template): the block is read as a slice; the
    same values and zeroed rows as the loop, and its gradient lands on exactly those entries."""
    start, lengths = 2, [10, 12, 7, 9]
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, length in enumerate(lengths):
        attention_mask[b, :length] = 1
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    image_mask[:, start:start + N] = True
    probs = causal_probs(H_S, attention_mask, 3).requires_grad_(True)
    for offset in (0, start + N):
        block, rows = text_vision_block(probs[:, :, offset:], image_mask, attention_mask, query_offset=offset)
        assert block.shape == (B, H_S, T - start - N, N)
        for b, length in enumerate(lengths):
            for j, pos in enumerate(range(start + N, T)):
                assert bool(rows[b, j]) == (pos < length)
                want = probs[b, :, pos, start:start + N] if pos < length else torch.zeros(H_S, N)
                assert torch.equal(block[b, :, j], want)
    (grad,) = torch.autograd.grad(block.sum(), probs)
    want = torch.zeros_like(probs)
    for b, length in enumerate(lengths):
        want[b, :, start + N:length, start:start + N] = 1
    assert torch.equal(grad, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kd_topk", [None, V])
@pytest.mark.parametrize("positions", ["text", "tokens", "all"])
def test_loss_module_kd_is_kd_loss(temperature, kd_topk, positions):
    """The module's KD term (sharing CE's rows and, at T = 1, its log-probs, where it reads the answer
    positions) is `kd_loss` at its positions, at T = 1 and 2, from full logits and through the top-k path with
    k = the vocabulary."""
    s, t = inputs()
    out = make_loss(temperature=temperature, kd_topk=kd_topk, kd_positions=positions)(s, t)
    want = kd_loss(s.logits, t.logits, s.labels, s.attention_mask, temperature, positions)
    torch.testing.assert_close(out["kd"], want)
    torch.testing.assert_close(out["ce"], ce_loss(s.logits, s.labels))


def test_no_answer_token_gives_grad_safe_zeros():
    """CE and KD of a batch without any answer token: zeros whose gradient into the logits is zero."""
    s, t = inputs()
    s.labels = torch.full_like(s.labels, -100)
    s.logits.requires_grad_(True)
    out = make_loss(att_weight=0.0, v_weight=0.0)(s, t)
    assert (out["ce"].item(), out["kd"].item()) == (0.0, 0.0)
    out["total"].backward()
    assert s.logits.grad is not None and s.logits.grad.abs().sum() == 0


def test_logits_of_another_layout_are_refused():
    """Logits whose (B, T) differ from the labels' (or the teacher's from the student's) are one ConfigError,
    not rows read from the wrong places."""
    s, t = inputs()
    with pytest.raises(ConfigError, match="do not match"):
        ce_loss(torch.randn(B, T + 2, V), s.labels)
    with pytest.raises(ConfigError, match="teacher logits"):
        kd_loss(s.logits, torch.randn(B, T + 2, V), s.labels, s.attention_mask)
    with pytest.raises(ConfigError, match="teacher logits"):
        make_loss()(s, DistillInputs(logits=torch.randn(B + 1, T, V), image_features=t.image_features,
                                     attn_probs=t.attn_probs))


def test_text_vision_block_with_query_offset():
    s, _ = inputs()
    full, rows = text_vision_block(s.attn_probs, s.image_mask, s.attention_mask)
    part, rows2 = text_vision_block(s.attn_probs[:, :, 4:], s.image_mask, s.attention_mask, query_offset=4)
    assert torch.equal(full, part) and torch.equal(rows, rows2)
    with pytest.raises(ConfigError):
        text_vision_block(s.attn_probs[:, :, 5:], s.image_mask, s.attention_mask, query_offset=5)


def test_attention_loss_matches_loop():
    s, t = inputs()
    adapter = HeadAdapter(H_T, H_S)
    s_block, rows = text_vision_block(s.attn_probs, s.image_mask, s.attention_mask)
    t_block, _ = text_vision_block(t.attn_probs, s.image_mask, s.attention_mask)
    got = attention_loss(s_block, adapter(t_block), rows)
    total, count = 0.0, 0
    for b in IMG:
        start = SAMPLES[b][0]
        for pos in text_rows(b):
            for col in range(start, start + N):
                adapted = adapt_heads(adapter, t.attn_probs, b, pos, col)
                for hs in range(H_S):
                    total += (s.attn_probs[b, hs, pos, col] - adapted[hs]) ** 2
                    count += 1
    torch.testing.assert_close(got, total / count)


def test_focus_indices_match_loop():
    _, t = inputs()
    labels, attention_mask, image_mask = layout()
    block, rows = text_vision_block(t.attn_probs, image_mask, attention_mask)
    got = focus_indices(block, rows, k=2)
    for i, b in enumerate(IMG):
        start = SAMPLES[b][0]
        score = [sum(t.attn_probs[b, :, pos, start + n].mean() for pos in text_rows(b)) for n in range(N)]
        want = sorted(range(N), key=lambda n: -score[n])[:2]
        assert set(got[i].tolist()) == set(want)
    with pytest.raises(ConfigError):
        focus_indices(block, rows, k=N + 1)


def test_vision_loss_pinned():
    student = torch.zeros(1, 2, 1)
    teacher = torch.tensor([[[1.0], [3.0]]])
    v_all, v_focus = vision_loss(student, teacher, torch.tensor([[1]]))
    assert (v_all.item(), v_focus.item()) == (5.0, 9.0)
    # V-focus over the samples whose focus is kept: the second (error 100) is left out, then none is
    two = (torch.zeros(2, 2, 1), torch.tensor([[[1.0], [3.0]], [[10.0], [10.0]]]))
    _, kept = vision_loss(*two, torch.tensor([[1], [0]]), torch.tensor([True, False]))
    _, none = vision_loss(*two, torch.tensor([[1], [0]]), torch.tensor([False, False]))
    assert (kept.item(), none.item()) == (9.0, 0.0)


# ----------------------------------------------------------------------------- the module

def make_loss(**kw) -> AlignKDLoss:
    torch.manual_seed(0)
    return AlignKDLoss(AlignKDLossConfig(top_k=2, **kw), H_T, H_S, D_T, D_S)


def test_paper_forward_matches_loop():
    s, t = inputs()
    loss = make_loss()
    out = loss(s, t)
    att_sum, att_n, v_all_sum, v_focus_sum, v_focus_n = 0.0, 0, 0.0, 0.0, 0
    lin = loss.vision_adapter.proj
    for i, b in enumerate(IMG):
        start = SAMPLES[b][0]
        for pos in text_rows(b):
            for col in range(start, start + N):
                adapted = adapt_heads(loss.head_adapter, t.attn_probs, b, pos, col)
                for hs in range(H_S):
                    att_sum += (s.attn_probs[b, hs, pos, col] - adapted[hs]) ** 2
                    att_n += 1
        score = [sum(t.attn_probs[b, :, pos, start + n].mean() for pos in text_rows(b)) for n in range(N)]
        focus = sorted(range(N), key=lambda n: -score[n])[:2]
        for n in range(N):
            err = ((s.image_features[i, n] - (lin.weight @ t.image_features[i, n] + lin.bias)) ** 2).sum()
            v_all_sum += err
            if n in focus:
                v_focus_sum += err
        v_focus_n += 2 * D_S
    want = {
        "ce": ce_loss(s.logits, s.labels),
        "kd": kd_loss(s.logits, t.logits, s.labels, s.attention_mask),
        "att": att_sum / att_n,
        "v_all": v_all_sum / (len(IMG) * N * D_S),
        "v_focus": v_focus_sum / v_focus_n,
    }
    want["total"] = want["ce"] + want["kd"] + want["att"] + want["v_all"] + want["v_focus"]
    for name, value in want.items():
        torch.testing.assert_close(out[name], torch.as_tensor(value, dtype=torch.float32), msg=name)


@pytest.mark.parametrize("kd_positions", ["text", "tokens"])
def test_padding_does_not_change_the_loss(kd_positions):
    s, t = inputs()
    loss = make_loss(kd_positions=kd_positions, variant="paper")
    ref = {k: v.detach() for k, v in loss(s, t).items()}
    pad = ~s.attention_mask.bool()  # (B, T)
    g = torch.Generator().manual_seed(9)
    for x in (s, t):
        x.logits = torch.where(pad[:, :, None], 100 * torch.randn(x.logits.shape, generator=g), x.logits)
        p = x.attn_probs.clone()
        p[pad[:, None, :, None].expand_as(p)] = 0.7  # padded query rows
        p[pad[:, None, None, :].expand_as(p)] = 0.3  # padded key columns
        x.attn_probs = p
    for k, v in loss(s, t).items():
        assert torch.equal(v, ref[k]), k


def test_paper_adapters_get_gradients_release_frozen():
    s, t = inputs()
    s.attn_probs.requires_grad_(True)
    paper = make_loss()
    paper(s, t)["total"].backward()
    for p in paper.parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    release = make_loss(variant="release")
    assert release.config.kd_positions == "all"
    assert not any(p.requires_grad for p in release.parameters())
    release(s, t)["total"].backward()
    assert all(p.grad is None for p in release.parameters())


def test_text_only_batch_gives_grad_safe_zeros():
    s, t = inputs()
    s.image_mask = torch.zeros_like(s.image_mask)
    s.image_features = t.image_features = None
    loss = make_loss()
    out = loss(s, t)
    for name in ("att", "v_all", "v_focus"):
        assert out[name].item() == 0.0
    out["total"].backward()
    for p in loss.parameters():  # every adapter parameter still gets a (zero) gradient
        assert p.grad is not None and p.grad.abs().sum() == 0


def test_zero_weights_skip_terms():
    s, t = inputs()
    baseline = make_loss(kd_weight=0, att_weight=0, v_weight=0)
    assert baseline.head_adapter is None and baseline.vision_adapter is None
    out = baseline(s, None)  # no teacher forward needed
    assert out["total"] == out["ce"] and out["kd"] == 0
    logit_kd = make_loss(att_weight=0, v_weight=0)
    out = logit_kd({"logits": s.logits, "labels": s.labels, "attention_mask": s.attention_mask}, {"logits": t.logits})
    torch.testing.assert_close(out["total"], out["ce"] + out["kd"])
    assert out["kd"] > 0 and out["att"] == 0


def test_config_errors():
    for bad in ({"variant": "x"}, {"kd_positions": "answers"}, {"top_k": 0}, {"temperature": 0}, {"kd_weight": -1}):
        with pytest.raises(ConfigError):
            AlignKDLossConfig(**bad)
    s, t = inputs()
    with pytest.raises(ConfigError):
        make_loss()({**vars(s), "image_features": s.image_features[:1]}, t)
    with pytest.raises(ConfigError):
        make_loss()(s, {"logits": t.logits})  # teacher attention missing
    with pytest.raises(ConfigError):
        make_loss(att_weight=0, v_weight=0)(s, None)


def test_release_focus_matches_loop():
    s, t = inputs()
    loss = make_loss(variant="release")
    got = loss._release_focus(t.attn_probs, s.image_mask, s.attention_mask)
    for i, b in enumerate(IMG):
        start, length, _ = SAMPLES[b]
        score = [sum(t.attn_probs[b, :, q, key].mean() for q in range(length)) for key in range(T)]
        keys = sorted(range(T), key=lambda k: -score[k])[:2]  # all keys, BOS sink included
        assert set(got[i].tolist()) == {(k - start - 1) % N for k in keys}  # image at 1 -> key - 2
        if start == 1:  # the release literally: feature index key - 2, a negative one read from the end
            assert set(got[i].tolist()) == {list(range(N))[k - 2] for k in keys}


# ----------------------------------------------------------------------------- through a tiny LLaMA

def tiny_lm(hidden, heads, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=32, initializer_range=0.3,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_att_gradient_into_student_layer0(variant):
    student, teacher = tiny_lm(32, H_S, 0), tiny_lm(48, H_T, 1)
    labels, attention_mask, image_mask = layout()
    embeds = torch.randn(B, T, 32)
    with capture_layer0_attention(student) as s_cap:
        s_logits = student(inputs_embeds=embeds, attention_mask=attention_mask).logits
    with capture_layer0_attention(teacher) as t_cap, torch.no_grad():
        t_logits = teacher(inputs_embeds=torch.randn(B, T, 48), attention_mask=attention_mask).logits
    s = DistillInputs(s_logits, labels, attention_mask, image_mask, attn_probs=s_cap.probs)
    t = DistillInputs(t_logits, attn_probs=t_cap.probs)
    loss = AlignKDLoss(AlignKDLossConfig(kd_weight=0, v_weight=0, variant=variant), H_T, H_S, 48, 32)
    out = loss(s, t)
    out["att"].backward()
    attn = student.model.layers[0].self_attn
    grads = [attn.q_proj.weight.grad, attn.k_proj.weight.grad]
    if variant == "paper":
        assert all(g.abs().sum() > 0 for g in grads)
        assert loss.head_adapter.conv.weight.grad.abs().sum() > 0
    else:
        block, _ = release_vision_text_block(s_cap.probs, image_mask, attention_mask)
        assert torch.all(block == 0)  # vision rows never see later text under the causal mask
        assert all(g is None or torch.all(g == 0) for g in grads)
        # its value is the frozen adapter's bias, nothing the student can move
        torch.testing.assert_close(out["att"], loss.head_adapter.conv.bias.pow(2).mean())


def test_rows_from_query_offset_give_the_same_loss():
    s, t = inputs()
    ref = make_loss()(s, t)
    for x in (s, t):  # as a capture with query_from=4 (text after the earliest image starts at 4)
        x.attn_probs, x.attn_query_offset = x.attn_probs[:, :, 4:], 4
    for k, v in make_loss()(s, t).items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0, msg=k)
    with pytest.raises(ConfigError):
        make_loss(variant="release")(s, t)  # the release block needs the vision rows
