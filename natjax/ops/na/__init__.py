"""Neighborhood attention: `na1d`, `na2d`, `na3d` and their backends."""

from natjax.ops.na.api import IMPLEMENTATIONS, na1d, na2d, na3d
from natjax.ops.na.spec import NAParams, axis_windows

__all__ = ["IMPLEMENTATIONS", "NAParams", "axis_windows", "na1d", "na2d", "na3d"]
