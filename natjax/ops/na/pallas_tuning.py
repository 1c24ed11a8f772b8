"""Tile configuration of the Pallas (Triton) neighborhood-attention kernels.

A `NATileConfig` fixes the query tile of the forward / dq kernels (also the key tile of the dk/dv
kernel) and the Triton launch parameters. Tiles are boxes in *dilation-group* coordinates, one
power-of-two extent per spatial axis, because Triton tensors must have power-of-two shapes.
`default_config` picks one from the kernel size and head dim (a heuristic; no GPU tuning has
been measured for it yet, see docs/pallas.md).
"""

from __future__ import annotations

import dataclasses

from natjax.ops.na.spec import NAParams

_WARPS = (1, 2, 4, 8, 16)
_MIN_TILE = 16  # Triton's tl.dot needs every operand dimension >= 16.
_MAX_TILE = 256  # Keeps the [tile, halo_row] score block and the accumulators in registers.


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class NATileConfig:
    """Query/key tile and Triton launch parameters.

    Attributes:
      block_q: tile extent per spatial axis (same rank as the call), each a power of two; their
        product must lie in [16, 256].
      num_warps: Triton warps per program (1, 2, 4, 8 or 16).
      num_stages: Triton software-pipelining stages (>= 1).
      keys_per_step: keys scored per inner-loop matmul (a power of two in [16, 256]); the loop
        takes `keys_per_step // halo_row` halo rows at a time (one row in the bias-gradient
        kernel).
    """

    block_q: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2
    keys_per_step: int = 64

    def __post_init__(self):
        block = self.block_q
        if not isinstance(block, tuple) or not 1 <= len(block) <= 3:
            raise ValueError(f"`block_q` must be a tuple of 1 to 3 ints, got {block!r}.")
        if not all(isinstance(b, int) and not isinstance(b, bool) and _is_pow2(b) for b in block):
            raise ValueError(f"`block_q` entries must be powers of two, got {block!r}.")
        volume = 1
        for b in block:
            volume *= b
        if not _MIN_TILE <= volume <= _MAX_TILE:
            raise ValueError(
                f"`block_q` must cover between {_MIN_TILE} and {_MAX_TILE} queries, got {block!r} "
                f"({volume})."
            )
        if self.num_warps not in _WARPS:
            raise ValueError(f"`num_warps` must be one of {_WARPS}, got {self.num_warps!r}.")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"`num_stages` must be an int >= 1, got {self.num_stages!r}.")
        kps = self.keys_per_step
        if not (isinstance(kps, int) and _is_pow2(kps) and _MIN_TILE <= kps <= _MAX_TILE):
            raise ValueError(
                f"`keys_per_step` must be a power of two in [{_MIN_TILE}, {_MAX_TILE}], "
                f"got {kps!r}."
            )


def default_config(params: NAParams, head_dim: int, dtype) -> NATileConfig:
    """Heuristic tile for one call.

    The last axis is the vector axis: a tile row of `Tx` queries needs a key row of
    `next_pow2(Tx + K - 1)` keys, so `Tx` is chosen to waste little of that power of two
    (e.g. `Tx = 8` for K <= 9 gives 16-key rows; K = 11, 13 use `Tx = 16` with 32-key rows).

    Args:
      params: the call's window arguments.
      head_dim: size of the head dimension (before padding).
      dtype: input dtype; not used yet (no GPU measurements to tune per-dtype tiles from),
        kept so that callers need not change when it is.

    Returns:
      A validated `NATileConfig`.
    """
    del dtype
    k_last = params.kernel_size[-1]
    if params.ndim == 1:
        block = (64,)
    elif params.ndim == 2:
        block = (8, 8) if k_last <= 9 else (4, 16)
    else:
        block = (2, 4, 8) if k_last <= 9 else (1, 4, 16)
    num_warps = 4 if head_dim <= 64 else 8
    return NATileConfig(block_q=block, num_warps=num_warps, num_stages=2)
