"""The desktop emulator: runs an exported bundle exactly as the Android app does.

Reads and verifies `manifest.json`, applies the bundle's `preprocessing.json` to the image, builds the
prompt from `template.json`, tokenizes with the bundle's tokenizer, and steps the artifact's three calls
(`encode_image` → `embed` → `decode` at increasing start positions) through the one decoding loop in
`alignkd.export.runtime`. The same interface serves every format (ExecuTorch, ONNX, GGUF), so one
test compares them all, and `alignkd-mobile run` / `bench` use it.

Every image, whatever its size, goes through the bundle's one preprocessing (pad to square, resize, crop,
normalise) to the encoder's (1, 3, S, S). The image tokens of the most recent images are kept
(`ImageTokenCache`, keyed by the sha256 of the preprocessed pixels), as the app keeps them: a follow-up
question about the same image skips the vision encoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkd.data.image import ImageProcessingConfig, load_image, preprocess
from alignkd.data.tokenize import tokenize_prompt
from alignkd.errors import AlignKDError, ConfigError, DataError, shown
from alignkd.model.tokenizer import load_tokenizer

from .base import ExportOptions, Runtime, check_threads, get_target
from .bundle import bundle_file, read_manifest, safe_relpath
from .runtime import Generation, ImageTokenCache, PromptPrefix, check_decoding, check_fits, generate


def _loaded(root: Path, what: str, load):
    """`load()`, any failure of it one DataError naming the bundle's file: a file that passed its checksum can
    still be damaged (edited and re-signed, or written by another tool)."""
    try:
        return load()
    except AlignKDError as e:
        raise DataError(f"bundle {root}: its {what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - json, PIL, tokenizers, ExecuTorch, onnxruntime, gguf: each its own errors
        said = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"bundle {root}: cannot read its {what}: {type(e).__name__} ({said})") from None


def _check_template(t) -> dict:
    """template.json as the emulator uses it: a prompt_format with the {question} slot."""
    if not (isinstance(t, dict) and isinstance(t.get("prompt_format"), str) and "{question}" in t["prompt_format"]):
        raise DataError("prompt_format must be text with a {question} slot")
    return t


@dataclass
class Answer:
    text: str
    tokens: list[int]
    generation: Generation


class BundleRunner:
    """One artifact of a bundle, loaded in its desktop runtime, behind the app's steps.

    image_cache_size: how many images' tokens to keep (0: none, every question encodes its image).
    """

    def __init__(self, bundle: str | Path, fmt: str | None = None, quant: str | None = None, threads: int = 2,
                 image_cache_size: int = ImageTokenCache.DEFAULT_CAPACITY):
        check_threads(threads)
        self.image_cache = ImageTokenCache(image_cache_size)
        self.prefix = PromptPrefix()  # what the runtime's KV cache holds of the last prompt
        self.root = Path(bundle)
        self.manifest = read_manifest(self.root)  # refuses bad versions, paths, checksums
        arts = [a for a in self.manifest["artifacts"] if (fmt is None or a["format"] == fmt)
                and (quant is None or a["quant"] == quant)]
        if not arts:
            have = ", ".join(f"{a['format']}/{a['quant']}" for a in self.manifest["artifacts"])
            raise ConfigError(f"bundle {self.root} has no artifact {fmt or '*'}/{quant or '*'} (it has: {have})")
        self.artifact = arts[0]
        # False for a bundle written with --allow-failed-parity: fit for timing, not for answers
        self.parity_passed = self.artifact["parity_passed"]  # a bool: read_manifest checks it
        m = self.manifest["model"]
        self.max_seq_len = m["max_seq_len"]
        self.eos_ids = list(m["eos_ids"])
        for key, ids in (("eos_ids", self.eos_ids), ("bos_id", [m["bos_id"]]), ("pad_id", [m["pad_id"]])):
            if not all(0 <= i < m["vocab_size"] for i in ids):
                raise DataError(f"bundle {self.root}: model.{key} {shown(m[key])} is outside the vocabulary "
                                f"(token ids 0 to {m['vocab_size'] - 1})")
        self.num_image_tokens = m["num_image_tokens"]
        self.image_size = m["image_size"]
        self.preprocessing = self._part("preprocessing", ImageProcessingConfig.from_dict)
        if self.preprocessing.image_size != self.image_size:  # the app refuses such a bundle at open too
            raise DataError(f"bundle {self.root}: preprocessing image_size {self.preprocessing.image_size} != model "
                            f"image_size {self.image_size}")
        self.template = self._part("template", _check_template)
        self.tokenizer = self._part("tokenizer", lambda path: load_tokenizer(path.parent))
        opts = ExportOptions(quant=self.artifact["quant"], max_seq_len=self.max_seq_len, threads=threads)
        t0 = time.perf_counter()
        where = f"{self.artifact['format']}/{self.artifact['quant']} artifact"
        self.runtime: Runtime = _loaded(self.root, where, lambda: get_target(self.artifact["format"]).load(
            safe_relpath(self.root, self.artifact["dir"]), opts))
        self.load_s = time.perf_counter() - t0

    def _part(self, key: str, read):
        """A bundle file (preprocessing, template, tokenizer) through `read`: JSON files arrive parsed."""
        path = bundle_file(self.root, self.manifest, key)
        return _loaded(self.root, f"{key} file {path.relative_to(self.root.resolve())}",
                       lambda: read(json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else path))

    @property
    def name(self) -> str:
        return f"{self.root.name}:{self.artifact['format']}/{self.artifact['quant']}"

    def prompt_ids(self, question: str) -> list[int]:
        return tokenize_prompt(self.template["prompt_format"].replace("{question}", question), self.tokenizer)

    def pixels(self, image) -> np.ndarray:
        """An image file or PIL image of any size → (1, 3, S, S) float32, the bundle's preprocessing."""
        img = image if hasattr(image, "convert") else load_image(image)
        return preprocess(img, self.preprocessing)[None].numpy()  # (1, 3, S, S)

    def answer(self, image, question: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, stop_at_eos: bool = True) -> Answer:
        """stop_at_eos False decodes exactly max_new_tokens tokens (what `bench` times)."""
        check_decoding(max_new_tokens, temperature, top_p)
        ids = self.prompt_ids(question)
        check_fits(ids, max_new_tokens, self.max_seq_len, self.num_image_tokens)  # before any compute
        eos = self.eos_ids[0] if stop_at_eos else None
        gen = generate(self.runtime, ids, self.pixels(image), max_new_tokens, eos, self.max_seq_len,
                       self.num_image_tokens, temperature, top_p, seed, image_cache=self.image_cache,
                       image_size=self.image_size, prefix=self.prefix)
        made = gen.image_embeddings.shape[0] if gen.image_embeddings is not None else self.num_image_tokens
        if made != self.num_image_tokens:  # the budget check above (and the app's) counted the manifest's number
            raise DataError(f"bundle {self.root}: model.num_image_tokens is {self.num_image_tokens}, but its image "
                            f"encoder makes {made}")
        return Answer(self.tokenizer.decode(gen.tokens, skip_special_tokens=True).strip(), gen.tokens, gen)

    def close(self) -> None:
        """Free the runtime (native memory: the weights, the KV cache)."""
        self.runtime.close()
