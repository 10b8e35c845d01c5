import dataclasses

import pytest
import torch

from alignkd.train.teacher_cache import (
    MANIFEST,
    CacheError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    finalize,
    sample_key,
    teacher_fingerprint,
)

SPEC = CacheSpec(teacher={"config_sha256": "c", "weights_fingerprint": "w"}, k=4, temperature=1.0,
                 kd_positions="text", template="v1", vocab_size=512)


def _rows(seed: int, n: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, 512, generator=g), -1).topk(k, -1)
    return logp.values, logp.indices


def _write(root, n_samples: int, shard_samples: int = 2, stop_before_last_flush: bool = False):
    w = CacheWriter(root, SPEC, shard_samples=shard_samples)
    done = w.done_keys()
    for i in range(n_samples):
        key = sample_key("v1", [1, i], [-100, i], None)
        if key not in done:
            w.add(key, *_rows(i, n=i % 3 + 1))  # 1-3 KD positions per sample, one sample with the k of the spec
    if not stop_before_last_flush:
        w.flush()
    return w


def test_round_trip_and_bytes_per_kd_position(tmp_path):
    _write(tmp_path, 5)
    finalize(tmp_path, SPEC)
    cache = TeacherCache(tmp_path, SPEC)
    assert len(cache) == 5
    for i in range(5):
        logp, ids = cache.lookup(sample_key("v1", [1, i], [-100, i], None))
        ref_logp, ref_ids = _rows(i, n=i % 3 + 1)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logp, ref_logp.half().float())  # stored in float16
    # k = 4: 4 × (2-byte log-prob + 2-byte id) per position, plus the shards' keys, offsets and headers
    assert 16 <= cache.bytes_per_row() < 16 + 200


def test_a_killed_build_resumes_from_its_last_whole_shard(tmp_path):
    _write(tmp_path, 5, shard_samples=2, stop_before_last_flush=True)  # killed: sample 4 never written
    assert CacheWriter(tmp_path, SPEC).done_keys() == {sample_key("v1", [1, i], [-100, i], None) for i in range(4)}
    w = _write(tmp_path, 5, shard_samples=2)  # the rerun adds only what is missing
    assert sum(s["samples"] for s in w.shards) == 5
    finalize(tmp_path, SPEC)
    assert len(TeacherCache(tmp_path, SPEC)) == 5


def test_a_cache_for_another_run_is_refused_naming_the_difference_and_left_untouched(tmp_path):
    _write(tmp_path, 3)
    finalize(tmp_path, SPEC)
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.iterdir())
    other = dataclasses.replace(SPEC, k=8)
    with pytest.raises(CacheError, match=r"another run: k: cache 4, run 8"):
        TeacherCache(tmp_path, other)
    with pytest.raises(CacheError, match=r"another run: k: cache 4, run 8"):
        CacheWriter(tmp_path, other)  # nothing is written into it
    teacher = dataclasses.replace(SPEC, teacher={"config_sha256": "c", "weights_fingerprint": "x"})
    with pytest.raises(CacheError, match="teacher"):
        TeacherCache(tmp_path, teacher)
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.iterdir()) == before


def test_truncated_missing_and_incomplete_caches_are_refused_naming_the_file(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        TeacherCache(tmp_path / "nope", SPEC)
    _write(tmp_path, 3)
    with pytest.raises(CacheError, match=f"no {MANIFEST}"):
        TeacherCache(tmp_path, SPEC)
    finalize(tmp_path, SPEC)
    shard = sorted(tmp_path.glob("shard-*"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=f"{shard.name} has {len(data) // 2} bytes.*truncated"):
        TeacherCache(tmp_path, SPEC)
    shard.unlink()
    with pytest.raises(CacheError, match=f"{shard.name} is missing"):
        TeacherCache(tmp_path, SPEC)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        TeacherCache(tmp_path, SPEC)


def test_sample_keys_follow_content(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG one")
    base = sample_key("v1", [1, 2, 3], [-100, 2, 3], img)
    assert base == sample_key("v1", [1, 2, 3], [-100, 2, 3], img)
    copy = tmp_path / "b.png"
    copy.write_bytes(img.read_bytes())
    assert base == sample_key("v1", [1, 2, 3], [-100, 2, 3], copy)  # the content counts, not the path
    assert base != sample_key("plain", [1, 2, 3], [-100, 2, 3], img)
    assert base != sample_key("v1", [1, 2, 4], [-100, 2, 3], img)
    assert base != sample_key("v1", [1, 2, 3], [-100, -100, 3], img)
    img.write_bytes(b"\x89PNG two")
    assert base != sample_key("v1", [1, 2, 3], [-100, 2, 3], img)


def test_teacher_fingerprint_changes_with_the_weights(tmp_path):
    from alignkd.model import build_model, save_model

    m = build_model("tiny-teacher", seed=0)
    save_model(m, tmp_path / "t")
    a = teacher_fingerprint(tmp_path / "t")
    assert a == teacher_fingerprint(tmp_path / "t")
    with torch.no_grad():  # another teacher of the same architecture (e.g. fine-tuned further)
        for p in m.parameters():
            p.add_(1e-3)
    save_model(m, tmp_path / "t")
    b = teacher_fingerprint(tmp_path / "t")
    assert a["config_sha256"] == b["config_sha256"] and a["weights_fingerprint"] != b["weights_fingerprint"]


def test_cached_kd_at_k_equal_to_the_vocabulary_equals_online_kd(tmp_path):
    """Build a cache with a tiny teacher over a few easy-vqa samples; the student's KD from the cache
    (k = vocabulary) equals KD against the teacher's logits computed online, batch by batch."""
    from alignkd.data.datasets import collate, easyvqa_dataset
    from alignkd.data.image import image_config
    from alignkd.distill.losses import kd_loss, kd_positions_mask
    from alignkd.distill.topk import topk_kd_loss
    from alignkd.model import build_model
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir
    from alignkd.train.teacher_cache import build, dataset_keys

    teacher, student = build_model("tiny-teacher", seed=1), build_model("tiny-student", seed=2)
    tok = load_tokenizer(tiny_tokenizer_dir())
    ds = easyvqa_dataset("train", tok, image_config(student.config), 512, 144, "v1", limit=6, seed=0)
    spec = CacheSpec(teacher={"config_sha256": "t", "weights_fingerprint": "t"}, k=512, temperature=2.0,
                     kd_positions="text", template="v1", vocab_size=512)
    summary = build(teacher, ds, tmp_path, spec, batch_size=4, progress=False)
    finalize(tmp_path, spec)
    assert summary["computed"] == 6 and summary["kd_positions"] > 0
    cache, keys = TeacherCache(tmp_path, spec), dataset_keys(ds, "v1")
    batch = collate([ds[i] for i in (5, 0, 3)], 0)  # another order and batch size than the build's
    with torch.no_grad():
        s = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"], compute_loss=False)
        t = teacher(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], compute_loss=False)
    online = kd_loss(s.logits, t.logits, s.labels, s.attention_mask, 2.0, "text")
    pos = kd_positions_mask(s.labels, s.attention_mask, "text")
    rows = [cache.lookup(keys[i]) for i in (5, 0, 3)]
    cached = topk_kd_loss(s.logits[pos], torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), 2.0)
    torch.testing.assert_close(cached, online, rtol=2e-3, atol=1e-4)  # the cache stores float16 log-probs
