"""The teacher cache format and builder: round trips, content keys, resumable builds split over ranks, and
every bad cache (missing, truncated, incomplete, of another run) refused naming the file and the field."""

import dataclasses
import json

import pytest
import torch

from alignkd.train.teacher_cache import (
    MANIFEST,
    CacheError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    build,
    finalize,
    image_digest,
    pending,
    rank_of,
    sample_key,
    teacher_fingerprint,
)

SPEC = CacheSpec(teacher={"config_sha256": "c", "weights_fingerprint": "w"}, k=4, temperature=1.0,
                 kd_positions="text", template="v1", vocab_size=512)


def _key(i: int) -> bytes:
    return sample_key("v1", [1, i], [-100, i], None)


def _rows(seed: int, n: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, 512, generator=g), -1).topk(k, -1)
    return logp.values, logp.indices


def _write(root, n_samples: int, shard_samples: int = 2, stop_before_last_flush: bool = False, spec=SPEC, rank=0):
    w = CacheWriter(root, spec, rank=rank, shard_samples=shard_samples)
    done = w.done_keys()
    for i in range(n_samples):
        if _key(i) not in done:
            w.add(_key(i), *_rows(i, n=i % 3, k=spec.k))  # 0-2 KD positions per sample
    if not stop_before_last_flush:
        w.flush()
    return w


def test_round_trip_and_bytes_per_kd_position(tmp_path):
    _write(tmp_path, 5)
    m = finalize(tmp_path, SPEC)
    assert (m["samples"], m["rows"], m["complete"]) == (5, 0 + 1 + 2 + 0 + 1, True)
    cache = TeacherCache(tmp_path, SPEC)
    assert len(cache) == 5 and _key(9) not in cache
    for i in range(5):
        logp, ids = cache.lookup(_key(i))
        ref_logp, ref_ids = _rows(i, n=i % 3)
        assert logp.dtype == torch.float32 and ids.dtype == torch.int64 and logp.shape == (i % 3, 4)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logp, ref_logp.half().float())  # stored in float16
    rows = cache.rows([_key(2), _key(0), _key(4)])  # batch order; sample 0 has no KD position
    assert rows["counts"].tolist() == [2, 0, 1] and rows["ids"].shape == (3, 4)
    assert torch.equal(rows["ids"], torch.cat([_rows(2, 2)[1], _rows(4, 1)[1]]))
    # k = 4: 4 × (2-byte log-prob + 2-byte id) per position, plus the shards' keys, offsets and headers
    assert 16 <= cache.bytes_per_row() < 16 + 400


def test_probabilities_below_float16_are_stored_as_its_smallest_log_and_read_as_zero(tmp_path):
    """At a small temperature (1e-30) most top-k log-probs are -inf, or below float16's range: the shard keeps
    float16's smallest value (finite, so the lookup's corruption check passes) and exp gives 0 as before."""
    w = CacheWriter(tmp_path, SPEC, shard_samples=1)
    w.add(_key(0), torch.tensor([[0.0, -1e5, float("-inf"), -3.0]]), torch.tensor([[5, 6, 7, 8]]))
    finalize(tmp_path, SPEC)
    logp, ids = TeacherCache(tmp_path, SPEC).lookup(_key(0))
    assert logp.tolist() == [[0.0, -65504.0, -65504.0, -3.0]] and ids.tolist() == [[5, 6, 7, 8]]
    assert logp.exp().tolist()[0][:3] == [1.0, 0.0, 0.0]


def test_a_killed_build_resumes_from_its_last_whole_shard(tmp_path):
    _write(tmp_path, 5, shard_samples=2, stop_before_last_flush=True)  # killed: sample 4 never written
    assert CacheWriter(tmp_path, SPEC).done_keys() == {_key(i) for i in range(4)}
    w = _write(tmp_path, 5, shard_samples=2)  # the rerun adds only what is missing
    assert [s["samples"] for s in w.shards] == [2, 2, 1]
    finalize(tmp_path, SPEC)
    assert len(TeacherCache(tmp_path, SPEC)) == 5


def test_ranks_split_by_key_and_finalize_gathers_every_rank(tmp_path):
    keys = [_key(i) for i in range(40)] + [_key(3)]  # sample 3 twice in the data: computed once
    shares = []
    for rank in range(3):
        todo, share = pending(keys, CacheWriter(tmp_path, SPEC, rank=rank), rank, world=3)
        assert all(rank_of(k, 3) == rank for k in todo.values()) and share == len(todo)
        shares.append(set(todo.values()))
        w = CacheWriter(tmp_path, SPEC, rank=rank, shard_samples=4)
        for i, key in todo.items():
            w.add(key, *_rows(i % 40, n=i % 3))
        w.flush()
    assert set().union(*shares) == set(keys) and sum(map(len, shares)) == 40 and all(len(s) > 5 for s in shares)
    finalize(tmp_path, SPEC)
    assert len(TeacherCache(tmp_path, SPEC)) == 40
    # a rerun on another number of ranks finds every sample done
    assert pending(keys, CacheWriter(tmp_path, SPEC), 0, 1) == ({}, 40)


def test_a_cache_for_another_run_is_refused_naming_the_difference_and_left_untouched(tmp_path):
    _write(tmp_path, 3)
    finalize(tmp_path, SPEC)
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    other = dataclasses.replace(SPEC, k=8)
    with pytest.raises(CacheError, match=r"another run \(cache.json\): k: cache 4, run 8$"):
        TeacherCache(tmp_path, other)
    with pytest.raises(CacheError, match=r"another run \(cache.json\): k: cache 4, run 8$"):
        CacheWriter(tmp_path, other)  # nothing is written into it
    teacher = dataclasses.replace(SPEC, teacher={"config_sha256": "c", "weights_fingerprint": "x"})
    with pytest.raises(CacheError, match="teacher: cache .*'w'.*, run .*'x'"):
        TeacherCache(tmp_path, teacher)
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before


def test_a_killed_build_of_another_run_is_refused_too(tmp_path):
    _write(tmp_path, 3, stop_before_last_flush=True)  # no cache.json yet, only progress-r0.json
    positions = dataclasses.replace(SPEC, kd_positions="tokens")
    with pytest.raises(CacheError, match=r"\(progress-r0.json\): kd_positions: cache 'text', run 'tokens'"):
        CacheWriter(tmp_path, positions)


def test_truncated_missing_and_incomplete_caches_are_refused_naming_the_file(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        TeacherCache(tmp_path / "nope", SPEC)
    _write(tmp_path, 6)
    with pytest.raises(CacheError, match=f"no {MANIFEST}"):
        TeacherCache(tmp_path, SPEC)
    m = finalize(tmp_path, SPEC)
    (tmp_path / MANIFEST).write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(CacheError, match="is incomplete: rerun"):
        TeacherCache(tmp_path, SPEC)
    finalize(tmp_path, SPEC)
    shard = sorted(tmp_path.glob("shard-*"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 3])
    with pytest.raises(CacheError, match=f"{shard.name} has {len(data) - 3} bytes.*truncated"):
        TeacherCache(tmp_path, SPEC)
    shard.write_bytes(b"\0" * len(data))  # the right size, garbage inside
    with pytest.raises(CacheError, match=f"{shard.name} is unreadable"):
        TeacherCache(tmp_path, SPEC)
    for n in (2**62, 2**64 - 1):  # a header length beyond the file: refused, not allocated
        shard.write_bytes(n.to_bytes(8, "little") + data[8:])
        with pytest.raises(CacheError, match=f"{shard.name} is unreadable \\(its header length {n} is beyond"):
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
    base = sample_key("v1", [1, 2, 3], [-100, 2, 3], image_digest(img))
    copy = tmp_path / "b.png"
    copy.write_bytes(img.read_bytes())
    assert base == sample_key("v1", [1, 2, 3], [-100, 2, 3], image_digest(copy))  # the content counts, not the path
    assert base != sample_key("plain", [1, 2, 3], [-100, 2, 3], image_digest(img))
    assert base != sample_key("v1", [1, 2, 4], [-100, 2, 3], image_digest(img))
    assert base != sample_key("v1", [1, 2, 3], [-100, -100, 3], image_digest(img))
    assert base != sample_key("v1", [1, 2, 3], [-100, 2, 3], None)
    img.write_bytes(b"\x89PNG two")
    assert base != sample_key("v1", [1, 2, 3], [-100, 2, 3], image_digest(img))


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
    from alignkd.train.teacher_cache import dataset_keys

    teacher, student = build_model("tiny-teacher", seed=1), build_model("tiny-student", seed=2)
    tok = load_tokenizer(tiny_tokenizer_dir())
    ds = easyvqa_dataset("train", tok, image_config(student.config), 512, 144, "v1", limit=6, seed=0)
    spec = CacheSpec(teacher={"config_sha256": "t", "weights_fingerprint": "t"}, k=512, temperature=2.0,
                     kd_positions="text", template="v1", vocab_size=512)
    keys = dataset_keys(ds, "v1")
    writer = CacheWriter(tmp_path, spec)
    todo, share = pending(keys, writer)
    summary = build(teacher, ds, writer, todo, batch_size=4, progress=False, total=share)
    finalize(tmp_path, spec)
    assert summary["computed"] == 6 and summary["kd_positions"] > 0
    cache = TeacherCache(tmp_path, spec)
    batch = collate([ds[i] for i in (5, 0, 3)], 0)  # another order and batch size than the build's
    with torch.no_grad():
        s = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"], compute_loss=False)
        t = teacher(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], compute_loss=False)
    online = kd_loss(s.logits, t.logits, s.labels, s.attention_mask, 2.0, "text")
    pos = kd_positions_mask(s.labels, s.attention_mask, "text")
    rows = cache.rows([keys[i] for i in (5, 0, 3)])
    assert rows["counts"].tolist() == pos.sum(1).tolist()
    cached = topk_kd_loss(s.logits[pos], rows["logprobs"], rows["ids"], 2.0)
    torch.testing.assert_close(cached, online, rtol=2e-3, atol=1e-4)  # the cache stores float16 log-probs
