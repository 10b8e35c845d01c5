"""alignkd-mobile: Align-KD distillation of MobileVLM V2 and export to phones."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao when it is installed; on CPU torchao logs that its CUDA kernels are absent,
# and torch's pytree logs a deprecation about torchao's enums. Both are harmless (DESIGN.md §4): keep them
# out of every command's output.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
