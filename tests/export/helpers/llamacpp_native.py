"""llama.cpp's own paths over an exported GGUF pair, as a user of llama.cpp would take them: its tokenizer and
mtmd's prompt evaluation (`generate_native`), and llama-cpp-python's chat API with MobileVLM's `v1` template
(`chat_v1`). The tests check that both give the greedy tokens of our `Runtime` path."""

from __future__ import annotations

import base64
import ctypes
import io
from pathlib import Path

import numpy as np
from PIL import Image

from alignkd.data.templates import IMAGE_TOKEN, V1_SYSTEM
from alignkd.export.base import ExportOptions
from alignkd.export.gguf.runtime import GgufRuntime
from alignkd.export.gguf.target import artifact_files


def generate_native(rt: GgufRuntime, prompt: str, image: np.ndarray, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding entirely inside llama.cpp: its tokenizer splits `prompt` around the `<image>` marker,
    mtmd preprocesses and encodes `image` ((H, W, 3) uint8) and evaluates the chunks, then tokens are fed as
    ids (llama.cpp's own embedding lookup)."""
    lc, mtmd = rt._llama_cpp, rt._mtmd
    text = prompt.replace(IMAGE_TOKEN, mtmd.mtmd_default_marker().decode()).encode()
    lc.llama_memory_clear(lc.llama_get_memory(rt.llm.ctx), True)
    chunks = rt.tokenize_media(text, image, add_special=True)
    try:
        n_past = lc.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunks(rt.mtmd_ctx, rt.llm.ctx, chunks, 0, 0, rt.llm.n_batch, True,
                                        ctypes.byref(n_past)) != 0:
            raise RuntimeError("mtmd failed to evaluate the prompt")
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
    pos, tokens = n_past.value, []
    for _ in range(max_new_tokens):
        tok = int(np.argmax(rt.last_logits()))
        if tok == eos_id:
            break
        tokens.append(tok)
        if len(tokens) == max_new_tokens:
            break
        ids, positions = (lc.llama_token * 1)(tok), (lc.llama_pos * 1)(pos)  # kept alive across the call
        batch = lc.llama_batch_get_one(ids, 1)
        batch.pos = positions
        if lc.llama_decode(rt.llm.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        pos += 1
    rt.pos = pos
    return tokens



# MobileVLM's `v1` conversation ("{system} USER: <image>\n{question} ASSISTANT:", turns ended by " " and
# "</s>"), which Llava15ChatHandler's template does not produce. The image URL is replaced by mtmd's marker.
V1_CHAT_FORMAT = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }} {% endif %}"
    "{% if message.role == 'user' %}USER: "
    "{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for c in message.content %}{% if c.type == 'image_url' %}"
    "{{ c.image_url.url if c.image_url is mapping else c.image_url }}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for c in message.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
    "{% endif %} {% endif %}"
    "{% if message.role == 'assistant' and message.content is not none %}ASSISTANT: {{ message.content }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def mobilevlm_chat_handler(mmproj_path: Path, verbose: bool = False):
    """A llama-cpp-python chat handler speaking MobileVLM's `v1` template: pass it as
    `Llama(model_path, chat_handler=...)` and call `create_chat_completion` with an image_url + text."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class MobileVLMChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = V1_SYSTEM
        CHAT_FORMAT = V1_CHAT_FORMAT

    return MobileVLMChatHandler(clip_model_path=str(mmproj_path), verbose=verbose)


def chat_v1(out_dir: Path, question: str, image: np.ndarray, options: ExportOptions, max_new_tokens: int = 64) -> str:
    """Answer `question` about `image` ((H, W, 3) uint8 RGB) through llama-cpp-python's own chat API with
    MobileVLM's `v1` prompt, greedy: the path a user of the GGUF pair takes."""
    import llama_cpp

    lm_file, mm_file = artifact_files(out_dir, options.quant)
    llm = llama_cpp.Llama(str(lm_file), n_ctx=0, n_threads=options.threads, n_threads_batch=options.threads,
                          type_k=0, type_v=0, verbose=False, chat_handler=mobilevlm_chat_handler(mm_file))
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_uri(image)}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=max_new_tokens)
    finally:
        llm.close()
    return out["choices"][0]["message"]["content"]


def image_data_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB → a PNG data URI, the image form llama-cpp-python's chat API takes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
