"""natjax: Neighborhood Attention, NAT and DiNAT in JAX."""

from natjax.ops.na import na1d, na2d, na3d

__version__ = "0.1.0"
__all__ = ["na1d", "na2d", "na3d"]
