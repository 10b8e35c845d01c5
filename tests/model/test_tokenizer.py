"""The packaged tiny tokenizer and load_tokenizer: HF ids must equal SentencePiece's own ids."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import types

import pytest
from transformers import AutoTokenizer

from alignkd.errors import CheckpointError, ConfigError
from alignkd.model.tokenizer import check_tokenizer_matches, load_tokenizer, tiny_tokenizer_dir

TINY_SHA256 = "a339764464177653f0d655e767c2bb5914e4e23fb32bb86f6dc30d5ac92f6f56"

STRINGS = [
    "\n", "\nWhat color is the shape?", "hello", " hello", "  hello  ", "a  b   c", "123 4567 3.14",
    "héllo wörld 你好 🙂", "USER: ", "a\n\nb", " ", "\t tab", "does the image contain a red shape?",
    "A chat between a curious user and an artificial intelligence assistant. USER: ", "▁literal",
]


def _random_strings(n: int) -> list[str]:
    rnd = random.Random(0)
    alphabet = "abcdeABC XYZ 0123456789\n\t.,?!'\"éü你🙂▁_-"
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40))) for _ in range(n)]


def test_asset_is_the_documented_model(sp):
    data = (tiny_tokenizer_dir() / "tokenizer.model").read_bytes()
    assert hashlib.sha256(data).hexdigest() == TINY_SHA256
    assert TINY_SHA256 in (tiny_tokenizer_dir() / "README.md").read_text()
    assert sp.get_piece_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)


def test_build_is_deterministic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_build", tiny_tokenizer_dir() / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    corpus = (tiny_tokenizer_dir() / "corpus.txt").read_text(encoding="utf-8")
    assert hashlib.sha256(build.train(corpus)).hexdigest() == TINY_SHA256
    assert build.build_corpus() == corpus
    assert len(corpus.encode()) < 100_000


def test_special_tokens(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) == 512
    assert tok("a b")["input_ids"][0] == 1 and tok("a b")["input_ids"][-1] != 2


@pytest.mark.parametrize("loader", ["load_tokenizer", "AutoTokenizer"])
def test_ids_equal_sentencepiece(sp, loader):
    d = tiny_tokenizer_dir()
    tok = load_tokenizer(d) if loader == "load_tokenizer" else AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    for s in STRINGS + _random_strings(1000):
        expected = sp.encode(s)
        assert tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"] == expected, repr(s)
        assert tok(s)["input_ids"] == [1] + expected, repr(s)


def test_decode_round_trip(tok, sp):
    for s in STRINGS + _random_strings(300):
        ids = sp.encode(s)
        assert tok.decode(ids) == sp.decode(ids), repr(s)
        assert tok.decode([1] + ids + [2], skip_special_tokens=True) == sp.decode(ids), repr(s)
        if "▁" not in s:  # a literal "▁" reads back as a space, in SentencePiece too
            assert sp.decode(ids) == s, repr(s)


def test_llama_tokenizer_class_is_repaired(tmp_path, sp):
    """Real MobileVLM checkpoints name LlamaTokenizer, whose transformers-5 backend loses the dummy
    prefix of text starting with a space; load_tokenizer must still give SentencePiece's ids."""
    for f in ("tokenizer.model", "special_tokens_map.json"):
        shutil.copy(tiny_tokenizer_dir() / f, tmp_path / f)
    cfg = json.loads((tiny_tokenizer_dir() / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="LlamaTokenizer", legacy=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    raw = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert raw(" hello", add_special_tokens=False)["input_ids"] != sp.encode(" hello")  # the upstream fault
    tok = load_tokenizer(tmp_path)
    for s in STRINGS + _random_strings(500):
        assert tok(s)["input_ids"] == [1] + sp.encode(s), repr(s)
    # save_pretrained writes tokenizer.json (no tokenizer.model); LlamaTokenizer ignores its pipeline
    tok.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer.model").exists()
    again = load_tokenizer(tmp_path / "saved")
    for s in STRINGS + _random_strings(200):
        assert again(s)["input_ids"] == [1] + sp.encode(s), repr(s)
        assert again.decode(sp.encode(s)) == sp.decode(sp.encode(s))


def _loaded_with_decoder(monkeypatch, decoder):
    """load_tokenizer over an AutoTokenizer whose decoder is `decoder` (what another transformers release
    builds for the same files)."""
    import alignkd.model.tokenizer as mod

    real = AutoTokenizer.from_pretrained

    def from_pretrained(*a, **k):
        tok = real(*a, **k)
        tok.backend_tokenizer.decoder = decoder
        return tok

    monkeypatch.setattr(mod.AutoTokenizer, "from_pretrained", from_pretrained)
    return load_tokenizer(tiny_tokenizer_dir())


def test_a_decoder_that_keeps_the_dummy_prefix_is_repaired(monkeypatch, sp):
    # transformers 5.17 builds this decoder for the tiny tokenizer: decode(encode("red")) == " red"
    from tokenizers import decoders

    tok = _loaded_with_decoder(monkeypatch, decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                                decoders.Fuse()]))
    for s in STRINGS + _random_strings(300):
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)), repr(s)
    assert tok.decode(sp.encode("red")) == "red"


def test_a_decoder_that_cannot_be_repaired_is_refused(monkeypatch):
    from tokenizers import decoders

    import alignkd.model.tokenizer as mod

    no_strip = types.SimpleNamespace(Sequence=decoders.Sequence, Replace=decoders.Replace, Fuse=decoders.Fuse,
                                     ByteFallback=decoders.ByteFallback, Strip=lambda *a: decoders.Fuse())
    monkeypatch.setattr(mod, "decoders", no_strip)  # the repair leaves the prefix on
    with pytest.raises(CheckpointError, match=r"does not decode as its tokenizer.model does \(e.g. 'Hello world' "
                                              r"comes back as ' Hello world'\): answers would be scored as other text"):
        _loaded_with_decoder(monkeypatch, decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                             decoders.Fuse()]))


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match=r"no tokenizer in .*expected tokenizer.model \(SentencePiece\) or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_corrupt_tokenizer(tmp_path):
    shutil.copytree(tiny_tokenizer_dir(), tmp_path / "t")
    (tmp_path / "t" / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(CheckpointError, match=str(tmp_path / "t")):
        load_tokenizer(tmp_path / "t")
    data = (tiny_tokenizer_dir() / "tokenizer.model").read_bytes()
    (tmp_path / "t" / "tokenizer.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(tmp_path / "t")):
        load_tokenizer(tmp_path / "t")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot load the tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_check_tokenizer_matches(tok):
    check_tokenizer_matches(tok, 512, 1, 2, "tiny-student")
    check_tokenizer_matches(tok, 576, 1, 2, "padded embedding table")
    with pytest.raises(ConfigError, match="does not match teacher: tokenizer has 512 tokens but the model's vocab_size is 256"):
        check_tokenizer_matches(tok, 256, 1, 2, "teacher")
    with pytest.raises(ConfigError, match="BOS id 1 != model bos_token_id 0"):
        check_tokenizer_matches(tok, 512, 0, 2, "model")
    with pytest.raises(ConfigError, match="EOS id 2 != model eos_token_id 3"):
        check_tokenizer_matches(tok, 512, 1, 3, "model")
