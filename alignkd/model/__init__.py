"""MobileVLM V2: config and presets, the model, checkpoints in the mtgv format."""

from .checkpoint import build_model, config_from_name, load_config, load_model, save_model, spread_norms
from .config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PRESETS, MobileVLMConfig, TextConfig, VisionConfig, get_preset
from .mobilevlm import MobileVLM, VLMOutput

__all__ = [
    "PRESETS", "MobileVLMConfig", "TextConfig", "VisionConfig", "get_preset", "MobileVLM", "VLMOutput",
    "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "build_model", "config_from_name", "load_config", "load_model", "save_model",
    "spread_norms",
]
