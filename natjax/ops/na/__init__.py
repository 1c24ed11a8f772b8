"""Neighborhood attention: `na1d`, `na2d`, `na3d` and their backends."""

from natjax.ops.na.api import IMPLEMENTATIONS, na1d, na2d, na3d
from natjax.ops.na.merge import merge_attentions
from natjax.ops.na.spec import NACall, NAParams, axis_windows

__all__ = [
    "IMPLEMENTATIONS",
    "NACall",
    "NAParams",
    "axis_windows",
    "merge_attentions",
    "na1d",
    "na2d",
    "na3d",
]
