"""Neighborhood attention as Flax NNX modules (`natjax.linen` has the Linen twins)."""

from natjax.nn.attention import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from natjax.nn.dropout import drop_path, dropout
from natjax.nn.options import NAOptions

__all__ = [
    "NAOptions",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "drop_path",
    "dropout",
]
