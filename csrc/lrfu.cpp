// The LRFU update of Crystal-KV's Algorithm 1 for one (request, KV head) of one layer,
// called by the fused decode op right after the head's attention (ops.cpp), while its
// probabilities are still in cache. Semantics are those of crystal_vllm.policy.lrfu
// (observe, select_evictions, remove) for hits_before_full=True, with or without
// protected prompt entries:
//   1. GQA-reduce the G probability rows to one distribution over the head's slots;
//   2. top-p hits: the smallest set taken by decreasing probability (ties: larger
//      position first) whose mass reaches top_p times the head's total;
//   3. each hit not already rewarded at step t: crf = lam^(t - tau) * crf + 1, tau = t;
//   4. evict the entries with the lowest decayed crf (ties: smaller tau, then smaller
//      position) until the head holds max(budget, #recent entries), never a recent one:
//      one born at t, or a decode entry born in the last min(recent_window, budget) steps.
// Everything is linear in the head's slots (expected): the nucleus is found by a
// histogram of probability mass and a quickselect inside one bucket instead of a sort, and
// lam^age comes from a per-thread table. The passes over the slots take no branch whose
// outcome is random from entry to entry (the predictor would miss it again and again);
// the two that do the work per slot have AVX2 versions (target attribute, used when the
// op's ISA allows it), the rest is compiled for the baseline ISA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace crystal_vllm {
namespace {

constexpr float kInf = __builtin_inff();

// One entry of the head, for the top-p pass: its probability and slot in one word, so
// that the partition moves an entry with one 8-byte load and store (two 4-byte stores
// read back by one 8-byte load would stall store-to-load forwarding).
struct Ranked {
  uint64_t word;  // the probability's bits above the slot

  static Ranked of(float p, int32_t slot) {
    uint32_t bits;
    std::memcpy(&bits, &p, sizeof(bits));
    return Ranked{static_cast<uint64_t>(bits) << 32 | static_cast<uint32_t>(slot)};
  }
  float p() const {
    const uint32_t bits = static_cast<uint32_t>(word >> 32);
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  }
  int32_t slot() const { return static_cast<int32_t>(static_cast<uint32_t>(word)); }
};

// One eviction candidate, ordered by (decayed crf, tau, position), lowest first.
struct Victim {
  float score;
  int64_t tau;
  int64_t position;
  int32_t slot;
};

inline bool evicts_before(const Victim& x, const Victim& y) {
  if (x.score != y.score) return x.score < y.score;
  if (x.tau != y.tau) return x.tau < y.tau;
  return x.position < y.position;
}

// lam^age exactly as torch.pow(lam, float(age)) rounds it (float32 powf), tabulated per
// thread: ages are small integers that repeat across entries, heads and steps. Callers
// take a reference once per head (thread-local access is a call in a shared library) and
// extend the table to the head's step once, so the per-slot lookup is a plain load.
class DecayTable {
 public:
  static constexpr int64_t kMaxCached = 1 << 16;

  // Covers ages [0, min(n, kMaxCached)) for lam; returns the number of ages covered.
  int64_t cover(float lam, int64_t n) {
    if (lam != lam_) {
      lam_ = lam;
      table_.clear();
    }
    n = std::min(n, kMaxCached);
    while (static_cast<int64_t>(table_.size()) < n) {
      table_.push_back(std::pow(lam_, static_cast<float>(table_.size())));
    }
    return static_cast<int64_t>(table_.size());
  }
  const float* data() const { return table_.data(); }

 private:
  float lam_ = -1.0f;
  std::vector<float> table_;
};

thread_local DecayTable decay_table;

// The number k of top-p hits among ranked[0, n): entries ordered by (p, position)
// descending, k is the first index whose prefix mass (in float) reaches `threshold`.
// Quickselect on mass: each round partitions the open range around a pivot and keeps the
// side that holds the boundary, so the cost is linear in n on average. On return the hits
// occupy ranked[0, k) (in no particular order). Positions are distinct, so the order is
// strict and ties in p are resolved exactly as the reference's sort does.
int64_t nucleus_size(Ranked* ranked, int64_t n, const int64_t* position, float threshold,
                     double before) {
  // x ranks before y. Positions are read only for equal probabilities: the position array
  // is not in cache, and a branch on that rare case is predictable.
  auto above = [position](const Ranked& x, const Ranked& y) {
    const float px = x.p(), py = y.p();
    bool up = px > py;
    if (px == py) up = position[x.slot()] > position[y.slot()];
    return up;
  };
  int64_t lo = 0, hi = n;  // ranked[0, lo) are hits, ranked[hi, n) are not
  // `before`: the mass ranked above ranked[0, n), plus that of ranked[0, lo).
  while (lo < hi) {
    // Median of three as the pivot, moved to ranked[hi - 1].
    const int64_t mid = lo + (hi - lo) / 2;
    if (above(ranked[mid], ranked[lo])) std::swap(ranked[mid], ranked[lo]);
    if (above(ranked[hi - 1], ranked[lo])) std::swap(ranked[hi - 1], ranked[lo]);
    if (above(ranked[mid], ranked[hi - 1])) std::swap(ranked[mid], ranked[hi - 1]);
    const Ranked pivot = ranked[hi - 1];
    // Branchless Lomuto partition: whether an entry ranks above the pivot is a coin flip
    // to the branch predictor, so the swap is unconditional and only `split` moves.
    int64_t split = lo;
    double mass = 0.0;
    for (int64_t i = lo; i < hi - 1; ++i) {
      const Ranked x = ranked[i];
      const bool up = above(x, pivot);
      ranked[i] = ranked[split];
      ranked[split] = x;
      split += up;
      mass += static_cast<double>(x.p()) * up;  // p or 0 (p is finite), without a branch
    }
    std::swap(ranked[split], ranked[hi - 1]);  // pivot at `split`, above it in [lo, split)
    if (static_cast<float>(before + mass) < threshold) {
      // The pivot is a hit, hence so is everything ranked above it.
      before += mass + pivot.p();
      lo = split + 1;
    } else {
      hi = split;  // neither the pivot nor anything below it is a hit
    }
  }
  return lo;
}

// Probability buckets for the top-p pass: a non-negative float's exponent and two leading
// mantissa bits, which orders like the float itself (its bit pattern is monotone), for
// p in [2^-40, 2); smaller probabilities share bucket 0. Entries of one probability always
// share a bucket, so ties never straddle two buckets.
constexpr int kBucketShift = 21;  // 23 mantissa bits - 2 kept
constexpr int kBucketBase = (127 - 40) << 2;  // bucket 0: below 2^-40
constexpr int kBuckets = (128 << 2) - kBucketBase;  // up to 2^1

inline int bucket_of(float p) {
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  const int b = static_cast<int>(bits >> kBucketShift) - kBucketBase;
  return b < 0 ? 0 : (b >= kBuckets ? kBuckets - 1 : b);
}

// Scratch layout: the reduced distribution, the eviction scores, each slot's bucket and
// the slots of the boundary bucket (S 4-byte words each, the last with 4 spare), then S
// records (Ranked or Victim), each part padded to 64 bytes.
int64_t padded_words(int64_t n) { return (n + 15) / 16 * 16; }

// One past the last valid slot of valid[0, n) (0 if none): heads fill from slot 0, so the
// unused tail of the last head-block is skipped eight flags at a time.
int64_t valid_end(const uint8_t* valid, int64_t n) {
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, valid + n - 8, sizeof(word));
    if (word != 0) break;
    n -= 8;
  }
  while (n > 0 && !valid[n - 1]) --n;
  return n;
}

// The lowest of x[0, n), +inf if n == 0; NaN entries are ignored. Eight independent
// lanes, so the compiler keeps them in vector registers.
float lowest_of(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = kInf;
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] = x[s + j] < lanes[j] ? x[s + j] : lanes[j];
  }
  float low = kInf;
  for (int j = 0; j < kLanes; ++j) low = lanes[j] < low ? lanes[j] : low;
  for (; s < n; ++s) low = x[s] < low ? x[s] : low;
  return low;
}

// One head's slots and the per-slot scratch of the passes below.
struct HeadPass {
  const uint8_t* valid;
  const uint8_t* prompt;
  const int64_t* born;
  float* crf;
  int64_t* tau;
  float* p;  // the reduced distribution
  int32_t* bucket;
  float* score;  // eviction score; +inf for entries that may not be evicted
  int32_t* members;  // the valid slots of the boundary bucket, in slot order
  int64_t t;
  int64_t recent_after;  // decode entries born after this step are recent (kept)
  bool protect;  // prompt entries are not counted in the budget and never evicted
};

// Whether the entry in slot s is recent: born at t, or a decode entry born after
// recent_after (never evicted in this step).
inline bool is_recent(const HeadPass& h, int64_t s) {
  return (h.born[s] == h.t) | ((h.prompt[s] == 0) & (h.born[s] > h.recent_after));
}

// p[s] <- max(p[s], 0) + 0 (-0.0 ranks as 0.0) on valid slots, 0 elsewhere, and its bucket;
// for slots [begin, end).
void bucket_range(const HeadPass& h, int64_t begin, int64_t end) {
  for (int64_t s = begin; s < end; ++s) {
    const float ps = h.valid[s] ? std::max(h.p[s], 0.0f) + 0.0f : 0.0f;
    h.p[s] = ps;
    h.bucket[s] = bucket_of(ps);
  }
}

// lam^age: the per-thread table for ages [0, cached), powf beyond (and for the negative
// ages of an inconsistent state, which the table must never be indexed with).
struct Decay {
  const float* table;
  int64_t cached;
  float lam;
  float operator()(int64_t age) const {
    return static_cast<uint64_t>(age) < static_cast<uint64_t>(cached)
               ? table[age]
               : std::pow(lam, static_cast<float>(age));
  }
};

// Entries counted in the budget (n), the recent ones among them, and the boundary bucket's.
struct Counts {
  int64_t n = 0;
  int64_t recent = 0;
  int64_t members = 0;
};

// The CRF update and eviction scores of slots [begin, end): an entry of a bucket above
// `boundary` is a hit, crf = lam^(t - tau) * crf + 1 and tau = t, unless already rewarded
// at t (the token inserted in this step); a candidate's score is its decayed crf after
// the update (for a hit lam^0 * crf = crf). The boundary bucket's entries are treated as
// non-hits here and listed in h.members.
void update_range(const HeadPass& h, const Decay& decay, int boundary, int64_t begin,
                  int64_t end, Counts& counts) {
  const int64_t t = h.t;
  for (int64_t s = begin; s < end; ++s) {
    const bool live = h.valid[s];
    const bool counted = live & !(h.protect & (h.prompt[s] != 0));
    const bool newborn = is_recent(h, s);
    counts.n += counted;
    counts.recent += counted & newborn;
    const bool hit = live & (h.bucket[s] > boundary);
    const int64_t last = h.tau[s];
    const float decayed = h.crf[s] * decay(live ? t - last : 0);
    const float rewarded = decayed + 1.0f;
    const bool fresh = hit & (last != t);
    h.crf[s] = fresh ? rewarded : h.crf[s];
    h.tau[s] = hit ? t : last;
    h.score[s] = (counted & !newborn) ? (fresh ? rewarded : decayed) : kInf;
    h.members[counts.members] = static_cast<int32_t>(s);  // branch-free: a random subset
    counts.members += live & (h.bucket[s] == boundary);
  }
}

#if defined(__x86_64__)
// AVX2 versions of bucket_range and update_range over the whole head (any tail in scalar
// code), with the same operations in the same order, hence bit-identical results. No FMA:
// crf * lam^age + 1 rounds twice, as in the reference.
__attribute__((target("avx2"))) void bucket_avx2(const HeadPass& h, int64_t E) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i base = _mm256_set1_epi32(kBucketBase);
  const __m256i top = _mm256_set1_epi32(kBuckets - 1);
  int64_t s = 0;
  for (; s + 8 <= E; s += 8) {
    const __m256i live = _mm256_cmpgt_epi32(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h.valid + s))),
        _mm256_setzero_si256());
    // max(0, x) returns x when x is NaN or -0.0, as std::max(x, 0.0f) does.
    __m256 ps = _mm256_add_ps(_mm256_max_ps(zero, _mm256_loadu_ps(h.p + s)), zero);
    ps = _mm256_and_ps(ps, _mm256_castsi256_ps(live));
    _mm256_storeu_ps(h.p + s, ps);
    __m256i b = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(ps), kBucketShift), base);
    b = _mm256_min_epi32(_mm256_max_epi32(b, _mm256_setzero_si256()), top);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h.bucket + s), b);
  }
  bucket_range(h, s, E);
}

// The low halves of four 64-bit lane masks, as a 4 x 32-bit float mask.
__attribute__((target("avx2"))) inline __m128 narrow(__m256i mask) {
  const __m256 f = _mm256_castsi256_ps(mask);
  return _mm_shuffle_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1),
                        _MM_SHUFFLE(2, 0, 2, 0));
}

// For each 4-bit mask, the indices of its set bits, first (then 0s): a compressing store.
alignas(16) constexpr int32_t kCompress[16][4] = {
    {0, 0, 0, 0}, {0, 0, 0, 0}, {1, 0, 0, 0}, {0, 1, 0, 0}, {2, 0, 0, 0}, {0, 2, 0, 0},
    {1, 2, 0, 0}, {0, 1, 2, 0}, {3, 0, 0, 0}, {0, 3, 0, 0}, {1, 3, 0, 0}, {0, 1, 3, 0},
    {2, 3, 0, 0}, {0, 2, 3, 0}, {1, 2, 3, 0}, {0, 1, 2, 3}};

// Four bytes -> all-ones 64-bit lanes where they are not 0.
__attribute__((target("avx2"))) inline __m256i flags(const uint8_t* x) {
  int32_t word;
  std::memcpy(&word, x, sizeof(word));
  return _mm256_cmpgt_epi64(_mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word)),
                            _mm256_setzero_si256());
}

__attribute__((target("avx2"))) void update_avx2(const HeadPass& h, const Decay& decay,
                                                  int boundary, int64_t E, Counts& counts) {
  const __m256i t = _mm256_set1_epi64x(h.t);
  const __m256i cached = _mm256_set1_epi64x(decay.cached);
  const __m256i above = _mm256_set1_epi64x(boundary);
  const __m256i zero = _mm256_setzero_si256();
  const __m128 one = _mm_set1_ps(1.0f), inf = _mm_set1_ps(kInf);
  const __m256i after = _mm256_set1_epi64x(h.recent_after);
  __m256i n = zero, recent = zero;  // minus the counts, per lane
  int64_t members = counts.members;
  int64_t s = 0;
  for (; s + 4 <= E; s += 4) {
    const __m256i live = flags(h.valid + s);
    const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h.tau + s));
    const __m256i age = _mm256_and_si256(live, _mm256_sub_epi64(t, last));
    const __m256i inside =
        _mm256_andnot_si256(_mm256_cmpgt_epi64(zero, age), _mm256_cmpgt_epi64(cached, age));
    if (_mm256_movemask_pd(_mm256_castsi256_pd(inside)) != 0xF) {  // beyond the table: powf
      counts.members = members;
      update_range(h, decay, boundary, s, s + 4, counts);
      members = counts.members;
      continue;
    }
    const __m256i in_prompt = flags(h.prompt + s);
    const __m256i counted = h.protect ? _mm256_andnot_si256(in_prompt, live) : live;
    const __m256i born = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h.born + s));
    const __m256i newborn =
        _mm256_or_si256(_mm256_cmpeq_epi64(born, t),
                        _mm256_andnot_si256(in_prompt, _mm256_cmpgt_epi64(born, after)));
    n = _mm256_add_epi64(n, counted);
    recent = _mm256_add_epi64(recent, _mm256_and_si256(counted, newborn));
    const __m256i bucket =
        _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h.bucket + s)));
    const __m256i hit = _mm256_and_si256(live, _mm256_cmpgt_epi64(bucket, above));
    const int at = _mm256_movemask_pd(
        _mm256_castsi256_pd(_mm256_and_si256(live, _mm256_cmpeq_epi64(bucket, above))));
    const __m128i first = _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress[at]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h.members + members),
                     _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(s)), first));
    members += __builtin_popcount(at);
    const __m128 crf = _mm_loadu_ps(h.crf + s);
    const __m128 decayed = _mm_mul_ps(crf, _mm256_i64gather_ps(decay.table, age, 4));
    const __m128 rewarded = _mm_add_ps(decayed, one);
    const __m128 fresh = narrow(_mm256_andnot_si256(_mm256_cmpeq_epi64(last, t), hit));
    _mm_storeu_ps(h.crf + s, _mm_blendv_ps(crf, rewarded, fresh));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h.tau + s), _mm256_blendv_epi8(last, t, hit));
    const __m128 candidate = narrow(_mm256_andnot_si256(newborn, counted));
    _mm_storeu_ps(h.score + s,
                  _mm_blendv_ps(inf, _mm_blendv_ps(decayed, rewarded, fresh), candidate));
  }
  int64_t lanes[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), n);
  counts.n -= lanes[0] + lanes[1] + lanes[2] + lanes[3];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), recent);
  counts.recent -= lanes[0] + lanes[1] + lanes[2] + lanes[3];
  counts.members = members;
  update_range(h, decay, boundary, s, E, counts);
}
#endif

}  // namespace

void lrfu_insert(const LrfuArgs& a, int64_t item) {
  const int64_t H = a.num_kv_heads, S = a.num_slots;
  const int64_t req = item / H, head = item % H;
  const int64_t slot = a.slots[item];
  if (slot < 0) return;
  const int64_t row = a.rows[req];
  const int64_t at = row * a.stride_row + head * S + slot;
  const int64_t t = a.step[row];
  a.valid[at] = 1;
  a.position[at] = a.positions[req];
  a.born[at] = t;
  a.crf[at] = 1.0f;
  a.tau[at] = t;
  a.prompt[at] = 0;
}

int64_t lrfu_scratch_bytes(int64_t num_slots) {
  return (3 * padded_words(num_slots) + padded_words(num_slots + 4)) * 4 +
         num_slots * static_cast<int64_t>(std::max(sizeof(Ranked), sizeof(Victim)));
}

void lrfu_observe_evict(const LrfuArgs& a, int64_t item, int64_t extent, const float* probs,
                        void* scratch_buf) {
  float* scratch = static_cast<float*>(scratch_buf);
  // S: the distance between heads (and probability rows).
  const int64_t H = a.num_kv_heads, G = a.group, S = a.num_slots;
  const int64_t req = item / H, head = item % H;
  const int64_t row = a.rows[req];
  const int64_t base = row * a.stride_row + head * S;
  uint8_t* valid = a.valid + base;
  int64_t* position = a.position + base;
  int64_t* born = a.born + base;
  float* crf = a.crf + base;
  int64_t* tau = a.tau + base;
  uint8_t* prompt = a.prompt + base;
  const int64_t t = a.step[row];
  // E: up to the last valid slot; no pass below looks further.
  const int64_t E = valid_end(valid, extent);
  float* p = scratch;
  float* score = scratch + padded_words(S);
  int32_t* bucket = reinterpret_cast<int32_t*>(score + padded_words(S));
  int32_t* members = bucket + padded_words(S);
  Ranked* ranked = reinterpret_cast<Ranked*>(members + padded_words(S + 4));
  const int64_t window = std::max<int64_t>(1, std::min(a.recent_window, a.budgets[item]));
  const HeadPass pass{valid, prompt, born, crf, tau, p, bucket, score, members, t, t - window,
                      a.protect_prompt};

  // With top_p >= 1 every valid entry is a hit (boundary -1, step 3) and the
  // probabilities are not needed.
  int boundary = -1;
  float threshold = 0.0f;
  double above = 0.0;  // mass of the buckets above `boundary`
  if (a.top_p < 1.0f) {
    // 1. GQA reduction, into p[0, E). Invalid slots hold 0 in every row.
    if (G == 1) {
      std::memcpy(p, probs, E * sizeof(float));
    } else if (!a.gqa_max) {
      // Row by row (contiguous, vectorised); the sum order ((p0 + p1) + p2) ... / G is the
      // reference's mean.
      std::memcpy(p, probs, E * sizeof(float));
      for (int64_t g = 1; g < G; ++g) {
        const float* row = probs + g * S;
        for (int64_t s = 0; s < E; ++s) p[s] += row[s];
      }
      const float groups = static_cast<float>(G);
      for (int64_t s = 0; s < E; ++s) p[s] /= groups;
    } else {
      std::memcpy(p, probs, E * sizeof(float));
      for (int64_t g = 1; g < G; ++g) {
        const float* row = probs + g * S;
        for (int64_t s = 0; s < E; ++s) p[s] = std::max(p[s], row[s]);
      }
      double total = 0.0;
      for (int64_t s = 0; s < E; ++s) total += p[s];
      const float sum = static_cast<float>(total);
      for (int64_t s = 0; s < E; ++s) p[s] = sum > 0.0f ? p[s] / sum : 0.0f;
    }

    // 2. The top-p boundary: a histogram of mass over probability buckets finds the
    // bucket holding it. Every entry of a higher bucket is a hit, none of a lower one is,
    // and only that bucket's entries are ranked exactly (step 3).
#if defined(__x86_64__)
    if (a.avx2) {
      bucket_avx2(pass, E);
    } else {
      bucket_range(pass, 0, E);
    }
#else
    bucket_range(pass, 0, E);
#endif
    // Four interleaved histograms, so that entries of one bucket in a row do not wait for
    // each other's read-modify-write of the same counter.
    constexpr int kCopies = 4;
    double hist[kCopies][kBuckets] = {};
    int64_t s = 0;
    for (; s + kCopies <= E; s += kCopies) {
      for (int c = 0; c < kCopies; ++c) hist[c][bucket[s + c]] += p[s + c];
    }
    for (; s < E; ++s) hist[0][bucket[s]] += p[s];
    double mass[kBuckets];
    double total = 0.0;
    for (int b = 0; b < kBuckets; ++b) {
      mass[b] = (hist[0][b] + hist[1][b]) + (hist[2][b] + hist[3][b]);
      total += mass[b];
    }
    threshold = a.top_p * static_cast<float>(total);
    boundary = kBuckets - 1;
    while (boundary > 0 && static_cast<float>(above + mass[boundary]) < threshold) {
      above += mass[boundary--];
    }
  } else {
    std::memset(bucket, 0, E * sizeof(int32_t));
  }

  // 3. CRF update of the hits above the boundary bucket and every entry's eviction score,
  // in one pass that treats the boundary bucket's entries as non-hits and lists them; then
  // the nucleus inside that bucket (a quickselect on mass), whose hits are updated and
  // rescored.
  DecayTable& table = decay_table;
  const int64_t cached = table.cover(a.lam, t + 1);  // valid entries' ages: [0, t]
  const Decay lam_pow{table.data(), cached, a.lam};
  Counts counts;
#if defined(__x86_64__)
  if (a.avx2) {
    update_avx2(pass, lam_pow, boundary, E, counts);
  } else {
    update_range(pass, lam_pow, boundary, 0, E, counts);
  }
#else
  update_range(pass, lam_pow, boundary, 0, E, counts);
#endif
  auto candidate = [&](int64_t s) {
    return valid[s] && !is_recent(pass, s) && !(a.protect_prompt && prompt[s]);
  };
  if (counts.members > 0) {
    const int64_t m = counts.members;
    for (int64_t i = 0; i < m; ++i) ranked[i] = Ranked::of(p[members[i]], members[i]);
    const int64_t hits = nucleus_size(ranked, m, position, threshold, above);
    for (int64_t i = 0; i < hits; ++i) {
      const int32_t s = ranked[i].slot();
      if (tau[s] == t) continue;  // already rewarded at this step
      crf[s] = crf[s] * lam_pow(t - tau[s]) + 1.0f;
      tau[s] = t;
      if (candidate(s)) score[s] = crf[s];
    }
  }

  // 4. Evictions down to max(budget, #recent), never a recent entry: the lowest scores,
  // ties by smaller tau, then smaller position.
  const int64_t keep = std::max(a.budgets[item], counts.recent);
  const int64_t excess = counts.n - keep;
  int32_t dropped = 0;
  auto drop = [&](int64_t s) {
    valid[s] = 0;
    position[s] = -1;
    born[s] = 0;
    crf[s] = 0.0f;
    tau[s] = 0;
    prompt[s] = 0;
    ++dropped;
  };
  if (excess == 1) {  // the steady state: the lowest score, then the tie-breaks among the
                      // entries that hold it (usually one)
    const float low = lowest_of(score, E);
    int64_t best = -1;
    auto consider = [&](int64_t s) {
      if (score[s] != low || !candidate(s)) return;
      if (best < 0 || tau[s] < tau[best] || (tau[s] == tau[best] && position[s] < position[best])) {
        best = s;
      }
    };
    constexpr int kChunk = 8;  // tested whole (vectorised), searched only if it holds `low`
    int64_t s = 0;
    for (; s + kChunk <= E; s += kChunk) {
      bool holds = false;
      for (int j = 0; j < kChunk; ++j) holds |= score[s + j] == low;
      if (!holds) continue;
      for (int j = 0; j < kChunk; ++j) consider(s + j);
    }
    for (; s < E; ++s) consider(s);
    if (best >= 0) drop(best);
  } else if (excess > 1) {
    Victim* cand = reinterpret_cast<Victim*>(ranked);
    int64_t count = 0;
    for (int64_t s = 0; s < E; ++s) {
      if (!candidate(s)) continue;
      cand[count++] = Victim{score[s], tau[s], position[s], static_cast<int32_t>(s)};
    }
    const int64_t evict = std::min(excess, count);
    if (evict < count) std::nth_element(cand, cand + evict, cand + count, evicts_before);
    for (int64_t i = 0; i < evict; ++i) drop(cand[i].slot);
  }
  a.evicted[item] = dropped;
}

}  // namespace crystal_vllm
