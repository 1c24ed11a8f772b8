"""natjax-ffi: native neighborhood-attention kernels for natjax (XLA FFI handlers).

This package only ships the compiled library; natjax loads it and registers its handlers
(`natjax/ops/na/ffi.py`). Use it through `natjax.na2d(..., implementation="ffi")`.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

__version__ = "0.3.1"

# Handler symbols exported by the CPU library (see csrc/cpu/na_cpu.cc).
CPU_HANDLERS = {"natjax_na_fwd": "NatjaxNaFwdCpu", "natjax_na_bwd": "NatjaxNaBwdCpu"}


def library_path() -> Path:
    """Path of the compiled CPU library inside this package.

    Returns:
      The `.so` path.

    Raises:
      FileNotFoundError: if the package was installed without its library.
    """
    here = Path(__file__).parent
    for name in ("libnatjax_ffi_cpu.so", "libnatjax_ffi_cpu.dylib"):
        if (here / name).exists():
            return here / name
    raise FileNotFoundError(f"natjax-ffi: no compiled library in {here}")


@functools.cache
def load() -> ctypes.CDLL:
    """Loads the CPU library once per process."""
    return ctypes.CDLL(str(library_path()))


def build_info() -> str:
    """How the library was compiled (flags, vector path)."""
    fn = load().natjax_ffi_build_info
    fn.restype = ctypes.c_char_p
    return fn().decode()
