// AVX2 + FMA + F16C build of the decode attention kernel (8 floats per vector), the
// fallback for x86-64 CPUs without AVX-512. Same scheme as kernels_avx512.cpp.
#include "kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace crystal_vllm {
namespace {

struct Avx2 {
  using Vec = __m256;
  static constexpr int kRegisters = 16;
  static constexpr int64_t kWidth = 8;

  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec set1(float x) { return _mm256_set1_ps(x); }
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec load_bf16(const uint16_t* p) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static inline Vec load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // maskload does not access masked-off lanes and zeroes them; blend in `fill`.
  static inline Vec load_partial(const float* p, int64_t n, float fill) {
    const __m256i m = first_lanes(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m),
                            _mm256_castsi256_ps(m));
  }
  static inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static inline void store_partial(float* p, Vec v, int64_t n) {
    _mm256_maskstore_ps(p, first_lanes(n), v);
  }
  static inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float reduce_add(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float reduce_max(Vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Transposing sum of 8 vectors, as in kernels_avx512.cpp with two 128-bit lanes.
  static inline Vec reduce_rows(const Vec* v) {
    Vec quad[2];
    for (int i = 0; i < 2; ++i) {
      const Vec* r = v + 4 * i;
      const Vec s01 = _mm256_add_ps(_mm256_unpacklo_ps(r[0], r[1]), _mm256_unpackhi_ps(r[0], r[1]));
      const Vec s23 = _mm256_add_ps(_mm256_unpacklo_ps(r[2], r[3]), _mm256_unpackhi_ps(r[2], r[3]));
      quad[i] = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x44), _mm256_shuffle_ps(s01, s23, 0xEE));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quad[0], quad[1], 0x20),
                         _mm256_permute2f128_ps(quad[0], quad[1], 0x31));
  }
  static inline Vec select(uint32_t bits, Vec a, float fill) {
    const __m256i pow2 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(
        _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), pow2), pow2);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), a, _mm256_castsi256_ps(set));
  }

  // Cephes' expf as in kernels_avx512.cpp; 2^n is built in the exponent field, which is
  // valid because the clamp keeps n in [-126, 0].
  static inline Vec exp_nonpos(Vec x) {
    const Vec lo = _mm256_set1_ps(-87.33654475f);  // ln(FLT_MIN)
    const Vec live = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // false for -inf, NaN
    x = _mm256_max_ps(x, lo);
    const Vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    Vec y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), live);
  }
};

}  // namespace
}  // namespace crystal_vllm

#include "kernel_impl.h"

namespace crystal_vllm {

DecodeStatus decode_attention_avx2(const DecodeArgs& args, int64_t begin, int64_t end) {
  return decode_dispatch<Avx2>(args, begin, end);
}

}  // namespace crystal_vllm

#pragma GCC pop_options

#endif  // defined(__x86_64__)
