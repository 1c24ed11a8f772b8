// Storage types of the inputs and their conversion to/from the accumulation type.
//
// float16 uses the compiler's IEEE `_Float16` (GCC >= 12, Clang >= 15 on x86-64 and AArch64):
// conversions compile to F16C instructions when the target has them, and round to nearest even
// like XLA's convert. bfloat16 is the upper half of a float32; float32 -> bfloat16 rounds to
// nearest even (NaN stays NaN), as XLA does.
#pragma once

#include <cstdint>
#include <cstring>

namespace natjax {

struct bf16_t {
  uint16_t bits;
};
using f16_t = _Float16;

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(f16_t x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float x);
template <typename T>
inline T from_float(double x);

template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline double from_float<double>(double x) {
  return x;
}
template <>
inline f16_t from_float<f16_t>(float x) {
  return static_cast<f16_t>(x);
}
template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// Accumulation type for a storage type: float32 for float16/bfloat16/float32, float64 for
// float64 (the gradient checks run in float64).
template <typename T>
struct AccumOf {
  using type = float;
};
template <>
struct AccumOf<double> {
  using type = double;
};

}  // namespace natjax
