"""hf-roast: ROAST / STABLE-RPS randomized parameter sharing for Hugging Face transformers."""

from .config import RoastConfig
from .layers import RoastEmbedding, RoastLinear, RoastStore
from .mapping import MAPPING_VERSION, MappingPlan
from .model import RoastModel, get_roast_model
from .optim import RoastRecipe, create_roast_optimizer
from .quantizer import RoastQuantizationConfig  # registers quant_method "roast" with transformers
from .sliceout import SliceOut, enable_sliceout

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "DistillationTrainer":  # lazy: importing transformers.Trainer costs seconds
        from .distill import DistillationTrainer

        return DistillationTrainer
    if name == "RoastTrainer":
        from .optim import roast_trainer_class

        return roast_trainer_class()
    if name == "RoastDistillationTrainer":  # the recipe + distillation from a dense teacher (README)
        from .distill import DistillationTrainer
        from .optim import roast_trainer_class

        return roast_trainer_class(DistillationTrainer)
    if name == "SliceOutCallback":
        from .optim import sliceout_callback_class

        return sliceout_callback_class()
    if name in ("recover", "RecoveryReport"):  # lazy too: recovery imports the distillation trainer
        from . import recovery

        return getattr(recovery, name)
    raise AttributeError(f"module 'hf_roast' has no attribute {name!r}")


__all__ = [
    "MAPPING_VERSION",
    "DistillationTrainer",
    "MappingPlan",
    "RecoveryReport",
    "RoastConfig",
    "RoastDistillationTrainer",
    "RoastEmbedding",
    "RoastLinear",
    "RoastModel",
    "RoastQuantizationConfig",
    "RoastRecipe",
    "RoastStore",
    "RoastTrainer",
    "SliceOut",
    "SliceOutCallback",
    "create_roast_optimizer",
    "enable_sliceout",
    "get_roast_model",
    "recover",
]
