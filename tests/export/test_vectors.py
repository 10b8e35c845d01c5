"""The shared test vectors of the Android app's JVM module (android_demo/core) are current and right.

The Kotlin tests (android_demo/core/test.sh) check the app's logic against these files; here the files
are regenerated and must equal the committed copy byte for byte, so a change on the Python side
(preprocessing, tokenizer, bundle reader, decode loop) that is not mirrored fails until the vectors are
regenerated — and then the Kotlin tests show whether the app still agrees.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from alignkd.data.image import load_image, preprocess
from alignkd.export.bundle import Refusal, read_manifest
from export_vectors import CONFIGS, apply_ops, verdict, write_vectors
from fake_runtime import FakeRuntime

COMMITTED = Path(__file__).resolve().parents[2] / "android_demo" / "core" / "src" / "test" / "resources" / "vectors"
REGENERATE = ".venv/bin/python tests/export/helpers/export_vectors.py android_demo/core/src/test/resources/vectors " \
             "(after removing it)"


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return write_vectors(tmp_path_factory.mktemp("vectors") / "v")


def test_committed_vectors_equal_a_fresh_generation(fresh):
    want, got = _files(fresh), _files(COMMITTED)
    assert sorted(got) == sorted(want), f"file lists differ; regenerate: {REGENERATE}"
    stale = [name for name in want if want[name].read_bytes() != got[name].read_bytes()]
    assert not stale, f"stale vectors {stale}; regenerate: {REGENERATE}"


def test_vectors_stay_small():
    total = sum(p.stat().st_size for p in _files(COMMITTED).values())
    assert total < 1024 * 1024, f"vectors are {total} bytes; keep them under 1 MiB"


# What each committed bundle variant must get, stated here rather than taken from the reader that wrote the vectors.
EXPECTED_VERDICTS = {
    "ok": ["ok", "extra_file_on_disk", "format_version_float", "dot_segment_path"],
    "missing_manifest": ["missing_manifest"],
    "bad_json": ["truncated_json", "trailing_comma", "invalid_utf8", "utf8_bom"],  # RFC 8259: no byte-order mark
    "wrong_format": ["wrong_format", "no_format"],
    "unknown_version": ["unknown_version", "version_as_string", "format_version_true"],
    "missing_field": ["missing_files_field", "missing_artifacts_field", "missing_model_field"],
    "invalid_field": ["files_not_a_list", "model_not_an_object", "file_entry_without_sha256", "file_size_as_string",
                      "artifacts_of_strings", "artifacts_of_empty_objects", "model_empty_object",
                      "max_seq_len_as_string", "parity_passed_as_string", "parity_passed_missing", "options_as_string"],
    "path_outside": ["absolute_path", "dotdot_path", "backslash_path", "colon_path", "empty_path",
                     "artifact_path_outside"],
    "missing_file": ["missing_file"],
    "size_mismatch": ["size_mismatch", "listed_size_wrong"],
    "checksum_mismatch": ["checksum_mismatch"],
    "artifact_not_listed": ["artifact_not_listed"],
}


def test_bundle_verdicts_are_the_python_readers(tmp_path):
    spec = json.loads((COMMITTED / "bundles.json").read_text())
    base = COMMITTED / spec["base"]
    assert read_manifest(base)["format"] == "alignkd-bundle"
    seen = set()
    for v in spec["variants"]:
        root = tmp_path / v["name"]
        shutil.copytree(base, root)
        apply_ops(root, v["ops"])
        assert verdict(root) == v["verdict"], v["name"]
        seen.add(v["verdict"])
    # every refusal the reader has is covered, and some accepted variants too
    assert seen == {"ok"} | {r.value for r in Refusal} == set(EXPECTED_VERDICTS)
    assert {v["name"]: v["verdict"] for v in spec["variants"]} == {
        name: verdict for verdict, names in EXPECTED_VERDICTS.items() for name in names}


def test_image_vectors_are_the_preprocessing_output():
    spec = json.loads((COMMITTED / "images.json").read_text())
    assert {k: c.to_dict() for k, c in CONFIGS.items()} == spec["configs"]
    for e in spec["images"]:
        img = load_image(COMMITTED / "images" / e["file"])
        x = preprocess(img, CONFIGS["tiny48"]).numpy()
        r = e["results"]["tiny48"]
        np.testing.assert_allclose(x.reshape(3, -1).astype(np.float64).mean(1), r["mean"], rtol=0, atol=1e-12)
        if "pixels_chw" in r:
            assert np.array_equal(np.asarray(r["pixels_chw"], np.float32), x.reshape(-1))
    # the JPEG's lossless twin is PIL's decode of it
    jpg, png = (np.asarray(load_image(COMMITTED / "images" / f)) for f in ("photo.jpg", "photo.decoded.png"))
    assert np.array_equal(jpg, png)


def test_tokenizer_vectors_match_the_transformers_path():
    from alignkd.data.tokenize import encode_text
    from alignkd.model.tokenizer import load_tokenizer, tiny_tokenizer_dir

    tok = load_tokenizer(tiny_tokenizer_dir())
    spec = json.loads((COMMITTED / "tokenizer.json").read_text())
    for t in spec["texts"]:
        assert encode_text(t["text"], tok) == t["ids"], t["text"]
    assert any(-200 in p["ids"] for p in spec["prompts"]) and any(-200 not in p["ids"] for p in spec["prompts"])


def test_fake_runtime_refuses_a_wrong_start_position():
    rt = FakeRuntime(16, 2, 2, None)
    rt.decode(np.zeros((3, 4), np.float32), 0)
    with pytest.raises(ValueError, match="cache holds 3"):
        rt.decode(np.zeros((1, 4), np.float32), 5)


def test_ops_round_trip(tmp_path):
    (tmp_path / "a").write_text("x")
    apply_ops(tmp_path, [{"op": "delete", "path": "a"},
                         {"op": "write", "path": "d/b", "base64": base64.b64encode(b"yz").decode()}])
    assert not (tmp_path / "a").exists() and (tmp_path / "d" / "b").read_bytes() == b"yz"
