"""mtgv checkpoints: save → load, original naming from .bin shards and safetensors, bad checkpoints."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from alignkd.errors import CheckpointError, ConfigError
from alignkd.model import load_config, load_model, save_model
from alignkd.model.checkpoint import to_mtgv_name

IDS = torch.tensor([[1, -200, 17, 23, 9]])


def _logits(model, pixels):
    with torch.no_grad():
        return model(IDS, pixel_values=pixels[:1]).logits


def test_save_load_identical_logits(tiny_student, pixels, tmp_path):
    out = save_model(tiny_student, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mobilevlm" and cfg["mm_projector_type"] == "ldpnetv2"
    assert cfg["mm_vision_tower"] == "vision_tower" and (out / "vision_tower" / "config.json").is_file()
    loaded = load_model(out)
    assert loaded.config == tiny_student.config
    torch.testing.assert_close(_logits(loaded, pixels), _logits(tiny_student, pixels), rtol=0, atol=0)
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # the temp dir was renamed into place


def _write_original_layout(model, d, fmt: str, shards: int = 2):
    """A directory as the original code writes it: mtgv names incl. `vision_model.`, position_ids buffer."""
    save_model(model, d)  # for config.json + vision_tower/
    (d / "model.safetensors").unlink()
    state = {to_mtgv_name(k): v.clone() for k, v in model.state_dict().items()}
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in state
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    names = sorted(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        if fmt == "bin":
            fname = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in part}, d / fname)
        else:
            fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous() for k in part}, str(d / fname))
        weight_map.update({k: fname for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_the_study_preset_keeps_its_pooling_and_tower_depth(pixels, tmp_path):
    from alignkd.model.checkpoint import build_model

    model = build_model("tiny-student-36", seed=0, dtype=torch.float32)
    out = save_model(model, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["alignkd_pooled_grid"] == 6  # MobileVLM's has no key: 12
    loaded = load_model(out)
    assert loaded.config == model.config and loaded.config.num_image_tokens == 36
    assert loaded.vision_tower.layers_used == 1
    torch.testing.assert_close(_logits(loaded, pixels), _logits(model, pixels), rtol=0, atol=0)
    for bad in (0, "6"):
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "alignkd_pooled_grid": bad}))
        with pytest.raises(ConfigError, match="alignkd_pooled_grid must be a positive integer"):
            load_model(out)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_original_naming_loads_from_shards(tiny_student, pixels, tmp_path, fmt):
    d = tmp_path / "orig"
    _write_original_layout(tiny_student, d, fmt)
    loaded = load_model(d)
    torch.testing.assert_close(_logits(loaded, pixels), _logits(tiny_student, pixels), rtol=0, atol=0)


def test_bin_is_loaded_with_weights_only(tiny_student, tmp_path):
    d = tmp_path / "evil"
    _write_original_layout(tiny_student, d, "bin", shards=1)

    marker = tmp_path / "pwned"

    class Boom:  # a pickle that would run code (make a folder) when unpickled without weights_only
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    shard = next(d.glob("pytorch_model-*.bin"))
    state = torch.load(shard, weights_only=True)
    state["lm_head.weight"] = Boom()
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(d)
    assert not marker.exists()


def test_bad_checkpoints_give_one_clear_error(tiny_student, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    good = save_model(tiny_student, tmp_path / "good")

    # truncated safetensors
    d = tmp_path / "trunc"
    save_model(tiny_student, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors \(truncated or corrupt"):
        load_model(d)

    # missing tensor
    from safetensors.torch import load_file

    d = tmp_path / "missing"
    save_model(tiny_student, d)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 tensor.*missing.*model.layers.1.mlp.up_proj.weight"):
        load_model(d)

    # wrong shape for the config
    d = tmp_path / "shape"
    save_model(tiny_student, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.\d.mlp.\w+_proj.weight' has shape \((176, 64|64, 176)\), the config needs \((200, 64|64, 200)\)"):
        load_model(d)

    # unknown projector / malformed config / unresolvable vision tower
    cfg = json.loads((good / "config.json").read_text())
    for change, err, msg in [
        ({"mm_projector_type": "mlp2x_gelu"}, ConfigError, "mm_projector_type 'mlp2x_gelu' is not supported"),
        ({"mm_vision_tower": "someone/clip-custom"}, ConfigError, "neither a local CLIP folder nor a known hub id"),
        ({"model_type": "bert"}, ConfigError, "not a MobileVLM config"),
    ]:
        (good / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(err, match=msg):
            load_model(good)
    (good / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(good)

    # no weights at all
    d = tmp_path / "empty"
    save_model(tiny_student, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(d)


def test_large_state_is_sharded(tiny_student, pixels, tmp_path, monkeypatch):
    import alignkd.model.checkpoint as ck

    monkeypatch.setattr(ck, "SHARD_BYTES", 200_000)
    d = save_model(tiny_student, tmp_path / "sharded")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(load_model(d), pixels), _logits(tiny_student, pixels), rtol=0, atol=0)


def test_real_vision_tower_id_resolves_offline(tmp_path):
    from alignkd.model.checkpoint import resolve_vision_config
    from alignkd.model.config import get_preset

    v = resolve_vision_config("openai/clip-vit-large-patch14-336", tmp_path)
    assert v == get_preset("mobilevlm-v2-1.7b").vision and v.grid == 24


@pytest.mark.parametrize("shard_bytes", [None, 200_000])
def test_a_full_disk_names_the_final_file_and_keeps_the_previous_checkpoint(tiny_student, tmp_path, monkeypatch,
                                                                             shard_bytes):
    import errno

    import alignkd.model.checkpoint as ck
    from alignkd.fileio import DiskFull

    out = save_model(tiny_student, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    if shard_bytes:
        monkeypatch.setattr(ck, "SHARD_BYTES", shard_bytes)
    calls, real = [], ck.save_file

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2 or not shard_bytes:  # the second shard, or the only file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full)
    name = "model-00002-of-" if shard_bytes else "model.safetensors"
    with pytest.raises(DiskFull, match=rf"^disk full while writing {out}/{name}.*: no space left on device$"):
        save_model(tiny_student, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left


def test_weights_digest_follows_the_weights_only(tiny_student, tmp_path):
    from alignkd.model.checkpoint import weights_digest

    a = save_model(tiny_student, tmp_path / "a")
    b = save_model(tiny_student, tmp_path / "b", extra_files={"notes.txt": b"other files do not count"})
    assert weights_digest(a) == weights_digest(b) and len(weights_digest(a)) == 64
    changed = load_model(a)
    with torch.no_grad():
        changed.lm.lm_head.weight[0, 0] += 1
    assert weights_digest(save_model(changed, tmp_path / "c")) != weights_digest(a)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_prefix_loads_only_its_tensors(tiny_teacher, pixels, tmp_path, monkeypatch, fmt):
    """num_layers=1: the vision tower, projector, embeddings and layer 0, with the full model's weights; the
    other tensors are never read (safetensors: per key), so a file without them loads the prefix alike."""
    import alignkd.model.checkpoint as ck
    from alignkd.distill import capture_layer0_attention

    d = tmp_path / "t"
    _write_original_layout(tiny_teacher, d, fmt)
    read = []
    real_open = ck.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            inner = self.f.__enter__()
            return type("F", (), {"keys": inner.keys, "get_slice": inner.get_slice,
                                  "get_tensor": lambda _, n: read.append(n) or inner.get_tensor(n)})()

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(ck, "safe_open", Recording)
    prefix = load_model(d, num_layers=1)
    lm = prefix.lm
    assert len(lm.model.layers) == 1 and not hasattr(lm, "lm_head") and prefix.config.text.num_layers == 1
    if fmt == "safetensors":
        assert read and not [n for n in read if n.startswith(("lm_head", "model.norm", "model.layers.1", "model.layers.2"))]
    full_state = tiny_teacher.state_dict()
    assert all(torch.equal(v, full_state[k]) for k, v in prefix.state_dict().items())
    with torch.no_grad(), capture_layer0_attention(tiny_teacher.lm) as a:
        tiny_teacher(IDS, pixel_values=pixels[:1])
    with torch.no_grad(), capture_layer0_attention(lm) as b:
        mm = prefix.build_inputs_embeds(IDS, None, None, prefix.encode_images(pixels[:1]))
        lm.model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, use_cache=False)
    assert torch.equal(a.probs, b.probs)  # layer 0 of the prefix is layer 0 of the whole model
    with pytest.raises(AttributeError, match="lm_head"):  # a prefix has no logits: its forward fails loudly
        prefix(IDS, pixel_values=pixels[:1])


def test_the_attention_map_inputs_give_layer_0s_map_and_hold_nothing_else_of_the_layer(tiny_teacher, pixels):
    from alignkd.distill import capture_layer0_attention, layer0_attention
    from alignkd.model.checkpoint import keep_attention_map_inputs, keep_layers

    model = copy.deepcopy(tiny_teacher)
    with pytest.raises(ConfigError, match="cut to layer 0 first"):
        keep_attention_map_inputs(model)
    keep_attention_map_inputs(keep_layers(model, 1))
    layer0 = {k for k in model.state_dict() if k.startswith("lm.model.layers.0.")}
    assert layer0 == {f"lm.model.layers.0.{n}.weight" for n in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj")}
    full_state = tiny_teacher.state_dict()
    assert set(full_state) - set(model.state_dict()) == {
        k for k in full_state if k.startswith(("lm.lm_head", "lm.model.norm", "lm.model.layers."))} - layer0
    with torch.no_grad(), capture_layer0_attention(tiny_teacher.lm, 3) as whole:
        tiny_teacher(IDS, pixel_values=pixels[:1])
    with torch.no_grad():
        mm = model.build_inputs_embeds(IDS, None, None, model.encode_images(pixels[:1]))
        got = layer0_attention(model.lm, mm.inputs_embeds, mm.attention_mask, 3)
    assert torch.equal(got, whole.probs)


def test_a_prefix_still_checks_every_tensor_of_the_files(tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    d = save_model(tiny_teacher, tmp_path / "t")
    state = load_file(str(d / "model.safetensors"))
    for k in [k for k in state if k.startswith(("lm_head", "model.layers.2"))]:
        del state[k]  # tensors the prefix never reads
    save_file(state, str(d / "model.safetensors"))
    assert len(load_model(d, num_layers=2).lm.model.layers) == 2
    with pytest.raises(CheckpointError, match="missing"):
        load_model(d)
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 3)  # a later tensor of the wrong shape
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.2.mlp.up_proj.weight' has shape \(3, 3\)"):
        load_model(d, num_layers=1)
    with pytest.raises(ConfigError, match="num_layers=4: the LM has 3 layers"):
        load_model(tmp_path / "t", num_layers=4)


V, P = "vision_tower/config.json", "vision_tower/preprocessor_config.json"


@pytest.mark.parametrize("rel, change, match", [
    ("config.json", {"mm_vision_tower": 5}, "mm_vision_tower must name a local CLIP folder or a hub id, got 5"),
    ("config.json", {"mm_vision_tower": None}, "mm_vision_tower must name .*, got None"),
    ("config.json", {"mm_vision_tower": ""}, "mm_vision_tower must name .*, got ''"),  # not the folder's own config
    ("config.json", {"hidden_act": "nope"}, "hidden_act 'nope' is not supported"),
    ("config.json", {"hidden_size": 60}, r"hidden_size / num_attention_heads = 15 must be even"),
    ("config.json", {"num_key_value_heads": 3}, r"hidden_size .* and num_attention_heads by num_key_value_heads \(3\)"),
    ("config.json", {"image_aspect_ratio": "stretch"}, "image_aspect_ratio 'stretch' is not supported"),
    ("config.json", {"image_aspect_ratio": 5}, "image_aspect_ratio 5 is not supported"),
    ("config.json", {"hidden_size": 10**12}, "hidden_size 1000000000000 is beyond any model's"),  # tensors overflow
    ("config.json", {"vocab_size": 10**30}, "vocab_size 10{30} is beyond any model.s"),
    (V, [1], "a JSON object of CLIP config fields was expected, got a list"),
    (V, {"vision_config": None}, "vision_config must be a JSON object"),
    (V, {"patch_size": 0}, "patch_size must be a positive integer, got 0"),
    (V, {"patch_size": 5}, "image_size 48 is not a multiple of patch_size 5"),
    (V, {"image_size": "48"}, "image_size must be a positive integer, got '48'"),
    (V, {"image_size": -48}, "image_size must be a positive integer, got -48"),
    (V, {"num_attention_heads": 5}, "hidden_size 64 must divide by num_attention_heads 5"),
    (V, {"layer_norm_eps": "1e-5"}, "layer_norm_eps must be a positive number"),
    (V, {"hidden_act": "nope"}, "hidden_act 'nope' is not an activation transformers knows"),
    (P, [1], "a JSON object of preprocessor fields was expected, got a list"),
    (P, {"image_mean": 5}, r"image_mean must be a list of 3 numbers \(R, G, B\), got 5"),
    (P, {"image_mean": [0.5, 0.5]}, r"image_mean must be a list of 3 numbers .*, got \[0.5, 0.5\]"),
    (P, {"image_std": [0.5, 0, 0.5]}, "image_std must be a list of 3 positive numbers"),
])
def test_bad_config_fields_name_the_file_and_field(ckpt, tmp_path, rel, change, match):
    """What a bad-input campaign found crashing (TypeError, KeyError...) or accepted: one ConfigError each."""
    d = shutil.copytree(ckpt, tmp_path / "ck")
    f = d / rel
    f.write_text(json.dumps({**json.loads(f.read_text()), **change} if isinstance(change, dict) else change))
    with pytest.raises(ConfigError, match=rf"/ck/{re.escape(rel)}: {match}"):
        load_config(d)


@pytest.mark.parametrize("index, match", [
    ([1, 2], r"weight_map must be a JSON object mapping tensor names to shard file names, got \[1, 2\]"),
    ({"weight_map": ["model.safetensors"]}, "weight_map must be a JSON object"),
    ({"metadata": {}}, "weight_map must be a JSON object .*, got None"),
    ({"weight_map": {"a": 5}}, "weight_map must map tensor names to shard file names .*, got 5"),
    ({"weight_map": {"a": "../ck/model.safetensors"}}, r"weight_map must map .* \(no paths\), got '../ck/model.safetensors'"),
    ({"weight_map": {"a": "/etc/model.safetensors"}}, r"weight_map must map .* \(no paths\), got '/etc/model.safetensors'"),
])
def test_a_malformed_shard_index_is_refused(ckpt, tmp_path, index, match):
    d = shutil.copytree(ckpt, tmp_path / "ck")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"/ck/model\.safetensors\.index\.json: {match}"):
        load_model(d)


def test_an_integer_weight_is_refused_not_cast(ckpt, tmp_path):
    from safetensors.torch import load_file

    d = shutil.copytree(ckpt, tmp_path / "ck")
    state = load_file(str(d / "model.safetensors"))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"/ck/model\.safetensors: tensor 'model.embed_tokens.weight' has "
                                              r"dtype torch.int32, a floating-point one is needed"):
        load_model(d, dtype=torch.float32)  # not cast to the asked dtype first
