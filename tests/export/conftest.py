"""The export tests' helpers (tests/export/helpers: the test-vector generator, a fake runtime, llama.cpp's own
prompt and chat paths) are test code, not part of the installed package: they import as top-level modules."""

from __future__ import annotations

import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))
