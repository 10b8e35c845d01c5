"""MobileVLMConfig's own checks on config.json fields, and what `image_aspect_ratio` does to the pixels."""

from __future__ import annotations

import pytest

from alignkd.data.image import image_config
from alignkd.errors import ConfigError
from alignkd.model import MobileVLMConfig, get_preset

TINY = get_preset("tiny-student")


def _from(**changes) -> MobileVLMConfig:
    return MobileVLMConfig.from_mtgv_dict({**TINY.to_mtgv_dict(), **changes}, TINY.vision, where="ck/config.json")


@pytest.mark.parametrize("value, pad", [("pad", True), ("square", False), (None, False)])
def test_image_aspect_ratio_pads_only_for_pad(value, pad):
    assert image_config(_from(image_aspect_ratio=value)).pad_to_square is pad  # null: LLaVA's "no padding"


def test_unknown_image_aspect_ratio_is_refused_not_read_as_no_padding():
    for bad in ("stretch", "anyres", 5):
        with pytest.raises(ConfigError, match=rf"^ck/config.json: image_aspect_ratio {bad!r} is not supported"):
            _from(image_aspect_ratio=bad)
    with pytest.raises(ConfigError, match="image_aspect_ratio 'stretch'"):
        TINY.replace(image_aspect_ratio="stretch")


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": 60}, r"hidden_size / num_attention_heads = 15 must be even"),  # RoPE: even rotary dim
    ({"hidden_size": 66}, r"hidden_size \(66\) must divide by num_attention_heads \(4\)"),
    ({"num_key_value_heads": 3}, r"num_attention_heads by num_key_value_heads \(3\)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),  # LLaMA is built with silu: no other model
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a positive number"),
])
def test_text_fields_that_transformers_would_refuse_or_ignore(changes, match):
    with pytest.raises(ConfigError, match=rf"^ck/config.json: .*{match}"):
        _from(**changes)


def test_kv_heads_that_divide_the_heads_are_fine():
    assert _from(num_key_value_heads=2).text.num_kv_heads == 2
