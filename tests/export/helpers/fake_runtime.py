"""A deterministic `Runtime` in integer arithmetic, so any language reproduces it exactly: the decode test
vectors (export_vectors.py) run the Python decoding loop over it, the Android app's tests their Kotlin loop."""

from __future__ import annotations

import numpy as np


class FakeRuntime:
    """A deterministic `Runtime` in integer arithmetic, so any language reproduces it exactly.

    embed(ids):          row [id, (7*id) mod 13, 1, 0] per id (hidden size 4)
    encode_image(px):    c = number of pixels > 0; row i of N: [1000 + (c + i) mod 97, i, 2, 0]
    decode(rows, start): start must be 0 (new sequence: state s = 0, length 0) or the current length;
                         for each row at position p: s = (31*s + 3*r0 + r1 + r2 + p) mod 1000003;
                         logits[v] = (a*v + s) mod V with a = 2*(s mod (V/2)) + 1 (a permutation of 0..V-1,
                         so the argmax is unique), and logits[eos] = V once length >= eos_after (if set).
    Every call is logged: ["encode_image", N], ["embed", T], ["decode", start, T].
    """

    hidden = 4

    def __init__(self, vocab_size: int, num_image_tokens: int, eos_id: int, eos_after: int | None):
        self.v, self.n, self.eos, self.eos_after = vocab_size, num_image_tokens, eos_id, eos_after
        self.s, self.length, self.calls = 0, 0, []
        self.states: list[int] = []  # the hash after each position: decoding below `length` rewinds to it

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        c = int(np.count_nonzero(pixels > 0))
        self.calls.append(["encode_image", self.n])
        return np.asarray([[1000 + (c + i) % 97, i, 2, 0] for i in range(self.n)], np.float32)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        self.calls.append(["embed", int(len(ids))])
        return np.asarray([[int(i), (7 * int(i)) % 13, 1, 0] for i in ids], np.float32).reshape(-1, 4)

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        self.calls.append(["decode", int(start_pos), int(embeds.shape[0])])
        if start_pos > self.length:
            raise ValueError(f"decode at {start_pos}, cache holds {self.length}")
        del self.states[start_pos:]  # positions from start_pos on are dropped (0: a new sequence)
        self.s = self.states[-1] if self.states else 0
        for j, row in enumerate(embeds):
            r = [int(x) for x in row]
            self.s = (31 * self.s + 3 * r[0] + r[1] + r[2] + start_pos + j) % 1000003
            self.states.append(self.s)
        self.length = start_pos + embeds.shape[0]
        a = 2 * (self.s % (self.v // 2)) + 1
        logits = np.asarray([(a * v + self.s) % self.v for v in range(self.v)], np.float32)
        if self.eos_after is not None and self.length >= self.eos_after:
            logits[self.eos] = self.v
        return logits

    def close(self) -> None:
        """Nothing to free."""
