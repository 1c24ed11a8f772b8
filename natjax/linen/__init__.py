"""Flax Linen front-end: native neighborhood-attention modules and the NAT/DiNAT models.

`NeighborhoodAttention1D/2D/3D` are native Linen modules with the arguments of `natjax.nn`;
`NatModel`, `NatForImageClassification`, `NatBackbone` and `from_pretrained` give the NNX models
(and their pretrained weights) as a Linen module plus variables.
"""

from natjax.linen.attention import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from natjax.linen.models import (
    NatBackbone,
    NatForImageClassification,
    NatLinen,
    NatModel,
    from_pretrained,
    to_linen,
    variables_of,
)

__all__ = [
    "NatBackbone",
    "NatForImageClassification",
    "NatLinen",
    "NatModel",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "from_pretrained",
    "to_linen",
    "variables_of",
]
