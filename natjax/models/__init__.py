"""NAT and DiNAT models (Flax NNX), their configuration and published presets."""

from natjax.models.config import NatConfig
from natjax.models.nat import (
    MODEL_CLASSES,
    NatBackbone,
    NatForImageClassification,
    NatModel,
    count_params,
)
from natjax.models.outputs import BackboneOutput, NatImageClassifierOutput, NatModelOutput
from natjax.models.presets import PRESETS, Preset, get_config, get_preset, list_presets

__all__ = [
    "MODEL_CLASSES",
    "PRESETS",
    "BackboneOutput",
    "NatBackbone",
    "NatConfig",
    "NatForImageClassification",
    "NatImageClassifierOutput",
    "NatModel",
    "NatModelOutput",
    "Preset",
    "count_params",
    "get_config",
    "get_preset",
    "list_presets",
]
