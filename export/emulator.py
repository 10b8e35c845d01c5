"""The desktop emulator: runs an exported bundle exactly as the Android app does.

Reads and verifies `manifest.json`, applies the bundle's `preprocessing.json` to the image, builds the
prompt from `template.json`, tokenizes with the bundle's tokenizer, and steps the artifact's three calls
(`encode_image` → `embed` → `decode` at increasing start positions) through the one decoding loop in
`alignkd.export.runtime`. The same interface serves every format (ExecuTorch, ONNX, GGUF), so one
test compares them all, and `alignkd-mobile run` / `bench` use it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkd.data.image import ImageProcessingConfig, load_image, preprocess
from alignkd.data.tokenize import tokenize_prompt
from alignkd.errors import ConfigError
from alignkd.model.tokenizer import load_tokenizer

from .base import ExportOptions, Runtime
from .bundle import read_manifest, safe_relpath
from .exporter import get_target
from .runtime import Generation, check_fits, generate


@dataclass
class Answer:
    text: str
    tokens: list[int]
    generation: Generation


class BundleRunner:
    """One artifact of a bundle, loaded in its desktop runtime, behind the app's steps."""

    def __init__(self, bundle: str | Path, fmt: str | None = None, quant: str | None = None, threads: int = 2):
        self.root = Path(bundle)
        self.manifest = read_manifest(self.root)  # refuses bad versions, paths, checksums
        arts = [a for a in self.manifest["artifacts"] if (fmt is None or a["format"] == fmt)
                and (quant is None or a["quant"] == quant)]
        if not arts:
            have = ", ".join(f"{a['format']}/{a['quant']}" for a in self.manifest["artifacts"])
            raise ConfigError(f"bundle {self.root} has no artifact {fmt or '*'}/{quant or '*'} (it has: {have})")
        self.artifact = arts[0]
        m = self.manifest["model"]
        self.max_seq_len = m["max_seq_len"]
        self.eos_ids = list(m["eos_ids"])
        self.num_image_tokens = m["num_image_tokens"]
        self.preprocessing = ImageProcessingConfig.from_dict(
            json.loads(safe_relpath(self.root, self.manifest["preprocessing"]).read_text()))
        self.template = json.loads(safe_relpath(self.root, self.manifest["template"]).read_text())
        self.tokenizer = load_tokenizer(safe_relpath(self.root, self.manifest["tokenizer"]).parent)
        opts = ExportOptions(quant=self.artifact["quant"], max_seq_len=self.max_seq_len, threads=threads)
        t0 = time.perf_counter()
        self.runtime: Runtime = get_target(self.artifact["format"]).load(
            safe_relpath(self.root, self.artifact["dir"]), opts)
        self.load_s = time.perf_counter() - t0

    @property
    def name(self) -> str:
        return f"{self.root.name}:{self.artifact['format']}/{self.artifact['quant']}"

    def prompt_ids(self, question: str) -> list[int]:
        return tokenize_prompt(self.template["prompt_format"].replace("{question}", question), self.tokenizer)

    def pixels(self, image) -> np.ndarray:
        img = image if hasattr(image, "convert") else load_image(image)
        return preprocess(img, self.preprocessing)[None].numpy()  # (1, 3, S, S)

    def answer(self, image, question: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, stop_at_eos: bool = True) -> Answer:
        """stop_at_eos False decodes exactly max_new_tokens tokens (what `bench` times)."""
        ids = self.prompt_ids(question)
        check_fits(ids, max_new_tokens, self.max_seq_len, self.num_image_tokens)  # before any compute
        eos = self.eos_ids[0] if stop_at_eos else None
        gen = generate(self.runtime, ids, self.pixels(image), max_new_tokens, eos, self.max_seq_len,
                       self.num_image_tokens, temperature, top_p, seed)
        return Answer(self.tokenizer.decode(gen.tokens, skip_special_tokens=True).strip(), gen.tokens, gen)
