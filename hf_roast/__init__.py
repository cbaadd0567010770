"""hf-roast: ROAST / STABLE-RPS randomized parameter sharing for Hugging Face transformers."""

from .config import RoastConfig
from .layers import RoastEmbedding, RoastLinear, RoastStore
from .mapping import MAPPING_VERSION, MappingPlan
from .model import RoastModel, get_roast_model

__version__ = "0.1.0"

__all__ = [
    "MAPPING_VERSION",
    "MappingPlan",
    "RoastConfig",
    "RoastEmbedding",
    "RoastLinear",
    "RoastModel",
    "RoastStore",
    "get_roast_model",
]
