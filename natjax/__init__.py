"""natjax: Neighborhood Attention, NAT and DiNAT in JAX."""

from natjax.convert.checkpoint import export_pretrained, save_pretrained
from natjax.convert.loading import from_pretrained
from natjax.convert.zoo import create_model
from natjax.models import (
    NatBackbone,
    NatConfig,
    NatForImageClassification,
    NatModel,
    get_config,
    list_presets,
)
from natjax.models.preprocessing import PreprocessConfig, preprocess
from natjax.ops.na import merge_attentions, na1d, na2d, na3d

__version__ = "0.1.0"
__all__ = [
    "NatBackbone",
    "NatConfig",
    "NatForImageClassification",
    "NatModel",
    "PreprocessConfig",
    "create_model",
    "export_pretrained",
    "from_pretrained",
    "get_config",
    "list_presets",
    "merge_attentions",
    "na1d",
    "na2d",
    "na3d",
    "preprocess",
    "save_pretrained",
]
