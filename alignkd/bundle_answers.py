"""An exported bundle answering `eval`'s questions as the phone would: through the emulator (the bundle's own
preprocessing, template, tokenizer and quantized artifact, the app's steps), one question after another. So
`alignkd-mobile eval` scores what ships, with the official rules, beside the eager checkpoint it came from.

This joins eval and export, so it lives in the CLI layer: eval knows nothing of export, nor export of eval.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from alignkd.errors import ConfigError, DataError
from alignkd.eval.benchmarks import EvalItem
from alignkd.eval.evaluate import Answerer
from alignkd.export.bundle import MANIFEST, read_manifest
from alignkd.export.runtime import check_fits


class BundleAnswerer(Answerer):
    """One artifact of a bundle (`artifact` "format/quant"; None: the bundle's first, the one the app runs).
    The manifest and checksums are verified here; the runtime loads at the first question."""

    def __init__(self, path: str, artifact: str | None = None, threads: int = 2):
        manifest = read_manifest(path)
        have = [f"{a['format']}/{a['quant']}" for a in manifest["artifacts"]]
        if not have:
            raise ConfigError(f"bundle {path} holds no artifact: export it again")
        chosen = artifact or have[0]
        if chosen not in have:
            raise ConfigError(f"--artifact {chosen}: bundle {path} has no such artifact (it has: {', '.join(have)})")
        self.path, self.threads, self._runner, self.too_long = str(path), threads, None, 0
        self.identity = hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()  # names every file's digest
        self.setting = ("--artifact", chosen)
        self.run_name = f"{Path(path).name}-{chosen.replace('/', '-')}"  # alignkd-pte-8da4w

    def reply(self, batch: list[EvalItem], max_new_tokens: int) -> list[str]:
        if self._runner is None:
            from alignkd.export.emulator import BundleRunner

            fmt, quant = self.setting[1].split("/")
            self._runner = BundleRunner(self.path, fmt, quant, self.threads)
            if not self._runner.parity_passed:
                click.echo(f"warning: {self._runner.name} failed its parity gate at export (--allow-failed-parity)",
                           err=True)
        return [self._answer(it, max_new_tokens) for it in batch]

    def _answer(self, it: EvalItem, max_new_tokens: int) -> str | None:
        r = self._runner
        try:  # the phone's context is the bundle's max_seq_len (512 by default), often less than the checkpoint's
            check_fits(r.prompt_ids(it.question), max_new_tokens, r.max_seq_len, r.num_image_tokens)
        except DataError:
            self.too_long += 1
            if self.too_long == 1:
                click.echo(f"warning: bundle {self.path}: question {it.id} (and any other that does not fit) needs "
                           f"more than its max_seq_len {r.max_seq_len} with --max-new-tokens {max_new_tokens}: left "
                           "unanswered, scored wrong as the phone could not answer it (export --max-seq-len N to "
                           "fit)", err=True)
            return None
        return r.answer(it.image, it.question, max_new_tokens=max_new_tokens).text

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
