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


@dataclasses.dataclass(frozen=True)
class NAPallasConfig:
    """One `NATileConfig` per kernel: forward, dq (and d_rpb), dk/dv.

    The kernels have different register budgets (the forward keeps one accumulator, dq two plus
    the bias-gradient partial, dk/dv two), so their tiles are chosen apart.
    """

    fwd: NATileConfig
    dq: NATileConfig
    dkv: NATileConfig

    def __post_init__(self):
        ranks = {len(c.block_q) for c in (self.fwd, self.dq, self.dkv)}
        if len(ranks) != 1:
            raise ValueError(
                f"`fwd`, `dq` and `dkv` tiles must have the same rank, got {self.fwd.block_q}, "
                f"{self.dq.block_q} and {self.dkv.block_q}."
            )

    @classmethod
    def same(cls, config: NATileConfig) -> NAPallasConfig:
        """The same tile for all three kernels."""
        return cls(config, config, config)


def _warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def default_config(
    params: NAParams, head_dim: int, dtype, has_rpb: bool = True, value_dim: int | None = None
) -> NAPallasConfig:
    """Tiles per kernel, chosen with the compile gate (`experiments/compile_gate.py`: no spills,
    >= 2 resident blocks per SM where the table allows it); not yet timed on a GPU.

    * forward: one halo row (`next_pow2(Tx + Kx - 1)` keys, >= 16) per step; `Tx` grows with the
      head dim so that the per-step rescale of the `[tile, head_dim]` accumulator stays at about
      two operations per score;
    * dq with a bias: `Tz * Ty = 16` query rows (the d_rpb matmul contracts over them) and a
      narrow `Tx = 4` (16-key rows for every kernel size up to 13);
    * dk/dv: the forward's tile, halved in x for float32 (IEEE float32 dots hold more registers)
      and at most 32 keys at head_dim 128 (two resident blocks per SM); a wide value head_dim
      over a narrow query/key one (e.g. 128 over 16) takes 4 warps and the smallest tiles (8
      warps hold 225 registers per thread there: one block per SM; float32 keeps 8 warps,
      4 spill).

    Args:
      params: the call's window arguments.
      head_dim: size of the query/key head dimension (before padding).
      dtype: input dtype.
      has_rpb: whether a bias is given (changes the dq tile).
      value_dim: the value's head dimension (None: `head_dim`).

    Returns:
      A validated `NAPallasConfig`.
    """
    f32 = str(dtype) == "float32" or getattr(dtype, "name", "") == "float32"
    value_dim = head_dim if value_dim is None else value_dim
    wide_value_only = value_dim > 64 >= head_dim and not f32
    head_dim = max(head_dim, value_dim)  # the tiles below follow the wider of the two
    wide = head_dim > 64
    if params.ndim == 1:
        fwd = (32,) if not f32 else (16,)
        dq = fwd
        dkv = (32,) if not f32 else (16,)
    elif params.ndim == 2:
        fwd = (2, 32) if wide else (8, 8)
        if f32:
            fwd = (4, 8)
        dq = (16, 4) if has_rpb else fwd
        dkv = (4, 8) if f32 else (8, 8)
    else:
        fwd = (1, 2, 32) if wide else (2, 4, 8)
        if f32:
            fwd = (1, 4, 8)
        dq = (1, 16, 4) if has_rpb else fwd
        dkv = (1, 4, 8) if f32 else (2, 4, 8)
    warps = _warps(head_dim)
    make = lambda block, kps=64, stages=2: NATileConfig(block, warps, stages, kps)  # noqa: E731
    # dk/dv: fewer queries per step for float32 (IEEE dots) and head_dim 128.
    if (f32 and wide) or wide_value_only:  # the smallest dk/dv steps (IEEE float32 dots at
        # head_dim 128; a wide value over narrow q/k rows, compile gate)
        dkv = {1: (16,), 2: (2, 8), 3: (1, 2, 8)}[params.ndim]
    elif wide:  # head_dim 128, 8 warps: <= 32 keys keep dk/dv ([keys, 128] f32 each) and the
        # tiles within 128 registers, so two blocks stay resident per SM (compile gate)
        dkv = {1: (16,), 2: (4, 8), 3: (1, 4, 8)}[params.ndim]
    kps = (16 if wide else 32) if f32 else (32 if wide else 64)
    dkv_cfg = make(dkv, kps, 1)
    if wide_value_only:
        dkv_cfg = NATileConfig(dkv, 4, 1, kps)
    return NAPallasConfig(fwd=make(fwd), dq=make(dq), dkv=dkv_cfg)
