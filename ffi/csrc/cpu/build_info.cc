// Build description, read by natjax (ctypes) for benchmarks and bug reports.
#include "simd.h"

#ifndef NATJAX_FFI_ARCH_FLAGS
#define NATJAX_FFI_ARCH_FLAGS ""
#endif

extern "C" const char* natjax_ffi_build_info() {
  return "natjax-ffi cpu; flags: -O3 " NATJAX_FFI_ARCH_FLAGS
#if NATJAX_AVX2
         "; vector path: avx2+fma"
#else
         "; vector path: generic (no avx2+fma at build time)"
#endif
      ;
}
