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
//      position) until the head holds max(budget, #entries born at t), never one born at t.
// Everything is linear in the head's slots (expected): the nucleus is found by a
// quickselect on mass instead of a sort, and lam^age comes from a per-thread table.
// Compiled for the baseline ISA; the compiler vectorises the plain loops.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace crystal_vllm {
namespace {

// One entry of the head, for the top-p pass: its probability and slot.
struct Ranked {
  float p;
  int32_t slot;
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

// lam^age exactly as torch.pow(lam, float(age)) rounds it (float32 powf), memoised per
// thread: ages are small integers that repeat across entries, heads and steps. Callers
// take a reference once per head (thread-local access is a call in a shared library).
class DecayTable {
 public:
  void use(float lam) {
    if (lam != lam_) {
      lam_ = lam;
      table_.clear();
    }
  }
  float operator()(int64_t age) {
    if (age >= 0 && age < static_cast<int64_t>(table_.size())) return table_[age];
    if (age < 0 || age >= kMaxCached) return std::pow(lam_, static_cast<float>(age));
    while (static_cast<int64_t>(table_.size()) <= age) {
      table_.push_back(std::pow(lam_, static_cast<float>(table_.size())));
    }
    return table_[age];
  }

 private:
  static constexpr int64_t kMaxCached = 1 << 16;
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
  auto above = [position](const Ranked& x, const Ranked& y) {  // x ranks before y
    return (x.p > y.p) | ((x.p == y.p) & (position[x.slot] > position[y.slot]));
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
      mass += up ? static_cast<double>(x.p) : 0.0;
    }
    std::swap(ranked[split], ranked[hi - 1]);  // pivot at `split`, above it in [lo, split)
    if (static_cast<float>(before + mass) < threshold) {
      // The pivot is a hit, hence so is everything ranked above it.
      before += mass + pivot.p;
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

// Scratch layout: the reduced distribution (S floats), each slot's bucket (S bytes), then
// S records (Ranked or Victim), each part padded to 64 bytes.
int64_t padded_floats(int64_t n) { return (n + 15) / 16 * 16; }
int64_t padded_bytes(int64_t n) { return (n + 63) / 64 * 64; }

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
  return padded_floats(num_slots) * static_cast<int64_t>(sizeof(float)) +
         padded_bytes(num_slots) +
         num_slots * static_cast<int64_t>(std::max(sizeof(Ranked), sizeof(Victim)));
}

void lrfu_observe_evict(const LrfuArgs& a, int64_t item, int64_t extent, const float* probs,
                        void* scratch_buf) {
  float* scratch = static_cast<float*>(scratch_buf);
  // S: the distance between heads (and probability rows); E: the slots that can be valid.
  const int64_t H = a.num_kv_heads, G = a.group, S = a.num_slots, E = extent;
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
  DecayTable& decay = decay_table;
  decay.use(a.lam);

  // 1. GQA reduction, into scratch[0, E). Invalid slots hold 0 in every row.
  float* p = scratch;
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

  // 2 + 3. Top-p hits and the CRF update. A histogram of mass over probability buckets
  // finds the bucket B holding the nucleus boundary in one pass: every entry of a higher
  // bucket is a hit, none of a lower one is, and only B's entries are ranked exactly (a
  // quickselect on mass), so the cost stays linear even for a wide nucleus.
  uint8_t* bucket = reinterpret_cast<uint8_t*>(scratch + padded_floats(S));
  Ranked* ranked = reinterpret_cast<Ranked*>(bucket + padded_bytes(S));
  double hist[kBuckets] = {};
  int64_t n = 0, born_now = 0;
  double total = 0.0;
  for (int64_t s = 0; s < E; ++s) {
    if (!valid[s]) continue;
    const float ps = std::max(p[s], 0.0f) + 0.0f;  // +0.0f: -0.0 ranks as 0.0
    p[s] = ps;
    const int b = bucket_of(ps);
    bucket[s] = static_cast<uint8_t>(b);
    hist[b] += ps;
    total += ps;
    if (a.protect_prompt && prompt[s]) continue;  // attended and rewarded, never counted
    ++n;
    born_now += born[s] == t;
  }
  // Entries that may be evicted: valid, not born at t, not a protected prompt entry.
  auto candidate = [&](int64_t s) {
    return valid[s] && born[s] != t && !(a.protect_prompt && prompt[s]);
  };
  auto reward = [&](int64_t s) {
    if (tau[s] == t) return;  // already rewarded at this step (the token inserted in it)
    crf[s] = crf[s] * decay(t - tau[s]) + 1.0f;
    tau[s] = t;
  };
  if (a.top_p >= 1.0f) {
    for (int64_t s = 0; s < E; ++s) {
      if (valid[s]) reward(s);
    }
  } else {
    const float threshold = a.top_p * static_cast<float>(total);
    int boundary = kBuckets - 1;
    double above = 0.0;  // mass of the buckets above `boundary`
    while (boundary > 0 && static_cast<float>(above + hist[boundary]) < threshold) {
      above += hist[boundary--];
    }
    int64_t m = 0;
    for (int64_t s = 0; s < E; ++s) {
      if (!valid[s]) continue;
      if (bucket[s] > boundary) {
        reward(s);
      } else if (bucket[s] == boundary) {
        ranked[m++] = Ranked{p[s], static_cast<int32_t>(s)};
      }
    }
    const int64_t hits = nucleus_size(ranked, m, position, threshold, above);
    for (int64_t i = 0; i < hits; ++i) reward(ranked[i].slot);
  }

  // 4. Evictions down to max(budget, #born at t), never an entry born at t.
  const int64_t keep = std::max(a.budgets[item], born_now);
  const int64_t excess = n - keep;
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
  if (excess == 1) {  // the steady state: one scan for the lowest
    // Most entries score above the best so far: that test is predictable, and the
    // tie-breaks (tau, position) are read only on equal scores.
    int64_t best = -1;
    float best_score = 0.0f;
    for (int64_t s = 0; s < E; ++s) {
      if (!candidate(s)) continue;
      const float score = crf[s] * decay(t - tau[s]);
      if (best >= 0 && score > best_score) continue;
      if (best < 0 || score < best_score || tau[s] < tau[best] ||
          (tau[s] == tau[best] && position[s] < position[best])) {
        best = s;
        best_score = score;
      }
    }
    if (best >= 0) drop(best);
  } else if (excess > 1) {
    Victim* cand = reinterpret_cast<Victim*>(ranked);
    int64_t m = 0;
    for (int64_t s = 0; s < E; ++s) {
      if (!candidate(s)) continue;
      cand[m++] = Victim{crf[s] * decay(t - tau[s]), tau[s], position[s],
                         static_cast<int32_t>(s)};
    }
    const int64_t count = std::min(excess, m);
    if (count < m) std::nth_element(cand, cand + count, cand + m, evicts_before);
    for (int64_t i = 0; i < count; ++i) drop(cand[i].slot);
  }
  a.evicted[item] = dropped;
}

}  // namespace crystal_vllm
