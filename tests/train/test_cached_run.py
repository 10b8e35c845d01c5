"""Training from a teacher cache: the same loss terms as the online teacher (KD to float16 rounding at k = V,
L_att / V-all / V-focus exactly from the layer-0-only teacher), no teacher at all for logit-kd, and every
bad cache — another run's, incomplete for the data, truncated, of another layout — refused with one error
before any weights load or any step; a build that fails its check writes nothing; a killed build continues."""

from __future__ import annotations

import functools
import re
import json

import pytest
import torch

import alignkd.train.recipe as recipe
from alignkd.errors import ConfigError
from alignkd.model import build_model, save_model
from alignkd.train.config import load_config
from alignkd.train.recipe import build_teacher_cache, setup, train, train_step
from alignkd.train.teacher_cache import CacheError, CacheSpec, CacheWriter, TeacherCache, dataset_keys

TERMS = ("ce", "kd", "att", "v_all", "v_focus", "total", "grad_norm")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "t"
    save_model(build_model("tiny-teacher", seed=1), d)
    return d


@pytest.fixture()
def run_cfg(tmp_path, teacher_dir):
    """run_cfg(**keys): a small Align-KD config with a checkpoint-directory teacher; `__` is a group's dot."""

    def make(**kw):
        base = {"method": "alignkd", "teacher": str(teacher_dir), "steps": 3, "batch_size": 2, "data.limit": 10,
                "lr": 1e-3, "output_dir": str(tmp_path / "run"), "progress": False, "seed": 0}
        base.update({k.replace("__", "."): v for k, v in kw.items()})
        return load_config(flags=base)

    return make


def _no_weights(monkeypatch):
    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(recipe, "_load_student", never)
    monkeypatch.setattr(recipe, "_load_teacher", never)


def _listing(root):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir())


def test_a_cache_at_k_equal_to_the_vocabulary_gives_the_online_step(tmp_path, run_cfg):
    cache = tmp_path / "cache"
    summary = build_teacher_cache(run_cfg(teacher_cache=str(cache), loss__kd_topk=512))
    assert (summary["samples"], summary["computed_now"], summary["k"]) == (10, 10, 512)
    online = setup(run_cfg(output_dir=str(tmp_path / "online")))
    cached = setup(run_cfg(output_dir=str(tmp_path / "cached"), teacher_cache=str(cache)))  # k: the cache's
    # the cached run's teacher is what its layer-0 attention map reads: no later layer, no final norm, no LM head,
    # no value / output projection or MLP in layer 0
    t = cached.teacher
    assert len(t.lm.model.layers) == 1 and not hasattr(t.lm, "lm_head")
    assert not hasattr(t.lm.model.layers[0], "mlp") and not hasattr(t.lm.model.layers[0].self_attn, "v_proj")
    assert sum(p.numel() for p in t.parameters()) < sum(p.numel() for p in online.teacher.parameters()) - 512 * 128
    a, b = train_step(online), train_step(cached)
    for k in ("ce", "att", "v_all", "v_focus"):
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    for k in ("kd", "total", "grad_norm"):  # the cache holds float16 log-probs
        assert b[k] == pytest.approx(a[k], rel=2e-3), k
    assert a["kd"] > 0 and a["att"] > 0 and a["v_focus"] > 0
    a, b = train_step(online), train_step(cached)  # after one update from either KD, still the same run
    for k in TERMS:
        assert b[k] == pytest.approx(a[k], rel=2e-3), k


def test_logit_kd_from_a_cache_loads_no_teacher_and_matches_online_top_k(tmp_path, run_cfg):
    cache = str(tmp_path / "k8")
    build_teacher_cache(run_cfg(method="logit-kd", teacher_cache=cache, loss__kd_topk=8))
    cached = setup(run_cfg(method="logit-kd", teacher_cache=cache, loss__kd_topk=8, output_dir=str(tmp_path / "c")))
    online = setup(run_cfg(method="logit-kd", loss__kd_topk=8, output_dir=str(tmp_path / "o")))  # top-8 of live logits
    full = setup(run_cfg(method="logit-kd", output_dir=str(tmp_path / "f")))
    assert cached.teacher is None and online.teacher is not None
    a, b, f = train_step(online), train_step(cached), train_step(full)
    assert b["kd"] == pytest.approx(a["kd"], rel=2e-3) and b["ce"] == a["ce"]
    assert 0 < a["kd"] < f["kd"]  # the coarsened KL is below the full one (data-processing inequality)


def test_a_build_without_k_keeps_the_top_32_and_a_run_without_k_takes_the_caches(tmp_path, run_cfg):
    cache = str(tmp_path / "cache")
    summary = build_teacher_cache(run_cfg(teacher_cache=cache))
    assert summary["k"] == 32 and summary["bytes_per_kd_position"] < 200
    implicit = setup(run_cfg(teacher_cache=cache, output_dir=str(tmp_path / "i")))
    explicit = setup(run_cfg(teacher_cache=cache, loss__kd_topk=32, output_dir=str(tmp_path / "e")))
    assert implicit.cfg.loss.kd_topk is None and implicit.cache.spec.k == 32
    a, b = train_step(implicit), train_step(explicit)
    assert a == b and a["kd"] > 0


@pytest.mark.parametrize("change, said", [
    ({"loss__kd_topk": 8}, "k: cache 32, run 8"),
    ({"loss__temperature": 2.0}, "temperature: cache 1.0, run 2.0"),
    ({"loss__kd_positions": "tokens"}, "kd_positions: cache 'text', run 'tokens'"),
    ({"data__template": "plain"}, "template: cache 'v1', run 'plain'"),
    ({"teacher": "tiny-teacher"}, "teacher: cache {'config_sha256'"),
])
def test_a_cache_of_another_run_is_refused_before_any_weights_load(tmp_path, run_cfg, monkeypatch, change, said):
    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4))
    before = _listing(cache)
    _no_weights(monkeypatch)
    with pytest.raises(CacheError, match="made for another run \\(cache.json\\): " + said.replace("(", "\\(")) as e:
        setup(run_cfg(teacher_cache=str(cache), data__limit=4, **change))
    assert "\n" not in str(e.value)
    with pytest.raises(CacheError, match="made for another run"):  # nor is anything added to it
        build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4, **change))
    assert _listing(cache) == before


def test_a_cache_that_lacks_training_samples_fails_or_skips_them(tmp_path, run_cfg, monkeypatch):
    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=5))  # another subset of the data
    keys = dataset_keys(setup(run_cfg(method="baseline", teacher=None)).dataset, "v1")
    have = TeacherCache(cache, recipe.cache_spec(run_cfg(), recipe.config_from_name(run_cfg().teacher)))
    missing = [i for i, k in enumerate(keys) if k not in have]
    assert 0 < len(missing) < len(keys) == 10
    with monkeypatch.context() as m:
        _no_weights(m)
        with pytest.raises(CacheError, match=rf"lacks {len(missing)} of the 10 training samples, e\.g\. sample "
                                             rf"{missing[0]} \(image .*\.png\).*teacher_cache_missing=skip"):
            setup(run_cfg(teacher_cache=str(cache)))
    summary = train(run_cfg(teacher_cache=str(cache), teacher_cache_missing="skip", steps=2))
    assert summary["skipped_not_in_cache"] == len(missing) and summary["steps"] == 2
    run = setup(run_cfg(teacher_cache=str(cache), teacher_cache_missing="skip", output_dir=str(tmp_path / "r2")))
    assert len(run.dataset) == 10 - len(missing) and run.cache_skipped == len(missing)
    assert all(k in have for k in run.cache_keys)
    with pytest.raises(CacheError, match="lacks 10 of the 10"):  # nothing left to train on: never a silent skip
        setup(run_cfg(teacher_cache=str(cache), teacher_cache_missing="skip", seed=7, output_dir=str(tmp_path / "r3")))


@pytest.mark.parametrize("file", [7, None, "../elsewhere.safetensors", "/etc/passwd", ""])
def test_a_manifest_naming_a_shard_that_is_no_file_name_of_the_folder_is_refused(tmp_path, run_cfg, monkeypatch, file):
    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4))
    m = json.loads((cache / "cache.json").read_text())
    m["shards"][0]["file"] = file
    (cache / "cache.json").write_text(json.dumps(m))
    _no_weights(monkeypatch)
    with pytest.raises(CacheError, match="malformed manifest .*shard file .* is not a file name in the cache folder"):
        setup(run_cfg(teacher_cache=str(cache), data__limit=4))


@pytest.mark.parametrize("what", ["ids", "logprobs"])
def test_a_shard_with_values_no_teacher_makes_is_refused_at_its_lookup_naming_it(tmp_path, run_cfg, what):
    """Shards are memory-mapped, not hashed when opened: the values a lookup reads are checked (ids within the
    vocabulary, finite log-probs ≤ 0), so a corrupt shard fails naming itself instead of crashing a step."""
    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4))
    m = json.loads((cache / "cache.json").read_text())
    shard = cache / m["shards"][0]["file"]
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8:8 + header_len])
    begin, end = header[what]["data_offsets"]
    data = bytearray(shard.read_bytes())
    at = 8 + header_len + begin
    data[at:at + 2] = b"\xff\xff" if what == "ids" else b"\x00\x7e"  # uint16 65535 / float16 NaN
    shard.write_bytes(bytes(data))
    c = TeacherCache(cache, CacheSpec(**m["spec"]))  # opens: sizes and headers are whole
    with pytest.raises(CacheError, match=f"shard {shard.name} is corrupt"):
        for key in c:
            c.lookup(key)


def test_a_truncated_shard_is_refused_before_any_weights_load(tmp_path, run_cfg, monkeypatch):
    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache)))
    shard = next(cache.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    _no_weights(monkeypatch)
    with pytest.raises(CacheError, match=f"shard {shard.name} has .* bytes, the manifest says .*truncated"):
        setup(run_cfg(teacher_cache=str(cache)))
    with pytest.raises(CacheError, match="nope does not exist"):
        setup(run_cfg(teacher_cache=str(tmp_path / "nope")))


def test_rows_of_another_layout_are_refused_naming_the_sample(tmp_path, run_cfg):
    """A cache whose spec matches but whose rows are not this layout's KD positions (one row too many per
    sample): the step refuses it instead of pairing rows with the wrong positions."""
    cfg = run_cfg(teacher_cache=str(tmp_path / "cache"))
    run = setup(run_cfg(method="baseline", teacher=None))
    spec = recipe.cache_spec(cfg, recipe.config_from_name(cfg.teacher))
    w = CacheWriter(cfg.teacher_cache, spec)
    for s, key in zip(run.dataset.samples, dataset_keys(run.dataset, "v1")):
        n = sum(1 for x in s["labels"][1:] if x != -100) + 1
        w.add(key, torch.zeros(n, spec.k), torch.arange(spec.k).expand(n, spec.k))
    w.flush()
    recipe.finalize(cfg.teacher_cache, spec)
    with pytest.raises(CacheError, match=r"training sample \d+ has (\d+) cached KD positions, this run's token "
                                         r"layout gives it \d+: the cache was made for another layout"):
        train_step(setup(cfg))


def test_a_killed_build_continues_and_a_finished_one_loads_no_teacher(tmp_path, run_cfg, monkeypatch):
    from alignkd.model.mobilevlm import MobileVLM

    whole, killed = str(tmp_path / "whole"), tmp_path / "killed"
    build_teacher_cache(run_cfg(teacher_cache=whole, batch_size=2))
    monkeypatch.setattr(recipe, "CacheWriter", functools.partial(CacheWriter, shard_samples=2))
    calls, forward = [], MobileVLM.forward

    def dies_on_the_third_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return forward(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(MobileVLM, "forward", dies_on_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            build_teacher_cache(run_cfg(teacher_cache=str(killed), batch_size=2))
    assert sorted(p.name for p in killed.iterdir()) == ["progress-r0.json", "shard-r0-00000.safetensors",
                                                          "shard-r0-00001.safetensors"]  # whole shards, no temp
    again = build_teacher_cache(run_cfg(teacher_cache=str(killed), batch_size=2))
    assert (again["samples"], again["computed_now"]) == (10, 6)
    spec = recipe.cache_spec(run_cfg(), recipe.config_from_name(run_cfg().teacher))
    a, b = TeacherCache(whole, spec), TeacherCache(killed, spec)
    assert len(a) == len(b) == 10
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(a.lookup(key), b.lookup(key)))
    monkeypatch.setattr(recipe, "_load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert build_teacher_cache(run_cfg(teacher_cache=str(killed)))["computed_now"] == 0


def test_a_build_that_fails_before_its_first_shard_leaves_no_folder(tmp_path, run_cfg, monkeypatch):
    from alignkd.errors import CheckpointError

    def unreadable(*a, **k):
        raise CheckpointError("t/model.safetensors is truncated")

    monkeypatch.setattr(recipe, "_load_teacher", unreadable)
    with pytest.raises(CheckpointError):
        build_teacher_cache(run_cfg(teacher_cache=str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs: it stays
    with pytest.raises(CheckpointError):
        build_teacher_cache(run_cfg(teacher_cache=str(tmp_path / "mine")))
    assert (tmp_path / "mine").is_dir()


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_built(tmp_path, run_cfg, monkeypatch):
    from alignkd.errors import CheckpointError

    cache = tmp_path / "cache"
    build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4))
    before = _listing(cache)
    load_teacher = recipe._load_teacher

    def unreadable(*a, **k):
        raise CheckpointError("t/model.safetensors is truncated")

    monkeypatch.setattr(recipe, "_load_teacher", unreadable)
    with pytest.raises(CheckpointError):  # a teacher that does not load: the old cache is as it was
        build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4, loss__kd_topk=8), overwrite=True)
    assert _listing(cache) == before
    monkeypatch.setattr(recipe, "_load_teacher", load_teacher)
    setup(run_cfg(teacher_cache=str(cache), data__limit=4, output_dir=str(tmp_path / "r")))  # and still reads
    summary = build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=4, loss__kd_topk=8), overwrite=True)
    assert summary["k"] == 8 and summary["computed_now"] == summary["samples"] == 4
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # nothing of the old one is kept


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_other_files_is_no_cache_folder_even_with_overwrite(tmp_path, run_cfg, teacher_dir, monkeypatch,
                                                                        overwrite):
    """A build wrote its shards into the teacher's checkpoint folder, or beside a user's own files."""
    _no_weights(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for folder, named in ((teacher_dir, "config.json"), (mine, "thesis.tex")):
        before = _listing(folder)
        with pytest.raises(CacheError, match=f"teacher cache folder {folder} holds files that no cache build writes "
                                             f"\\(.*{named}.*\\): name a new or empty folder"):
            build_teacher_cache(run_cfg(teacher_cache=str(folder)), overwrite=overwrite)
        assert _listing(folder) == before


def test_cache_settings_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="teacher_cache needs loss.kd_positions text or tokens"):
        load_config(None, ["teacher=t", "teacher_cache=c", "loss.variant=release"])
    with pytest.raises(ConfigError, match="teacher_cache_missing must be one of fail, skip"):
        load_config(None, ["teacher=t", "teacher_cache_missing=ignore"])
    with pytest.raises(ConfigError, match="loss: kd_tail must be one of rest, renorm"):
        load_config(None, ["teacher=t", "loss.kd_tail=x"])
    with pytest.raises(ConfigError, match="loss: kd_topk must be >= 1"):
        load_config(None, ["teacher=t", "loss.kd_topk=0"])
    cfg = load_config(None, ["teacher=tiny-teacher", "loss.kd_topk=513"])
    with pytest.raises(ConfigError, match="loss.kd_topk=513 is larger than the vocabulary \\(512\\)"):
        recipe.build_teacher_cache(cfg.replace(teacher_cache="c"))
    # a release-variant run without a cache, and a baseline with one (it ignores it), are fine
    load_config(None, ["teacher=t", "loss.variant=release"])
    load_config(None, ["method=baseline", "teacher_cache=c", "loss.variant=release"])


@pytest.mark.parametrize("positions", ["text", "tokens"])
def test_a_build_says_its_size_before_the_teacher_loads_and_warns_of_a_small_disk(tmp_path, run_cfg, monkeypatch,
                                                                                   capsys, positions):
    cache = tmp_path / "cache"
    loads = []
    real_load = recipe._load_teacher
    monkeypatch.setattr(recipe, "_load_teacher", lambda *a, **k: loads.append(capsys.readouterr().err) or real_load(*a, **k))
    free = type("Usage", (), {"free": 1000})
    monkeypatch.setattr(recipe.shutil, "disk_usage", lambda p: free)
    summary = build_teacher_cache(run_cfg(teacher_cache=str(cache), data__limit=6, loss__kd_positions=positions))
    said = loads[0].splitlines()  # what was printed before the teacher's weights were read
    rows, size = summary["kd_positions"], summary["bytes"]
    m = re.fullmatch(rf"teacher cache {cache}: 6 samples to compute, (\d+) KD positions: about ([\d.]+) KiB at k = 32",
                     said[0])
    assert m and int(m[1]) == rows  # counted from the tokens: what the teacher's build then wrote
    assert size - 1024 < float(m[2]) * 1024 <= size  # the shards less their headers
    assert said[1] == (f"warning: {cache}'s disk has 1000 bytes free, less than the build needs: it will stop when the "
                       "disk is full (finished shards are kept: free space and rerun to continue)")
