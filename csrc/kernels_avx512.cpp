// AVX-512F build of the decode attention kernel (16 floats per vector). Compiled for
// every x86-64 machine through the target pragma below and only called when the CPU
// reports avx512f (see ops.cpp), so the extension still loads on AVX2-only CPUs.
#include "kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 flags its own _mm512_undefined_*() placeholders inside avx512fintrin.h.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace crystal_vllm {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kRegisters = 32;
  static constexpr int64_t kWidth = 16;

  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec set1(float x) { return _mm512_set1_ps(x); }
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  // bf16 is the upper half of a float32: widen to 32 bits and shift into place.
  static inline Vec load_bf16(const uint16_t* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  static inline Vec load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline __mmask16 first_lanes(int64_t n) {
    return static_cast<__mmask16>((1u << static_cast<unsigned>(n)) - 1u);
  }
  // Masked-off lanes are not accessed (AVX-512 suppresses their faults).
  static inline Vec load_partial(const float* p, int64_t n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p);
  }
  static inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static inline void store_partial(float* p, Vec v, int64_t n) {
    _mm512_mask_storeu_ps(p, first_lanes(n), v);
  }
  static inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
  static inline float reduce_max(Vec v) { return _mm512_reduce_max_ps(v); }
  // Transposing sum of 16 vectors: pairwise unpack/shuffle adds give, per 128-bit lane,
  // the partial sums of rows 4i..4i+3; two rounds of 128-bit lane shuffles finish them.
  static inline Vec reduce_rows(const Vec* v) {
    Vec quad[4];
    for (int i = 0; i < 4; ++i) {
      const Vec* r = v + 4 * i;
      const Vec s01 = _mm512_add_ps(_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
      const Vec s23 = _mm512_add_ps(_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
      quad[i] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    }
    const Vec x = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88),
                                _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    const Vec y = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88),
                                _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  }
  static inline Vec select(uint32_t bits, Vec a, float fill) {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), _mm512_set1_ps(fill), a);
  }

  // Cephes' expf: exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2, exp(r) by a
  // degree-6 polynomial (about 1 ulp). scalef applies 2^n without integer tricks.
  static inline Vec exp_nonpos(Vec x) {
    const Vec lo = _mm512_set1_ps(-87.33654475f);  // ln(FLT_MIN)
    const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // false for -inf, NaN
    x = _mm512_max_ps(x, lo);
    const Vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    Vec y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(y, n));
  }
};

}  // namespace
}  // namespace crystal_vllm

#include "kernel_impl.h"

namespace crystal_vllm {

DecodeStatus decode_attention_avx512(const DecodeArgs& args, int64_t begin, int64_t end) {
  return decode_dispatch<Avx512>(args, begin, end);
}

}  // namespace crystal_vllm

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // defined(__x86_64__)
