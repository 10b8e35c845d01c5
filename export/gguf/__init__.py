"""GGUF target (llama.cpp): the LM as a `llama` GGUF, the vision tower + LDPv2 projector as an `mmproj` GGUF.

One module per job: `names` (state-dict ↔ GGUF name tables), `tensors` (ggml type per tensor, encoding),
`writer` (the two files, with gguf-py), `reference` (the eager model with llama.cpp's semantics), `runtime`
(llama-cpp-python behind the `Runtime` interface) and `target` (the `ExportTarget`).
"""
