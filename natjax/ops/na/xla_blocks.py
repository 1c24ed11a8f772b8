"""Gather-free building blocks of the XLA neighborhood-attention path.

* `OuterShift`: the keys of kernel offset `a` along an outer axis, `x[window_start(i) + a]`, as
  dynamic slices and broadcasts (never a gather); its transpose is pads and adds.
* `LastAxisBand`: the three banded products along the last spatial axis, for dilation 1:
    qk:   s[i, o]  = a[i] . b[key(i, o)]
    av:   y[i]     = sum_o p[i, o] b[key(i, o)]
    av_t: y[j]     = sum_{(i, o): key(i, o) = j} p[i, o] a[i]     (transpose of `av`)
  computed with tile matmuls over `T` queries and their `T + K - 1` key halo, plus an exact
  correction for the border queries whose windows NATTEN shifts inwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class OuterShift:
    """Shifted copies `x[window_start(i) + a]` along one outer spatial axis, dilation 1.

    The kernel offset `a` may be traced, so the offset loop is a `fori_loop` whose body is traced
    once and whose temporaries are reused across iterations. Non-causal (NATTEN's windows shifted
    inwards at the borders): the first `K // 2` and last `K - 1 - K // 2` rows (one fewer for even
    kernels) repeat rows `a` and `L - K + a`, the rest is the contiguous slice starting at `a`.
    Causal: a slice of the input zero-padded by `K - 1`
    rows in front (`prepare`), so positions before the start read zeros (they are masked).

    Args:
      axis: array axis.
      length: axis length `L`.
      kernel_size: window `K`.
      causal: causal window.
    """

    def __init__(self, axis: int, length: int, kernel_size: int, causal: bool):
        self.axis, self.L, self.K, self.causal = axis, length, kernel_size, causal

    def prepare(self, x: jax.Array) -> jax.Array:
        """Loop-invariant part: the zero padding of causal axes."""
        if not self.causal:
            return x
        pad = [(0, 0)] * x.ndim
        pad[self.axis] = (self.K - 1, 0)
        return jnp.pad(x, pad)

    def __call__(self, xp: jax.Array, a) -> jax.Array:
        """Shifted rows of a `prepare`d array for offset `a` (int or traced int)."""
        L, K, ax = self.L, self.K, self.axis
        lo, hi = (0, 0) if self.causal else (K // 2, K - 1 - K // 2)
        if not lo and not hi:
            return jax.lax.dynamic_slice_in_dim(xp, a, L, axis=ax)

        def rows(start, n):
            shape = list(xp.shape)
            shape[ax] = n
            return jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(xp, start, 1, axis=ax), shape)

        parts = [rows(a, lo)] if lo else []
        parts.append(jax.lax.dynamic_slice_in_dim(xp, a, L - lo - hi, axis=ax))
        if hi:
            parts.append(rows(L - K + a, hi))
        return jnp.concatenate(parts, axis=ax)


def default_tile(length: int, kernel_size: int, kernel_volume: int) -> int:
    """Queries per tile `T` along the last axis.

    A tile's score block is `[T, T + K - 1]`; ~16 queries amortise the halo, but the blocks must
    not outgrow the `[.., kernel_volume]` logits (the op's memory contract), and `T >= K - 1` so
    that only neighbouring tiles' halos overlap. For 1-D that leaves `T = K - 1`: blocks are then
    `2K - 2` wide, under twice the logits.
    """
    tile = min(16, length, kernel_volume - kernel_size + 1)
    return max(tile, kernel_size - 1, 1)


class LastAxisBand:
    """Banded products along the last spatial axis (array axis -2, features last), dilation 1.

    Operands may differ in size-1 leading axes (broadcast by the matmuls): key/value arrays
    `[B, kv_heads, 1, ...]` against queries `[B, kv_heads, group, ...]` (GQA/MQA, no repeat).

    Args:
      length: axis length `L`.
      kernel_size: window `K` (`K <= L`; odd or even).
      causal: causal window (keys `i - K + 1 .. i`) instead of NATTEN's shifted centred window.
      kernel_volume: product of the kernel sizes of all axes (bounds the tile size).
      tile: queries per tile `T` (default `default_tile`).
    """

    def __init__(
        self,
        length: int,
        kernel_size: int,
        causal: bool,
        kernel_volume: int | None = None,
        tile: int | None = None,
    ):
        self.L, self.K, self.causal = length, kernel_size, causal
        self.T = tile or default_tile(length, kernel_size, kernel_volume or kernel_size)
        if kernel_size - 1 > self.T:
            raise ValueError(f"tile {self.T} must be >= kernel_size - 1 = {kernel_size - 1}")
        self.nb = -(-length // self.T)
        # Centred window: key(i, o) = i - c0 + o inside the map's interior.
        self.c0 = kernel_size - 1 if causal else kernel_size // 2
        # Non-causal borders: the first K // 2 queries use the first window, the last
        # K - 1 - K // 2 the last one (one fewer than K // 2 for even kernels).
        self.lo = 0 if causal else kernel_size // 2
        self.hi = 0 if causal else kernel_size - 1 - kernel_size // 2

    # -- layout helpers -------------------------------------------------------------------

    def _pad_axis(self, x, lo, hi, axis=-2):
        pad = [(0, 0)] * x.ndim
        pad[axis % x.ndim] = (lo, hi)
        return jnp.pad(x, pad)

    def _tiles(self, x):
        """`[..., L, F]` -> `[..., nb, T, F]` (zero padded)."""
        x = self._pad_axis(x, 0, self.nb * self.T - self.L)
        return x.reshape(x.shape[:-2] + (self.nb, self.T, x.shape[-1]))

    def _halo_tiles(self, x):
        """`[..., L, F]` -> `[..., nb, T + K - 1, F]`: tile t holds keys `tT - c0 ...`."""
        n, T, K = self.nb, self.T, self.K
        total = (n + 1) * T
        x = self._pad_axis(x, self.c0, total - self.c0 - self.L)
        main = x[..., : n * T, :].reshape(x.shape[:-2] + (n, T, x.shape[-1]))
        tail = x[..., T : T + n * T, :].reshape(x.shape[:-2] + (n, T, x.shape[-1]))
        return jnp.concatenate([main, tail[..., : K - 1, :]], axis=-2)

    def _overlap_add(self, h):
        """Adjoint of `_halo_tiles`: `[..., nb, T + K - 1, F]` -> `[..., L, F]`."""
        n, T, K = self.nb, self.T, self.K
        lead, feat = h.shape[:-3], h.shape[-1]
        main = h[..., :T, :].reshape(lead + (n * T, feat))
        tail = self._pad_axis(h[..., T:, :], 0, T - (K - 1)).reshape(lead + (n * T, feat))
        full = self._pad_axis(main, 0, T) + self._pad_axis(tail, T, 0)
        return full[..., self.c0 : self.c0 + self.L, :]

    def _skew(self, m):
        """`[..., T, T + K - 1]` -> `[..., T, K]` with `out[i, o] = m[i, i + o]`."""
        T, K = self.T, self.K
        flat = m.reshape(m.shape[:-2] + (T * (T + K - 1),))
        flat = self._pad_axis(flat, 0, T, axis=-1)
        return flat.reshape(m.shape[:-2] + (T, T + K))[..., :K]

    def _unskew(self, p):
        """Adjoint of `_skew`: `[..., T, K]` -> `[..., T, T + K - 1]` with zeros off the band."""
        T, K = self.T, self.K
        p = self._pad_axis(p, 0, T, axis=-1)
        flat = p.reshape(p.shape[:-2] + (T * (T + K),))[..., : T * (T + K - 1)]
        return flat.reshape(p.shape[:-2] + (T, T + K - 1))

    def _untile(self, x):
        """`[..., nb, T, F]` -> `[..., L, F]`."""
        x = x.reshape(x.shape[:-3] + (self.nb * self.T, x.shape[-1]))
        return x[..., : self.L, :]

    def _with_borders(self, interior, left, right):
        """Replaces the first `lo` / last `hi` rows of `interior` (axis -2)."""
        lo, hi, L = self.lo, self.hi, self.L
        return jnp.concatenate([left, interior[..., lo : L - hi, :], right], axis=-2)

    # -- the three products --------------------------------------------------------------

    def qk(self, a, b):
        """`[..., L, F] x [..., L, F] -> [..., L, K]`: s[i, o] = a[i] . b[key(i, o)]."""
        m = jnp.einsum("...td,...sd->...ts", self._tiles(a), self._halo_tiles(b))
        s = self._skew(m)
        s = s.reshape(s.shape[:-3] + (self.nb * self.T, self.K))[..., : self.L, :]
        if not self.lo and not self.hi:
            return s
        lo, hi, L, K = self.lo, self.hi, self.L, self.K
        left = jnp.einsum("...xd,...od->...xo", a[..., :lo, :], b[..., :K, :])
        right = jnp.einsum("...xd,...od->...xo", a[..., L - hi :, :], b[..., L - K :, :])
        return self._with_borders(s, left, right)

    def av(self, p, b):
        """`[..., L, K] x [..., L, F] -> [..., L, F]`: y[i] = sum_o p[i, o] b[key(i, o)]."""
        y = jnp.einsum("...ts,...sd->...td", self._unskew(self._tiles(p)), self._halo_tiles(b))
        y = self._untile(y)
        if not self.lo and not self.hi:
            return y
        lo, hi, L, K = self.lo, self.hi, self.L, self.K
        left = jnp.einsum("...xo,...od->...xd", p[..., :lo, :], b[..., :K, :])
        right = jnp.einsum("...xo,...od->...xd", p[..., L - hi :, :], b[..., L - K :, :])
        return self._with_borders(y, left, right)

    def av_t(self, p, a):
        """`[..., L, K] x [..., L, F] -> [..., L, F]`: the transpose of `av` in its second
        argument, y[j] = sum over (i, o) with key(i, o) = j of p[i, o] a[i]."""
        lo, hi, L, K = self.lo, self.hi, self.L, self.K
        p_int = p
        if lo or hi:
            # zeros_like keeps p's sharding on explicit meshes
            zl, zr = jnp.zeros_like(p[..., :lo, :]), jnp.zeros_like(p[..., L - hi :, :])
            p_int = self._with_borders(p, zl, zr)
        h = jnp.einsum("...ts,...td->...sd", self._unskew(self._tiles(p_int)), self._tiles(a))
        y = self._overlap_add(h)
        if not lo and not hi:
            return y
        left = jnp.einsum("...xo,...xd->...od", p[..., :lo, :], a[..., :lo, :])
        right = jnp.einsum("...xo,...xd->...od", p[..., L - hi :, :], a[..., L - hi :, :])
        return y + self._pad_axis(left, 0, L - K) + self._pad_axis(right, L - K, 0)
