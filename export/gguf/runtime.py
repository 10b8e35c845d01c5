"""The GGUF pair in llama-cpp-python, behind the `Runtime` interface: the LM through `llama_decode` on
embeddings (an F32 KV cache, so logits compare tightly), the image through llama.cpp's multimodal library
(mtmd), from the uint8 bitmap the normalised pixels were made from."""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from alignkd.errors import DataError

from .tensors import dequantized

def to_uint8_image(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(1, 3, S, S) normalised pixels → (S, S, 3) uint8 RGB, the bitmap they were made from (exact for
    pixels from alignkd.data.image.preprocess; other values are rounded and clipped to 0..255)."""
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise DataError(f"expected pixels of shape (1, 3, S, S), got {tuple(pixels.shape)}")
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    rgb = (pixels[0].astype(np.float64) * s + m) * 255.0  # (3, S, S)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0))  # (S, S, 3)


def normalise(image: np.ndarray, mean, std) -> np.ndarray:
    """(S, S, 3) uint8 → (3, S, S) float32, the arithmetic of alignkd.data.image.preprocess."""
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@contextlib.contextmanager
def model_params(**fields):
    """Set fields of llama.cpp's `llama_model_params` that llama-cpp-python's `Llama()` does not take, for
    the models loaded inside the block.

    use_extra_bufts=False: llama.cpp's extra CPU buffer types (AMX tiles, repacked Q4_0/Q8_0 weights) make
    llama_decode segfault on quantized models of the tiny presets' width on AMX-capable Xeons (at the 1.7B
    width: README, Results)."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def patched():
        p = default()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = default


class GgufRuntime:
    """A GGUF pair in llama-cpp-python: LM through llama_decode on embeddings, image through mtmd."""

    def __init__(self, model_path: Path, mmproj_path: Path, threads: int = 2, extra_bufts: bool = False):
        """extra_bufts: load with llama.cpp's extra CPU buffer types (its default; see `model_params`)."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self._llama_cpp, self._mtmd = llama_cpp, mtmd
        meta = GGUFReader(mmproj_path).fields
        self.mean = np.asarray(meta["clip.vision.image_mean"].contents(), np.float64)
        self.std = np.asarray(meta["clip.vision.image_std"].contents(), np.float64)
        lm = GGUFReader(model_path)
        self.n_ctx = int(lm.fields["llama.context_length"].contents())
        # token rows de-quantized exactly as llama.cpp's get_rows reads them
        self.token_embd = next(np.array(dequantized(np.asarray(t.data), t.tensor_type))
                               for t in lm.tensors if t.name == "token_embd.weight")  # (V, H)
        del lm
        # F32 KV cache: the default F16 cache alone costs ~1e-2 in the logits. One batch holds a whole prompt.
        with model_params(use_extra_bufts=extra_bufts):
            self.llm = llama_cpp.Llama(str(model_path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                       n_ubatch=min(self.n_ctx, 512), n_threads=threads, n_threads_batch=threads,
                                       type_k=0, type_v=0, verbose=False)
        mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))  # quiet unless llama-cpp-python is verbose
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.mtmd_ctx:
            raise RuntimeError(f"llama.cpp could not load the mmproj {mmproj_path}")
        self.llm._stack.callback(self._free_mtmd)
        self.n_embd = self.llm.n_embd()
        self.n_vocab = self.llm.n_vocab()
        self.pos = 0

    def _free_mtmd(self) -> None:
        if self.mtmd_ctx:
            self._mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None

    def close(self) -> None:
        self.llm.close()

    # -- image --------------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """De-normalise to the uint8 bitmap; mtmd resizes (identity at image_size), normalises, encodes."""
        return self.encode_bitmap(to_uint8_image(np.asarray(pixels), self.mean, self.std))

    def encode_bitmap(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → (N, H) image tokens, llama.cpp's preprocessing included."""
        mtmd = self._mtmd
        chunks = self.tokenize_media(mtmd.mtmd_default_marker(), image)
        try:
            chunk = self._image_chunk(chunks)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                raise RuntimeError("mtmd failed to encode the image")
            out = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
            return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()  # (N, H)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def tokenize_media(self, text: bytes, image: np.ndarray, add_special: bool = False):
        """mtmd's chunks of `text` with `image` ((H, W, 3) uint8 RGB) at its media marker; free them with
        mtmd_input_chunks_free."""
        mtmd = self._mtmd
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape}")
        data = image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), add_special, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise RuntimeError("mtmd failed to tokenize the prompt and image")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _image_chunk(self, chunks):
        mtmd = self._mtmd
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise RuntimeError("mtmd produced no image chunk")

    # -- text -----------------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.token_embd[np.asarray(ids, dtype=np.int64)]  # (T, H)

    def decode(self, embeds: np.ndarray, start_pos: int) -> np.ndarray:
        lc = self._llama_cpp
        mem = lc.llama_get_memory(self.llm.ctx)
        if start_pos > self.pos:
            raise ValueError(f"decode at position {start_pos}, but the cache holds {self.pos} positions")
        if start_pos == 0:
            lc.llama_memory_clear(mem, True)
        elif start_pos < self.pos:
            lc.llama_memory_seq_rm(mem, 0, start_pos, -1)
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)  # (T, H)
        n = embeds.shape[0]
        if start_pos + n > self.n_ctx:
            raise DataError(f"{start_pos + n} positions exceed the GGUF context of {self.n_ctx}")
        batch = lc.llama_batch_init(n, self.n_embd, 1)
        try:
            batch.n_tokens = n
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
            for i in range(n):
                batch.pos[i] = start_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            if lc.llama_decode(self.llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            lc.llama_batch_free(batch)
        self.pos = start_pos + n
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()  # (V,)
