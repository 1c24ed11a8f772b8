// Build description, read by natjax (ctypes) for benchmarks and bug reports.
#include "simd.h"

#ifndef NATJAX_FFI_ARCH_FLAGS
#define NATJAX_FFI_ARCH_FLAGS ""
#endif

extern "C" const char* natjax_ffi_build_info() {
  return "natjax-ffi cpu; flags: -O3 " NATJAX_FFI_ARCH_FLAGS
#if NATJAX_AVX2 && defined(__AVX512F__)
         "; vector path: avx2+fma, avx512f (shared-window forward)"
#elif NATJAX_AVX2
         "; vector path: avx2+fma"
#else
         "; vector path: generic (no avx2+fma at build time)"
#endif
      ;
}

// Present since natjax-ffi 0.2: the kernels read NaN/inf entries of q, k and v as 0 (natjax
// checks for this symbol, and gives older libraries a zero-substituted copy instead).
extern "C" int natjax_ffi_reads_nonfinite_as_zero() { return 1; }

// Optional kernel paths of this build, space-separated (natjax/ops/na/ffi.py reads them):
// "shared_window_forward" (shared_fwd.h: tiles whose queries all see one window, AVX2+);
// "reports_nonfinite" (0.3: the forward's third result, seen [B, H], says which (batch, head)
// read a NaN/inf q, k or v element).
extern "C" const char* natjax_ffi_features() {
  return "reads_nonfinite_as_zero reports_nonfinite"
#if NATJAX_AVX2
         " shared_window_forward"
#endif
      ;
}
