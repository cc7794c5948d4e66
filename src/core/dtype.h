// Element types and their sizes; bf16 is stored as raw 16-bit words on the CPU side.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace nextron {

enum class DType { f32, bf16, i32, i64, f64 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::bf16:
      return 2;
    case DType::i32:
      return 4;
    case DType::i64:
      return 8;
    case DType::f64:
      return 8;
  }
  return 0;
}

const char* dtype_name(DType t);

// bf16 <-> f32 with round-to-nearest-even, as torch does.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace nextron
