"""hf-roast: ROAST / STABLE-RPS randomized parameter sharing for Hugging Face transformers."""

from .config import RoastConfig
from .distill import DistillationTrainer
from .layers import RoastEmbedding, RoastLinear, RoastStore
from .mapping import MAPPING_VERSION, MappingPlan
from .model import RoastModel, get_roast_model
from .quantizer import RoastQuantizationConfig  # registers quant_method "roast" with transformers

__version__ = "0.1.0"

__all__ = [
    "MAPPING_VERSION",
    "DistillationTrainer",
    "MappingPlan",
    "RoastConfig",
    "RoastEmbedding",
    "RoastLinear",
    "RoastModel",
    "RoastQuantizationConfig",
    "RoastStore",
    "get_roast_model",
]
