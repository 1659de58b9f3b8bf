// Portable build of the decode attention kernel: one float per "vector", compiled for
// the baseline ISA. Used on CPUs without AVX2 and for head sizes the vector builds do
// not take (head_dim not a multiple of their width); also the reference the vector
// builds are tested against on one machine.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace crystal_vllm {
namespace {

struct Scalar {
  using Vec = float;
  static constexpr int kRegisters = 16;
  static constexpr int64_t kWidth = 1;

  static inline Vec zero() { return 0.0f; }
  static inline Vec set1(float x) { return x; }
  static inline Vec load(const float* p) { return *p; }
  static inline Vec load_bf16(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  // IEEE binary16 -> binary32, exact, including subnormals, infinities and NaN.
  static inline Vec load_f16(const uint16_t* p) {
    const uint32_t h = *p;
    const uint32_t sign = (h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
      bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
      bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise the mantissa
      exponent = 113u;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static inline Vec load_partial(const float* p, int64_t n, float fill) {
    return n > 0 ? *p : fill;
  }
  static inline void store(float* p, Vec v) { *p = v; }
  static inline void store_partial(float* p, Vec v, int64_t n) {
    if (n > 0) *p = v;
  }
  static inline Vec add(Vec a, Vec b) { return a + b; }
  static inline Vec sub(Vec a, Vec b) { return a - b; }
  static inline Vec mul(Vec a, Vec b) { return a * b; }
  static inline Vec max(Vec a, Vec b) { return a > b ? a : b; }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
  static inline float reduce_add(Vec v) { return v; }
  static inline float reduce_max(Vec v) { return v; }
  // Same cut-off as the vector builds, so every build gives exactly 0 at the same place.
  static inline Vec exp_nonpos(Vec x) { return x >= -87.33654475f ? std::exp(x) : 0.0f; }
};

}  // namespace
}  // namespace crystal_vllm

#include "kernel_impl.h"

namespace crystal_vllm {

DecodeStatus decode_attention_scalar(const DecodeArgs& args, int64_t begin, int64_t end) {
  return decode_dispatch<Scalar>(args, begin, end);
}

}  // namespace crystal_vllm
