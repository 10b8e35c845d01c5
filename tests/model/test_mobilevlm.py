"""The model core against transformers' own modules and hand-built references."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, LlamaForCausalLM

from alignkd.errors import ConfigError, DataError
from alignkd.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MobileVLM, build_model, get_preset
from alignkd.model.mobilevlm import first_text_after_image, to_llama_config
from alignkd.model.projector import LDPv2Projector
from alignkd.model import vision
from alignkd.model.vision import FeatureMemo, attach_feature_memo, to_clip_config

IMG = IMAGE_TOKEN_INDEX


def _ids(rows, pad=0):
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_text_only_forward_equals_plain_llama(tiny_student):
    ref = LlamaForCausalLM(to_llama_config(tiny_student.config.text)).eval()
    ref.load_state_dict(tiny_student.lm.state_dict())
    ids, mask = _ids([[1, 5, 9, 33, 7], [1, 4, 4]])
    ours = tiny_student(ids, mask).logits
    theirs = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=0, atol=1e-5)


def test_vision_features_equal_clip_hidden_layer_minus_2(tiny_student, pixels):
    ref = CLIPVisionModel(to_clip_config(tiny_student.config.vision)).eval()
    ref.load_state_dict(tiny_student.vision_tower.vision_tower.state_dict())
    expected = ref(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = tiny_student.vision_tower(pixels)
    assert got.shape == (2, 576, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # and it is not the last layer's output
    assert not torch.allclose(got, ref(pixels).last_hidden_state[:, 1:], atol=1e-3)


def test_a_tower_without_its_unused_layers_gives_the_same_features(tiny_student, pixels):
    import copy

    tower = copy.deepcopy(tiny_student.vision_tower).drop_unused_layers()
    assert len(tower.vision_tower.encoder.layers) == tower.layers_used == 2  # of 3: select_layer −2
    assert len(tiny_student.vision_tower.vision_tower.encoder.layers) == 3  # the copy only
    torch.testing.assert_close(tower(pixels), tiny_student.vision_tower(pixels), rtol=0, atol=0)
    assert len(tower.drop_unused_layers().vision_tower.encoder.layers) == 2  # idempotent


def test_vision_tower_is_frozen(tiny_student, pixels):
    assert not any(p.requires_grad for p in tiny_student.vision_tower.parameters())
    assert all(p.requires_grad for p in tiny_student.mm_projector.parameters())
    feats = tiny_student.encode_images(pixels)
    feats.sum().backward()
    assert tiny_student.mm_projector.mlp.mlp[0].weight.grad is not None
    tiny_student.zero_grad(set_to_none=True)


def test_feature_memo_gives_the_towers_features_and_computes_each_image_once(pixels):
    tower = build_model("tiny-student", seed=0).vision_tower
    px = torch.cat([pixels, pixels[:1], pixels.flip(0)])  # (5, 3, 48, 48): images a, b, a, b, a
    expected = tower(px)  # a batch of 1 rounds differently: equal up to ~1e-6
    computed = []

    def compute(x):
        computed.append(x.shape[0])
        return tower(x)

    memo = FeatureMemo(max_bytes=1 << 30)
    torch.testing.assert_close(memo(px, compute), expected, rtol=0, atol=1e-5)
    assert computed == [2] and (memo.hits, memo.misses, len(memo.store)) == (3, 2, 2)
    torch.testing.assert_close(memo(pixels.flip(0), compute), expected[[1, 0]], rtol=0, atol=1e-5)
    assert computed == [2] and memo.hits == 5  # nothing computed: both images were kept
    small = FeatureMemo(max_bytes=expected[0].nbytes)  # room for one image: the other is computed each time
    for _ in range(2):
        torch.testing.assert_close(small(pixels, compute), expected[:2], rtol=0, atol=1e-5)
    assert computed == [2, 2, 1] and len(small.store) == 1


def test_attached_memos_are_shared_by_towers_of_the_same_weights_only(pixels, monkeypatch):
    monkeypatch.setattr(vision, "_MEMOS", {})
    a, b = build_model("tiny-student", seed=0), build_model("tiny-student", seed=0)
    other = build_model("tiny-student", seed=1)
    plain = a.vision_tower(pixels)
    memo = attach_feature_memo(a.vision_tower, 1 << 30)
    assert attach_feature_memo(b.vision_tower, 1 << 20) is memo and memo.max_bytes == 1 << 30
    assert attach_feature_memo(other.vision_tower, 1 << 30) is not memo
    torch.testing.assert_close(a.encode_images(pixels), b.encode_images(pixels), rtol=0, atol=0)
    assert (memo.misses, memo.hits) == (2, 2)  # b's forward reused a's features
    torch.testing.assert_close(b.vision_tower(pixels), plain, rtol=0, atol=1e-5)
    other.vision_tower.requires_grad_(True)
    other.vision_tower.memo = None
    with pytest.raises(ValueError, match="frozen"):
        attach_feature_memo(other.vision_tower, 1 << 30)


def test_ldpv2_shapes_names_and_residual():
    torch.manual_seed(0)
    proj = LDPv2Projector(1024, 32)
    assert sorted(proj.state_dict()) == [
        "mlp.mlp.0.bias", "mlp.mlp.0.weight", "mlp.mlp.2.bias", "mlp.mlp.2.weight", "peg.peg.0.bias", "peg.peg.0.weight",
    ]
    assert proj.peg.peg[0].weight.shape == (32, 1, 3, 3)  # depthwise
    x = torch.randn(2, 576, 1024)
    y = proj(x)
    assert y.shape == (2, 144, 32)
    # reference written independently: MLP, 2×2 mean pooling of the 24×24 grid, depthwise conv + residual
    h = proj.mlp.mlp[2](F.gelu(proj.mlp.mlp[0](x), approximate="none"))  # (2, 576, 32)
    grid = h.reshape(2, 24, 24, 32).permute(0, 3, 1, 2)
    pooled = grid.reshape(2, 32, 12, 2, 12, 2).mean((3, 5))  # (2, 32, 12, 12)
    conv = F.conv2d(pooled, proj.peg.peg[0].weight, proj.peg.peg[0].bias, padding=1, groups=32)
    expected = (conv + pooled).flatten(2).transpose(1, 2)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_multimodal_forward_equals_hand_built_inputs_embeds(tiny_student, pixels):
    m = tiny_student
    # image at different positions; second row shorter (right padding); labels on the tail
    rows = [[1, 11, 12, IMG, 13, 14, 15], [1, IMG, 21, 22]]
    ids, mask = _ids(rows)
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    out = m(ids, mask, pixel_values=pixels, labels=labels)
    feats = m.encode_images(pixels)  # (2, 144, 64)
    emb = m.lm.get_input_embeddings()
    per_row, per_labels = [], []
    for i, r in enumerate(rows):
        k = r.index(IMG)
        before, after = torch.tensor(r[:k]), torch.tensor(r[k + 1:])
        per_row.append(torch.cat([emb(before), feats[i], emb(after)]))
        per_labels.append(torch.cat([before, torch.full((144,), IGNORE_INDEX), after]))
    lengths = [len(x) for x in per_row]
    t = max(lengths)
    embeds = torch.zeros(2, t, 64)
    ref_mask = torch.zeros(2, t, dtype=torch.long)
    ref_labels = torch.full((2, t), IGNORE_INDEX)
    for i, (e, lab) in enumerate(zip(per_row, per_labels)):
        embeds[i, : len(e)] = e
        ref_mask[i, : len(e)] = 1
        ref_labels[i, : len(e)] = lab
    ref = m.lm(inputs_embeds=embeds, attention_mask=ref_mask).logits
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.attention_mask, ref_mask)
    torch.testing.assert_close(out.labels, ref_labels)
    valid = ref_mask.bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], rtol=0, atol=1e-5)
    assert out.image_mask.sum(1).tolist() == [144, 144]
    assert out.image_mask[0, 3:147].all() and out.image_mask[1, 1:145].all()
    # the loss is CE over the answer tokens only
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ref_labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_text_only_sample_beside_image_sample(tiny_student, pixels):
    ids, mask = _ids([[1, 5, 6, 7], [1, IMG, 8, 9]])
    out = tiny_student(ids, mask, pixel_values=pixels[:1])
    assert out.image_mask[0].sum() == 0 and out.image_mask[1].sum() == 144
    alone = tiny_student(torch.tensor([[1, 5, 6, 7]])).logits[0]
    torch.testing.assert_close(out.logits[0, :4], alone, rtol=0, atol=1e-5)


def test_first_text_after_image_is_where_the_spliced_image_ends(tiny_student):
    ids, _ = _ids([[1, 5, IMG, 9, 7], [1, 4, 4, 6, IMG, 3], [1, 8, 2]])
    mm = tiny_student.build_inputs_embeds(ids, None, None, torch.zeros(2, 144, 64))
    ends = [int(row.nonzero().max()) + 1 for row in mm.image_mask if row.any()]  # first position after each span
    assert first_text_after_image(ids, 144) == min(ends) == 2 + 144
    assert first_text_after_image(ids[2:], 144) == 0  # no image: every row


@pytest.mark.parametrize("use_image", [False, True])
def test_greedy_generate_with_cache_equals_without(tiny_student, pixels, use_image):
    rows = [[1, IMG, 30, 31, 32], [1, IMG, 40]] if use_image else [[1, 30, 31, 32], [1, 40]]
    ids, mask = _ids(rows)
    pv = pixels if use_image else None
    cached = tiny_student.generate(ids, mask, pv, max_new_tokens=8, eos_token_id=-1)
    uncached = tiny_student.generate(ids, mask, pv, max_new_tokens=8, eos_token_id=-1, use_cache=False)
    assert cached == uncached and all(len(r) == 8 for r in cached)
    # batching (left-padded decoding) gives what each row gives alone
    for i, r in enumerate(rows):
        alone = tiny_student.generate(torch.tensor([r]), None, pv[i:i + 1] if use_image else None,
                                      max_new_tokens=8, eos_token_id=-1)
        assert alone[0] == cached[i]
    # greedy = argmax of a full forward at every step
    seq = list(rows[0])
    for tok in cached[0][:3]:
        logits = tiny_student(torch.tensor([seq]), pixel_values=pv[:1] if use_image else None).logits
        assert int(logits[0, -1].argmax()) == tok
        seq.append(tok)


def test_generate_stops_at_eos_and_samples_reproducibly(tiny_student):
    ids = torch.tensor([[1, 30, 31]])
    greedy = tiny_student.generate(ids, max_new_tokens=6, eos_token_id=-1)[0]
    stopped = tiny_student.generate(ids, max_new_tokens=6, eos_token_id=greedy[2])[0]
    assert stopped == greedy[:2]
    a = tiny_student.generate(ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = tiny_student.generate(ids, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_top_p_keeps_only_the_nucleus():
    from alignkd.model.decoding import sample_next_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 ≥ 0.7: tokens 2 and 3 are cut


def test_image_token_count_mismatch_is_one_clear_error(tiny_student, pixels):
    ids = torch.tensor([[1, IMG, 5]])
    with pytest.raises(DataError, match="1 image token.*0 image"):
        tiny_student(ids)
    with pytest.raises(DataError, match="0 image token.*2 image"):
        tiny_student(torch.tensor([[1, 5]]), pixel_values=pixels)


def test_sequence_longer_than_context_is_refused(tiny_student, pixels):
    ids = torch.tensor([[1, IMG] + [5] * 400])  # 401 + 144 > 512
    with pytest.raises(DataError, match="exceeds the context of 512"):
        tiny_student(ids, pixel_values=pixels[:1])


def test_unknown_projector_type():
    with pytest.raises(ConfigError, match="mm_projector_type 'mlp2x_gelu' is not supported"):
        get_preset("tiny-student").replace(projector_type="mlp2x_gelu")


def test_real_presets_parameter_counts_and_names():
    from alignkd.model.checkpoint import to_mtgv_name
    from alignkd.model.summary import parameter_counts

    c17 = parameter_counts(get_preset("mobilevlm-v2-1.7b"))
    c7 = parameter_counts(get_preset("mobilevlm-v2-7b"))
    # CLIP ViT-L/14-336 vision tower (no text tower, no projection head)
    assert c17["vision_tower"] == c7["vision_tower"] == 303_507_456
    # LDPv2: 1024·2048+2048 + 2048·2048+2048 + 2048·9+2048
    assert c17["projector"] == 1024 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 9 + 2048
    assert c17["lm_embeddings"] == 32000 * 2048
    # MobileLLaMA 1.4B and Vicuna 7B
    assert round((c17["total"] - c17["vision_tower"] - c17["projector"]) / 1e9, 2) == 1.36
    assert round((c7["total"] - c7["vision_tower"] - c7["projector"]) / 1e9, 2) == 6.74
    with torch.device("meta"):
        names = {to_mtgv_name(k) for k in MobileVLM(get_preset("mobilevlm-v2-1.7b")).state_dict()}
    for n in ["model.embed_tokens.weight", "model.layers.23.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight",
              "model.mm_projector.mlp.mlp.0.weight", "model.mm_projector.mlp.mlp.2.bias", "model.mm_projector.peg.peg.0.weight",
              "model.vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc2.bias",
              "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"]:
        assert n in names, n
