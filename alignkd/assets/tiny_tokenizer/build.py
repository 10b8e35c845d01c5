"""Rebuild the tiny SentencePiece tokenizer of the tiny presets, deterministically.

    python build.py            # corpus.txt -> tokenizer.model (what the README's sha256 refers to)
    python build.py --corpus   # first regenerate corpus.txt from easy-vqa + the fixed lines below

The model is trained like LLaMA's tokenizer (BPE, byte fallback, split digits, identity normalization,
no whitespace squashing, BOS 1 / EOS 2 / UNK 0, no pad) so that the tiny presets exercise the same
tokenization code paths as the real 32000-piece MobileVLM tokenizer. Training reads the corpus from an
iterator on one thread and writes through a byte sink, so the file holds no paths and is identical
wherever it is built.
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

GENERIC = [
    "USER:",
    "ASSISTANT:",
    "USER: <image>",
    "What is shown in the image?",
    "Describe the picture in one sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "A small model runs on a phone in less than one second.",
    "There are 3 circles, 12 squares and 250 lines in this drawing.",
    "The answer is yes. The answer is no.",
    "Please answer the question with a single word or phrase.",
    "This is a photo of a cat sitting on a wooden table next to a cup of coffee.",
    "A man is riding a bicycle down a street in the city at night.",
    "Two people are walking on the beach while the sun sets behind them.",
    "The teacher model helps the student model learn from its answers.",
    "Vision and language are aligned by the projector before the language model reads the tokens.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Where is the shape? It is in the top left corner of the image.",
    "How many shapes are there? There is one shape.",
    "Is the background white? Yes, it is.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ # $ % & * + = < > | ~ `",
    "Letters: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "letters: a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Indented text keeps its spaces:  two,   three,    four.",
]


def build_corpus() -> str:
    """Deduplicated easy-vqa questions and answers (train + test), sorted, after the fixed lines."""
    import easy_vqa

    texts: set[str] = set()
    for q, a, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        texts.update(q)
        texts.update(a)
    lines = [SYSTEM, *GENERIC, *sorted(texts)]
    return "\n".join(lines) + "\n"


def train(corpus: str) -> bytes:
    import sentencepiece as spm

    sink = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=sink,
        model_type="bpe",
        vocab_size=512,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        max_sentence_length=4192,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return sink.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", action="store_true", help="regenerate corpus.txt from easy-vqa first")
    args = ap.parse_args()
    corpus_path = HERE / "corpus.txt"
    if args.corpus:
        corpus_path.write_text(build_corpus(), encoding="utf-8", newline="\n")
    model = train(corpus_path.read_text(encoding="utf-8"))
    (HERE / "tokenizer.model").write_bytes(model)
    print(f"tokenizer.model sha256 {hashlib.sha256(model).hexdigest()} ({len(model)} bytes)")


if __name__ == "__main__":
    main()
