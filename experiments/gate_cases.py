"""The compile gate's case table and its view of the project (no GPU, no flax needed).

Each `GateCase` is one public-API call (`natjax.na1d/2d/3d(..., implementation="pallas")`). The
gate (`compile_gate.py`) compiles `jax.grad` of it for an H100 and checks every kernel with ptxas;
`accepted` records what the gate found: True when the kernels compile clean (no error, no
spill, shared memory within a block's limit, >= 2 resident blocks per SM), False when they do not.
`unsupported_reason` must refuse exactly the cases with `accepted=False`
(`tests/test_na_pallas.py::test_gate_table_agrees_with_unsupported_reason`), so the default
implementation falls back to `xla` instead of failing to compile on a GPU.

Cases (issue 9): NAT/DiNAT stages of every preset (all have head_dim 32 and kernel 7; DiNAT
dilations 8/4/2), HDiT (64x64, head_dim 64, no bias), the 3-D video shape of issue 8, 1-D long
sequences, kernel sizes 3..13 in 1-D/2-D/3-D, head_dim 16..128, the three dtypes, bias on/off,
causal axes and dilation; issue 12's stride, even kernels, GQA/MQA and a value head_dim of its
own.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class GateCase:
    """One call of the public API that the gate compiles (forward + backward).

    Attributes:
      name: unique id.
      spatial: spatial shape.
      kernel, dilation, causal: window arguments (int/bool or one per axis).
      heads, head_dim, batch: query shape `[batch, *spatial, heads, head_dim]`.
      stride: the window stride (issue 12; 1 = NATTEN 0.17).
      kv_heads, value_dim: key/value heads (GQA/MQA when fewer than `heads`) and the value's
        head_dim; None = `heads` / `head_dim`.
      dtype: input dtype name.
      rpb: whether a relative positional bias is passed (and differentiated).
      accepted: whether the kernels compile clean for sm_90a (the gate's finding).
      quick: part of the `--quick` subset (CI's fast path and local iteration).
      note: what the case stands for.
    """

    name: str
    spatial: tuple[int, ...]
    kernel: int | tuple[int, ...]
    heads: int = 2
    head_dim: int = 32
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    dtype: str = "bfloat16"
    rpb: bool = True
    batch: int = 2
    stride: int | tuple[int, ...] = 1
    kv_heads: int | None = None
    value_dim: int | None = None
    accepted: bool = True
    quick: bool = False
    note: str = ""

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def kv_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Key and value shapes."""
        kvh = self.heads if self.kv_heads is None else self.kv_heads
        dv = self.head_dim if self.value_dim is None else self.value_dim
        return (self.batch, *self.spatial, kvh, self.head_dim), (self.batch, *self.spatial, kvh, dv)

    def params(self, api):
        """The case's validated window arguments (`api.make_params`)."""
        return api.make_params(
            self.ndim, self.spatial, self.head_dim, self.kernel, self.dilation, self.causal, None,
            self.stride,
        )  # fmt: skip


def _kernel_sweep() -> list[GateCase]:
    """Every odd kernel size 3..13 in 1-D, 2-D and 3-D (head_dim 32, bf16, bias on)."""
    cases = []
    for k in (3, 5, 7, 9, 11, 13):
        cases.append(GateCase(f"na1d_k{k}", (256,), k))
        cases.append(GateCase(f"na2d_k{k}", (32, 32), k))
        cases.append(GateCase(f"na3d_k{k}", (k, 16, 16), k))
    return cases


CASES: list[GateCase] = [
    # NAT / DiNAT presets at 224x224 (every preset: head_dim 32, kernel 7; heads only change
    # the grid, so two heads stand for all).
    GateCase("nat_s1", (56, 56), 7, quick=True, note="NAT-Tiny stage 1 (target case)"),
    GateCase("nat_s1_norpb", (56, 56), 7, rpb=False),
    GateCase("nat_s1_f16", (56, 56), 7, dtype="float16"),
    GateCase("nat_s1_f32", (56, 56), 7, dtype="float32", note="IEEE float32 dots"),
    GateCase("nat_s2", (28, 28), 7, heads=4),
    GateCase("nat_s3", (14, 14), 7, heads=8),
    GateCase("nat_s4", (7, 7), 7, heads=16, note="kernel == map size"),
    GateCase("dinat_s1_d8", (56, 56), 7, dilation=8, quick=True),
    GateCase("dinat_s2_d4", (28, 28), 7, dilation=4, heads=4),
    GateCase("dinat_s3_d2", (14, 14), 7, dilation=2, heads=8),
    # HDiT (issue 8): batch 16, 64x64, 4 heads, head_dim 64, kernel 7, no bias.
    GateCase("hdit", (64, 64), 7, heads=4, head_dim=64, rpb=False, batch=16, quick=True),
    # 3-D video (issue 8): batch 2, 16x32x32, 8 heads, head_dim 128, kernel (3, 7, 7).
    GateCase("video3d", (16, 32, 32), (3, 7, 7), heads=8, head_dim=128, rpb=False, quick=True),
    GateCase("video3d_rpb", (16, 32, 32), (3, 7, 7), heads=8, head_dim=128),
    GateCase(
        "video3d_causal",
        (16, 32, 32),
        (3, 7, 7),
        heads=8,
        head_dim=128,
        rpb=False,
        causal=(True, False, False),
    ),  # fmt: skip
    # 1-D long sequences.
    GateCase("na1d_L8192_k13", (8192,), 13, heads=4, head_dim=64),
    GateCase(
        "na1d_L8192_k127",
        (8192,),
        127,
        heads=4,
        head_dim=64,
        accepted=False,
        note="kernel > 13 is not implemented",
    ),  # fmt: skip
    *_kernel_sweep(),
    # head_dim 16..128 (32 is the default above).
    GateCase("na2d_k7_hd16", (32, 32), 7, head_dim=16),
    GateCase("na2d_k7_hd64", (32, 32), 7, head_dim=64),
    GateCase("na2d_k7_hd128", (32, 32), 7, head_dim=128),
    GateCase("na1d_k13_hd128", (256,), 13, head_dim=128, quick=True),
    GateCase("na2d_k13_hd128", (32, 32), 13, head_dim=128, quick=True),
    GateCase("na3d_k13_hd128", (13, 16, 16), 13, head_dim=128, quick=True),
    GateCase("na3d_k13_hd128_norpb", (13, 16, 16), 13, head_dim=128, rpb=False),
    GateCase("na2d_k13_hd128_f32", (32, 32), 13, head_dim=128, dtype="float32"),
    # dtypes beyond stage 1, causal, dilation.
    GateCase("na1d_k13_f32", (256,), 13, dtype="float32"),
    GateCase("na3d_k3_f16", (8, 16, 16), 3, dtype="float16"),
    GateCase("na1d_k13_causal", (256,), 13, causal=True, quick=True),
    GateCase("na2d_k7_causal", (32, 32), 7, causal=True),
    GateCase("na1d_k7_d16", (512,), 7, dilation=16),
    GateCase(
        "na3d_k5_d2_causal", (12, 16, 16), 5, dilation=(1, 2, 2), causal=(True, False, False)
    ),  # fmt: skip
    # Issue 12's features: stride, even kernels, GQA/MQA and a value head_dim of its own.
    GateCase("na2d_k7_s2", (56, 56), 7, stride=2, quick=True, note="stride 2"),
    GateCase("na2d_k7_s7", (56, 56), 7, stride=7, note="stride == kernel (blocked)"),
    GateCase("na1d_k13_s4_causal", (256,), 13, stride=4, causal=True, note="causal stride"),
    GateCase(
        "video3d_s244",
        (8, 16, 16),
        (4, 8, 8),
        stride=(2, 4, 4),
        heads=8,
        head_dim=64,
        rpb=False,
        note="strided 3-D video (issue 12's benchmark case)",
    ),  # fmt: skip
    GateCase("na3d_k13_s3_hd128", (13, 16, 16), 13, stride=3, head_dim=128, note="3-D stride"),
    GateCase("na2d_k6_even", (32, 32), 6, note="even kernel"),
    GateCase("na2d_k8_even_causal", (32, 32), 8, causal=(True, False), note="even, causal"),
    GateCase("na1d_k12_even_d4", (256,), 12, dilation=4, note="even kernel, dilation"),
    GateCase("na2d_k7_gqa", (56, 56), 7, heads=4, kv_heads=2, quick=True, note="GQA"),
    GateCase("na1d_k7_mqa", (256,), 7, heads=4, kv_heads=1, note="MQA"),
    GateCase(
        "na3d_k7_gqa4_hd128",
        (8, 16, 16),
        7,
        heads=8,
        kv_heads=2,
        head_dim=128,
        note="GQA, head_dim 128",
    ),  # fmt: skip
    GateCase(
        "na2d_k7_mqa_f32", (32, 32), 7, heads=8, kv_heads=1, dtype="float32", note="MQA, float32"
    ),  # fmt: skip
    GateCase("na2d_k7_dv64", (32, 32), 7, value_dim=64, note="value head_dim"),
    GateCase(
        "na2d_k7_dv128_hd16",
        (32, 32),
        7,
        head_dim=16,
        value_dim=128,
        note="value head_dim 128 > head_dim",
    ),  # fmt: skip
    GateCase(
        "na2d_k7_hd128_dv16",
        (32, 32),
        7,
        head_dim=128,
        value_dim=16,
        note="value head_dim 16 < head_dim",
    ),  # fmt: skip
    GateCase(
        "na1d_k7_dv128_hd32_f32",
        (256,),
        7,
        value_dim=128,
        dtype="float32",
        note="wide value, float32",
    ),  # fmt: skip
    GateCase("na3d_k5_dv128_hd32", (8, 16, 16), 5, value_dim=128, note="wide value, 3-D"),
    GateCase(
        "na2d_k6_s2_gqa_dv64",
        (32, 32),
        6,
        stride=2,
        heads=4,
        kv_heads=2,
        value_dim=64,
        dilation=2,
        note="everything at once",
    ),  # fmt: skip
]
QUICK = tuple(c.name for c in CASES if c.quick)
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "duplicate gate case names"


def import_ops():
    """Imports `natjax.ops.na` from this checkout without `natjax/__init__` (flax, orbax, ...).

    The gate's virtual environment holds only jax and the CUDA compiler packages; the op itself
    needs nothing more. In a full environment (tests) the real package is used as is.

    Returns:
      The `natjax.ops.na.api` module.
    """
    if "natjax" not in sys.modules:
        try:
            import flax  # noqa: F401  (full environment: import the package normally)
        except ImportError:
            pkg = types.ModuleType("natjax")
            pkg.__path__ = [os.path.join(REPO, "natjax")]
            sys.modules["natjax"] = pkg
    from natjax.ops.na import api

    return api


def refusal(case: GateCase) -> str | None:
    """The project's dispatch answer for `case`: why `pallas` refuses it, or None.

    This is the same question `natjax.na*d(..., implementation=None)` asks before choosing
    `pallas` on a GPU.

    Args:
      case: a gate case.

    Returns:
      The refusal reason, or None when the pallas backend accepts the call.
    """
    import jax
    import jax.numpy as jnp

    api = import_ops()  # first: without flax, this installs the bare `natjax` package
    from natjax.ops.na.spec import NACall

    params = case.params(api)
    dtype = jnp.dtype(case.dtype)
    q = jax.ShapeDtypeStruct(case.shape, dtype)
    k, v = (jax.ShapeDtypeStruct(s, dtype) for s in case.kv_shapes)
    rpb = None
    if case.rpb:
        rpb = jax.ShapeDtypeStruct((case.heads, *params.rpb_shape_tail), dtype)
    return api.unsupported_reason("pallas", NACall.of(q, k, v, rpb, params))
