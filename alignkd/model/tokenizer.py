"""Loading and checking tokenizers, strictly offline.

MobileVLM checkpoints ship a LLaMA SentencePiece `tokenizer.model` (and sometimes a `tokenizer.json`);
the tiny presets use the small SentencePiece model packaged in `alignkd/assets/tiny_tokenizer`. Both go
through transformers' AutoTokenizer so that training, evaluation and export share one code path.

MobileVLM was trained with the slow (SentencePiece) LLaMA tokenizer, whose ids are exactly
`sentencepiece.encode`, and phones run SentencePiece itself. transformers 5's `LlamaTokenizer` rebuilds
the vocabulary as a `tokenizers` BPE with a Metaspace pre-tokenizer that drops SentencePiece's dummy
prefix when the text already starts with a space (" a" -> "▁a" instead of "▁▁a"). `load_tokenizer`
therefore checks the loaded tokenizer against `tokenizer.model` on probe strings and, when they differ,
switches the backend to the pipeline that reproduces SentencePiece (prepend "▁", replace " " by "▁",
no pre-tokenizer: what LLaMA's original tokenizer.json did), then checks again. Decoding is checked the
same way against `sentencepiece.decode` (transformers 5.17 keeps the dummy prefix: " red"; the fix strips
one leading space, as LLaMA's decoder did), so that answers are scored as the text SentencePiece gives.
The same class also ignores the normalizer and pre-tokenizer written in a `tokenizer.json` (so a repaired
tokenizer saved with `save_pretrained`, which writes no tokenizer.model, would load broken): when a
tokenizer.json is present, its pipeline is put back first.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alignkd.errors import CheckpointError, ConfigError

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

# Cases where HF and SentencePiece have been seen to differ: leading/double spaces, newlines, digits,
# bytes outside the vocabulary, a literal "▁".
PROBES = (
    "Hello world", " leading space", "  two leading", "a  b   c ", "\n", "\nWhat is it? ASSISTANT:",
    "USER: ", "12345 67.8", "héllo wörld 你好 🙂", "\ttab\t", "▁x ▁", "",
)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tiny_tokenizer_dir() -> Path:
    """The packaged 512-piece SentencePiece tokenizer of the tiny presets."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer in `directory` without touching the network.

    Fails with a CheckpointError naming the directory when no tokenizer file is there or it cannot be
    parsed, instead of transformers' hub-lookup errors, which are misleading for a local folder.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {d}")
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {d}: expected tokenizer.model (SentencePiece) or tokenizer.json"
        )
    try:
        # AutoTokenizer also reads config.json: model_type "mobilevlm" and `rope_scaling: null` make
        # transformers warn about things that do not concern the tokenizer
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore", FutureWarning)
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers/sentencepiece/tokenizers raise many unrelated types here
        raise CheckpointError(f"cannot load the tokenizer in {d} (corrupt or unsupported files?): {e}") from e
    if tok is None or len(tok) == 0:
        raise CheckpointError(f"cannot load the tokenizer in {d}: it has an empty vocabulary")
    if (d / "tokenizer.json").is_file():
        _match_tokenizer_json(tok, d / "tokenizer.json")
    if (d / "tokenizer.model").is_file():
        _match_sentencepiece(tok, d / "tokenizer.model")
    tok.alignkd_source_dir = d  # save_tokenizer copies the original files from here
    return tok


COPIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json")


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Copy the tokenizer's original files into out_dir. `save_pretrained` writes no tokenizer.model,
    which the GGUF vocabulary, the Android app and a faithful reload all need."""
    import shutil

    out = Path(out_dir)
    src = getattr(tok, "alignkd_source_dir", None)
    if src is None:
        tok.save_pretrained(str(out))
        return
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _hf_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _match_tokenizer_json(tok: PreTrainedTokenizerBase, path: Path) -> None:
    """Give `tok` the normalizer/pre-tokenizer that its tokenizer.json declares, if the class dropped them."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return
    try:
        file_tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"corrupt tokenizer file {path}: {e}") from e
    if all(_hf_ids(tok, s) == file_tok.encode(s, add_special_tokens=False).ids for s in PROBES):
        return
    backend.normalizer = file_tok.normalizer
    backend.pre_tokenizer = file_tok.pre_tokenizer
    backend.decoder = file_tok.decoder


def _match_sentencepiece(tok: PreTrainedTokenizerBase, model_file: Path) -> None:
    """Make `tok` produce SentencePiece's ids for plain text, or fail loudly (see the module docstring)."""
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:
        raise CheckpointError(f"corrupt SentencePiece model {model_file}: {e}") from e
    if all(_hf_ids(tok, s) == sp.encode(s) for s in PROBES) and _decodes_like(tok, sp):
        return
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    ns = proto.normalizer_spec
    backend = getattr(tok, "backend_tokenizer", None)
    fixable = backend is not None and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    fixable = fixable and ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces
    if fixable and not all(_hf_ids(tok, s) == sp.encode(s) for s in PROBES):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    if fixable and not _decodes_like(tok, sp):
        # the dummy prefix comes off again when decoding (some transformers 5 releases keep it: " red")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    bad = [s for s in PROBES if _hf_ids(tok, s) != sp.encode(s)]
    if bad:
        raise CheckpointError(
            f"the tokenizer loaded from {model_file.parent} does not reproduce the ids of its "
            f"tokenizer.model (e.g. for {bad[0]!r}): the model would see different tokens than it was trained on"
        )
    bad = [s for s in _decode_probes(sp) if tok.decode(sp.encode(s)) != sp.decode(sp.encode(s))]
    if bad:
        raise CheckpointError(
            f"the tokenizer loaded from {model_file.parent} does not decode as its tokenizer.model does (e.g. "
            f"{bad[0]!r} comes back as {tok.decode(sp.encode(bad[0]))!r}): answers would be scored as other text"
        )


def _decode_probes(sp) -> list[str]:
    # an unknown piece decodes as " ⁇ " in SentencePiece and as "<unk>" in transformers: not a fault
    return [s for s in PROBES if sp.unk_id() not in sp.encode(s)]


def _decodes_like(tok: PreTrainedTokenizerBase, sp) -> bool:
    return all(tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)) for s in _decode_probes(sp))


def check_tokenizer_matches(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, bos_id: int, eos_id: int, where: str
) -> None:
    """Raise ConfigError when a tokenizer cannot drive a model whose config says (vocab_size, bos, eos).

    Catches the two silent failures that otherwise train garbage: pairing a model with the wrong
    tokenizer, and distilling between teacher and student with different vocabularies (logit KD needs
    the same id space). The tokenizer may be smaller than the model's embedding table (padded vocab),
    never larger.
    """
    n = len(tokenizer)
    problems = []
    if n > vocab_size:
        problems.append(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    if tokenizer.bos_token_id != bos_id:
        problems.append(f"tokenizer BOS id {tokenizer.bos_token_id} != model bos_token_id {bos_id}")
    if tokenizer.eos_token_id != eos_id:
        problems.append(f"tokenizer EOS id {tokenizer.eos_token_id} != model eos_token_id {eos_id}")
    if problems:
        raise ConfigError(f"tokenizer does not match {where}: " + "; ".join(problems))
