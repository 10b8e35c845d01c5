"""Deployment side: ExecuTorch, ONNX and GGUF exporters (installed as `alignkd.export`)."""
