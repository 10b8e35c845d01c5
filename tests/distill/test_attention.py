"""Layer-0 attention capture: equals eager `output_attentions`, leaves the SDPA forward alone, has gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignkd.distill.attention import Layer0Capture, capture_layer0_attention, layer0_attention
from alignkd.errors import ConfigError

LENGTHS = [10, 7, 4]  # right padding in a batch of 3, T = 10


def tiny_lm(kv_heads: int, impl: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, initializer_range=0.3,  # peaked attention
    )
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


def pair(kv_heads: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    sdpa = tiny_lm(kv_heads, "sdpa")
    eager = tiny_lm(kv_heads, "eager", seed=1)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    return sdpa, eager


def batch(T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (len(LENGTHS), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()  # (B, T)
    return ids * mask, mask


def eager_layer0(eager: LlamaForCausalLM, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return eager(**inputs, output_attentions=True).attentions[0]  # (B, H, T, T)


def assert_valid_rows_close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    for b, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA
@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # bool 4D mask and additive float mask
def test_matches_eager_output_attentions(kv_heads, impl):
    sdpa, eager = pair(kv_heads)
    model = sdpa if impl == "sdpa" else eager
    ids, mask = batch()
    with capture_layer0_attention(model) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert cap.probs.shape == (3, 4, 10, 10) and cap.probs.dtype == torch.float32
    assert_valid_rows_close(cap.probs, eager_layer0(eager, input_ids=ids, attention_mask=mask), mask)


def test_no_padding_mask_is_pure_causal():
    sdpa, eager = pair(2)
    ids, _ = batch()
    with capture_layer0_attention(sdpa) as cap, torch.no_grad():
        sdpa(input_ids=ids)  # SDPA gets attention_mask=None and uses is_causal
    torch.testing.assert_close(cap.probs, eager_layer0(eager, input_ids=ids), atol=1e-6, rtol=0)
    assert torch.all(cap.probs.triu(1) == 0)


def test_inputs_embeds():
    sdpa, eager = pair(2)
    ids, mask = batch()
    embeds = sdpa.model.embed_tokens(ids).detach() + 0.1 * torch.randn(3, 10, 64)  # e.g. spliced vision tokens
    with capture_layer0_attention(sdpa) as cap, torch.no_grad():
        sdpa(inputs_embeds=embeds, attention_mask=mask)
    assert_valid_rows_close(cap.probs, eager_layer0(eager, inputs_embeds=embeds, attention_mask=mask), mask)


def test_query_from_keeps_later_rows():
    sdpa, _ = pair(4)
    ids, mask = batch()
    with capture_layer0_attention(sdpa) as full, torch.no_grad():
        sdpa(input_ids=ids, attention_mask=mask)
    with capture_layer0_attention(sdpa, query_from=6) as part, torch.no_grad():
        sdpa(input_ids=ids, attention_mask=mask)
    assert part.probs.shape == (3, 4, 4, 10)
    torch.testing.assert_close(part.probs, full.probs[:, :, 6:], atol=0, rtol=0)


def test_logits_unchanged_and_hooks_removed():
    sdpa, _ = pair(2)
    ids, mask = batch()
    attn = sdpa.model.layers[0].self_attn
    with torch.no_grad():
        ref = sdpa(input_ids=ids, attention_mask=mask).logits
        with capture_layer0_attention(sdpa):
            got = sdpa(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref, got)
    hooks = [attn._forward_pre_hooks, attn._forward_hooks, attn.q_proj._forward_hooks, attn.k_proj._forward_hooks]
    assert all(len(h) == 0 for h in hooks)


def test_gradient_reaches_q_and_k_proj():
    sdpa, _ = pair(2)
    ids, mask = batch()
    with capture_layer0_attention(sdpa) as cap:
        sdpa(input_ids=ids, attention_mask=mask)
    cap.probs[:, :, 5:, 1:4].sum().backward()  # a block, not whole rows (those sum to a constant)
    attn = sdpa.model.layers[0].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("query_from", [0, 6])
def test_layer0_attention_alone_equals_the_capture_of_a_full_forward_and_runs_no_more_of_the_layer(
        kv_heads, impl, query_from):
    sdpa, eager = pair(kv_heads)
    model = sdpa if impl == "sdpa" else eager
    ids, mask = batch()
    embeds = model.model.embed_tokens(ids).detach() + 0.1 * torch.randn(3, 10, 64)
    with capture_layer0_attention(model, query_from) as cap, torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=mask)
    layer = model.model.layers[0]
    ran = []
    for m in (layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp, layer.post_attention_layernorm,
              model.model.layers[1], model.model.norm):
        m.register_forward_hook(lambda mod, a, o: ran.append(type(mod).__name__))
    with torch.no_grad():
        got = layer0_attention(model, embeds, mask, query_from)
    assert ran == []  # only the input norm, q_proj, k_proj and the rotary embedding ran
    assert got.shape == cap.probs.shape == (3, 4, 10 - query_from, 10)
    assert torch.equal(got, cap.probs)  # same modules, same operations: identical, not merely close
    if query_from == 0:  # and the map itself is layer 0's, against transformers' eager attention
        assert_valid_rows_close(got, eager_layer0(eager, inputs_embeds=embeds, attention_mask=mask), mask)


def test_flash_style_2d_mask_equals_bool_4d():
    scores = torch.randn(2, 3, 5, 5)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    bool4d = causal[None, None] & pad.bool()[:, None, None, :]  # (B, 1, T, T)
    for r in (0, 2):
        want = Layer0Capture._mask(scores[:, :, r:], bool4d, r)
        got = Layer0Capture._mask(scores[:, :, r:], pad, r)
        assert torch.equal(got, want)


def test_bad_model_and_query_from():
    with pytest.raises(ConfigError):
        capture_layer0_attention(torch.nn.Linear(2, 2))
    sdpa, _ = pair(4)
    ids, mask = batch()
    with pytest.raises(ConfigError), capture_layer0_attention(sdpa, query_from=10), torch.no_grad():
        sdpa(input_ids=ids, attention_mask=mask)
