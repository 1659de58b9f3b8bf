// Body of the paged decode attention kernel, generic over an instruction-set traits
// class. Each kernels_*.cpp defines its traits under its own `#pragma GCC target` and
// then includes this file, so every function here is compiled once per ISA. All of it
// lives in an anonymous namespace: each translation unit keeps a private copy and the
// linker can never substitute the AVX-512 one for another (see kernels.h).
//
// The traits class `Isa` provides, with Vec holding kWidth floats:
//   Vec zero(), set1(float), load(const float*), load_bf16(const uint16_t*),
//       load_f16(const uint16_t*), load_partial(const float* p, int64_t n, float fill)
//       (first n lanes from p, the rest `fill`; never touches p[n..]);
//   void store(float*, Vec), store_partial(float*, Vec, int64_t n);
//   Vec add, sub, mul, max, fmadd(a, b, c) = a * b + c;
//   float reduce_add(Vec), reduce_max(Vec);
//   Vec reduce_rows(const Vec* v): lane j = sum of the lanes of v[j], for kWidth inputs;
//   Vec select(uint32_t bits, Vec a, float fill): lane j = bit j ? a[j] : fill;
//   (the last two only for kWidth > 1)
//   Vec exp_nonpos(Vec x): exp(x) for x <= 0, and exactly 0 for x < ln(FLT_MIN) (about
//       -87.34), including x = -inf, which marks invalid slots below.
//
// No header may be included from here (the includer has switched the target ISA).

namespace crystal_vllm {
namespace {

constexpr float kNegInf = -__builtin_inff();

// Loads kWidth consecutive elements of a K or V row as float32.
template <class Isa, KvDtype kDtype>
struct KvLoad;

template <class Isa>
struct KvLoad<Isa, KvDtype::kFloat32> {
  using Elem = float;
  static inline typename Isa::Vec load(const Elem* p) { return Isa::load(p); }
};

template <class Isa>
struct KvLoad<Isa, KvDtype::kBFloat16> {
  using Elem = uint16_t;
  static inline typename Isa::Vec load(const Elem* p) { return Isa::load_bf16(p); }
};

template <class Isa>
struct KvLoad<Isa, KvDtype::kFloat16> {
  using Elem = uint16_t;
  static inline typename Isa::Vec load(const Elem* p) { return Isa::load_f16(p); }
};

// Head-blocks are scattered through the pool, so the hardware prefetcher, which follows
// one block's rows, stalls at every block boundary; the passes below prefetch ahead.
inline void prefetch_row(const void* p, int64_t bytes, bool to_l1) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) {
    if (to_l1) {
      __builtin_prefetch(c + i, 0, 3);
    } else {
      __builtin_prefetch(c + i, 0, 2);
    }
  }
}

template <class Isa>
inline void fill(float* p, int64_t n, float value) {
  constexpr int64_t W = Isa::kWidth;
  const typename Isa::Vec v = Isa::set1(value);
  int64_t i = 0;
  for (; i + W <= n; i += W) Isa::store(p + i, v);
  if (i < n) Isa::store_partial(p + i, v, n - i);
}

// In place: row[0, n) <- softmax(row). -inf entries become exactly 0. The row must hold
// at least one finite entry, so the sum is >= 1 (its maximum contributes exp(0)).
template <class Isa>
inline void softmax_row(float* row, int64_t n) {
  using Vec = typename Isa::Vec;
  constexpr int64_t W = Isa::kWidth;
  Vec vmax = Isa::set1(kNegInf);
  int64_t i = 0;
  for (; i + W <= n; i += W) vmax = Isa::max(vmax, Isa::load(row + i));
  if (i < n) vmax = Isa::max(vmax, Isa::load_partial(row + i, n - i, kNegInf));
  const Vec m = Isa::set1(Isa::reduce_max(vmax));

  Vec vsum = Isa::zero();
  for (i = 0; i + W <= n; i += W) {
    const Vec e = Isa::exp_nonpos(Isa::sub(Isa::load(row + i), m));
    Isa::store(row + i, e);
    vsum = Isa::add(vsum, e);
  }
  if (i < n) {
    const Vec e = Isa::exp_nonpos(Isa::sub(Isa::load_partial(row + i, n - i, kNegInf), m));
    Isa::store_partial(row + i, e, n - i);
    vsum = Isa::add(vsum, e);
  }

  const Vec inv = Isa::set1(1.0f / Isa::reduce_add(vsum));
  for (i = 0; i + W <= n; i += W) Isa::store(row + i, Isa::mul(Isa::load(row + i), inv));
  if (i < n) {
    Isa::store_partial(row + i, Isa::mul(Isa::load_partial(row + i, n - i, 0.0f), inv), n - i);
  }
}

// K (V with +pool_stride_kv) of table entry `blk`, or nullptr past the end or on an entry
// that names no head-block of the pool.
template <class Elem>
inline const Elem* next_block(const DecodeArgs& a, const int32_t* table, int64_t blk,
                              int64_t num_blocks) {
  if (blk >= num_blocks) return nullptr;
  const int64_t id = table[blk];
  if (id < 0 || id >= a.num_head_blocks) return nullptr;
  return static_cast<const Elem*>(a.kv_pool) + id * a.pool_stride_block;
}

// Pass 1 for one slot and any D: scale * q_g . k for the G query rows q[g * D, (g + 1) * D),
// stored at scores[g * stride].
template <class Isa, class Load>
inline void score_slot(const float* q, const typename Load::Elem* k, int64_t G, int64_t D,
                       float scale, float* scores, int64_t stride) {
  using Vec = typename Isa::Vec;
  constexpr int64_t W = Isa::kWidth;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    Vec acc = Isa::zero();
    for (int64_t d = 0; d < D; d += W) {
      acc = Isa::fmadd(Isa::load(qg + d), Load::load(k + d), acc);
    }
    scores[g * stride] = Isa::reduce_add(acc) * scale;
  }
}

// Pass 1 for up to kWidth consecutive rows of one head-block, D = kNV * kWidth: the
// scores of kWidth slots for one query row come out as one vector (reduce_rows), which
// avoids a horizontal sum and a scalar store per (slot, query row). Rows that are not
// valid are neither read nor scored: they get -inf. Returns whether any row was valid.
template <class Isa, class Load, int kNV>
inline bool score_rows(const float* q, const typename Load::Elem* rows, int64_t row_stride,
                       int64_t count, const uint8_t* valid, int64_t G, float scale,
                       float* scores, int64_t stride) {
  using Vec = typename Isa::Vec;
  constexpr int64_t W = Isa::kWidth, D = kNV * W;
  uint32_t bits = 0;
  for (int64_t j = 0; j < count; ++j) bits |= static_cast<uint32_t>(valid[j] != 0) << j;
  if (bits == 0) {
    for (int64_t g = 0; g < G; ++g) fill<Isa>(scores + g * stride, count, kNegInf);
    return false;
  }
  // K as float32, converted once for all G query rows; zeros for skipped rows.
  alignas(64) float k[W][D];
  for (int64_t j = 0; j < W; ++j) {
    const bool live = (bits >> j) & 1u;
    for (int c = 0; c < kNV; ++c) {
      Isa::store(&k[j][c * W], live ? Load::load(rows + j * row_stride + c * W) : Isa::zero());
    }
  }
  const Vec vscale = Isa::set1(scale);
  for (int64_t g = 0; g < G; ++g) {
    Vec qv[kNV];
    for (int c = 0; c < kNV; ++c) qv[c] = Isa::load(q + g * D + c * W);
    Vec acc[W];
    for (int64_t j = 0; j < W; ++j) {
      acc[j] = Isa::mul(qv[0], Isa::load(&k[j][0]));
      for (int c = 1; c < kNV; ++c) acc[j] = Isa::fmadd(qv[c], Isa::load(&k[j][c * W]), acc[j]);
    }
    const Vec sc = Isa::select(bits, Isa::mul(Isa::reduce_rows(acc), vscale), kNegInf);
    if (count == W) {
      Isa::store(scores + g * stride, sc);
    } else {
      Isa::store_partial(scores + g * stride, sc, count);
    }
  }
  return true;
}

// Pass 3 for kRows query rows starting at row g0, with D = kNV * kWidth: the kRows x kNV
// accumulators live in registers and each V row is loaded once per call.
template <class Isa, class Load, int kNV, int kRows>
inline void accumulate_rows(const DecodeArgs& a, const int32_t* table, const uint8_t* valid,
                            const float* probs, float* out) {
  using Vec = typename Isa::Vec;
  using Elem = typename Load::Elem;
  constexpr int64_t W = Isa::kWidth, D = kNV * W;
  const int64_t S = a.num_slots, P = a.slot_stride, bs = a.block_size;
  const int64_t num_blocks = (S + bs - 1) / bs;
  const Elem* pool = static_cast<const Elem*>(a.kv_pool);
  Vec acc[kRows][kNV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kNV; ++c) acc[r][c] = Isa::zero();
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t id = table[blk];
    if (id < 0) continue;
    const int64_t first = blk * bs;
    const int64_t n = S - first < bs ? S - first : bs;
    const Elem* values = pool + id * a.pool_stride_block + a.pool_stride_kv;
    for (int64_t o = 0; o < n; ++o) {
      const int64_t s = first + o;
      if (!valid[s]) continue;
      const Elem* v = values + o * a.pool_stride_row;
      Vec vv[kNV];
      for (int c = 0; c < kNV; ++c) vv[c] = Load::load(v + c * W);
      for (int r = 0; r < kRows; ++r) {
        const Vec p = Isa::set1(probs[r * P + s]);
        for (int c = 0; c < kNV; ++c) acc[r][c] = Isa::fmadd(p, vv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kNV; ++c) Isa::store(out + r * D + c * W, acc[r][c]);
}

// Pass 3 for any D: accumulates in `out` (L1) instead of registers.
template <class Isa, class Load>
inline void accumulate_any(const DecodeArgs& a, const int32_t* table, const uint8_t* valid,
                           const float* probs, float* out) {
  using Vec = typename Isa::Vec;
  using Elem = typename Load::Elem;
  constexpr int64_t W = Isa::kWidth;
  const int64_t G = a.group, D = a.head_dim, S = a.num_slots, P = a.slot_stride;
  const int64_t bs = a.block_size, num_blocks = (S + bs - 1) / bs;
  const Elem* pool = static_cast<const Elem*>(a.kv_pool);
  fill<Isa>(out, G * D, 0.0f);
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t id = table[blk];
    if (id < 0) continue;
    const int64_t first = blk * bs;
    const int64_t n = S - first < bs ? S - first : bs;
    const Elem* values = pool + id * a.pool_stride_block + a.pool_stride_kv;
    for (int64_t o = 0; o < n; ++o) {
      const int64_t s = first + o;
      if (!valid[s]) continue;
      const Elem* v = values + o * a.pool_stride_row;
      for (int64_t d = 0; d < D; d += W) {
        const Vec vv = Load::load(v + d);
        for (int64_t g = 0; g < G; ++g) {
          float* og = out + g * D + d;
          Isa::store(og, Isa::fmadd(Isa::set1(probs[g * P + s]), vv, Isa::load(og)));
        }
      }
    }
  }
}

// Pass 3 dispatch: rows in tiles of kTile (sized so accumulators plus one V row fit in
// half the vector registers); larger groups re-read V, by then from cache.
template <class Isa, class Load, int kNV>
inline void accumulate_values(const DecodeArgs& a, const int32_t* table, const uint8_t* valid,
                              const float* probs, float* out) {
  if constexpr (kNV == 0) {
    accumulate_any<Isa, Load>(a, table, valid, probs, out);
  } else {
    constexpr int kTile = Isa::kRegisters / 2 / kNV > 0 ? Isa::kRegisters / 2 / kNV : 1;
    constexpr int64_t D = kNV * Isa::kWidth;
    const int64_t G = a.group, P = a.slot_stride;
    int64_t g = 0;
    for (; g + kTile <= G; g += kTile) {
      accumulate_rows<Isa, Load, kNV, kTile>(a, table, valid, probs + g * P, out + g * D);
    }
    switch (G - g) {  // the remainder, 0 < rows < kTile <= 4
      case 1:
        accumulate_rows<Isa, Load, kNV, 1>(a, table, valid, probs + g * P, out + g * D);
        break;
      case 2:
        if constexpr (kTile > 2)
          accumulate_rows<Isa, Load, kNV, 2>(a, table, valid, probs + g * P, out + g * D);
        break;
      case 3:
        if constexpr (kTile > 3)
          accumulate_rows<Isa, Load, kNV, 3>(a, table, valid, probs + g * P, out + g * D);
        break;
      default:
        break;
    }
  }
}

// One (request, KV head) work item per iteration, in three passes over the head's slots:
//   1. scores: probs[g, s] = scale * q_g . k_s for valid s, -inf otherwise. Only valid
//      slots are read, so garbage (even NaN) in free slots cannot leak;
//   2. softmax of each of the G rows, in place;
//   3. out_g = sum_s probs[g, s] * v_s over the valid slots.
// The G query heads sharing the KV head are handled together so K and V are read from
// memory once per work item; the probability rows (G * S floats) stay in L1/L2 between
// passes.
template <class Isa, KvDtype kDtype, int kNV>
DecodeStatus decode_range(const DecodeArgs& a, int64_t begin, int64_t end) {
  using Load = KvLoad<Isa, kDtype>;
  using Elem = typename Load::Elem;

  const int64_t H = a.num_kv_heads, G = a.group, D = a.head_dim, S = a.num_slots;
  const int64_t P = a.slot_stride, bs = a.block_size, Hq = H * G;
  const int64_t num_blocks = (S + bs - 1) / bs;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(Elem));
  const Elem* pool = static_cast<const Elem*>(a.kv_pool);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t req = item / H, head = item % H;
    const int64_t row = a.rows != nullptr ? a.rows[req] : req;
    const int32_t* table = a.tables + row * a.table_stride_row + head * a.max_blocks;
    const uint8_t* valid = a.valid + row * a.valid_stride_row + head * P;
    const float* q = a.query + (req * Hq + head * G) * D;  // G rows of D
    float* out = a.out + (req * Hq + head * G) * D;  // G rows of D
    float* probs = a.probs + (req * Hq + head * G) * P;  // G rows of P, S of them used

    // Pass 1: scores.
    bool any_valid = false;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const int64_t first = blk * bs;
      const int64_t n = S - first < bs ? S - first : bs;
      const int64_t id = table[blk];
      if (id < 0) {
        for (int64_t o = 0; o < n; ++o) {
          if (valid[first + o]) return DecodeStatus::kValidSlotInUnassignedBlock;
        }
        for (int64_t g = 0; g < G; ++g) fill<Isa>(probs + g * P + first, n, kNegInf);
        continue;
      }
      if (id >= a.num_head_blocks) return DecodeStatus::kHeadBlockOutOfRange;
      const Elem* keys = pool + id * a.pool_stride_block;
      const Elem* next_keys = next_block<Elem>(a, table, blk + 1, num_blocks);
      if constexpr (kNV > 0) {
        constexpr int64_t W = Isa::kWidth;
        for (int64_t o = 0; o < n; o += W) {
          const int64_t count = n - o < W ? n - o : W;
          for (int64_t j = o; j < o + count; ++j) {  // see the per-slot loop below
            const int64_t offset = j * a.pool_stride_row;
            if (next_keys != nullptr) prefetch_row(next_keys + offset, row_bytes, true);
            if (valid[first + j]) prefetch_row(keys + a.pool_stride_kv + offset, row_bytes, false);
          }
          any_valid |= score_rows<Isa, Load, kNV>(q, keys + o * a.pool_stride_row,
                                                  a.pool_stride_row, count, valid + first + o, G,
                                                  a.scale, probs + first + o, P);
        }
        continue;
      }
      for (int64_t o = 0; o < n; ++o) {
        const int64_t s = first + o;
        // While scoring this block: next block's K to L1, this block's V to L2 for pass 3.
        const int64_t offset = o * a.pool_stride_row;
        if (next_keys != nullptr) prefetch_row(next_keys + offset, row_bytes, true);
        if (valid[s]) prefetch_row(keys + a.pool_stride_kv + offset, row_bytes, false);
        if (!valid[s]) {
          for (int64_t g = 0; g < G; ++g) probs[g * P + s] = kNegInf;
          continue;
        }
        any_valid = true;
        score_slot<Isa, Load>(q, keys + o * a.pool_stride_row, G, D, a.scale, probs + s, P);
      }
    }

    if (!any_valid) {  // A head with nothing cached attends to nothing.
      fill<Isa>(out, G * D, 0.0f);
      for (int64_t g = 0; g < G; ++g) fill<Isa>(probs + g * P, S, 0.0f);
      continue;
    }

    // Pass 2: softmax.
    for (int64_t g = 0; g < G; ++g) softmax_row<Isa>(probs + g * P, S);

    // Pass 3: weighted sum of V.
    accumulate_values<Isa, Load, kNV>(a, table, valid, probs, out);
  }
  return DecodeStatus::kOk;
}

// Head sizes with a register-resident specialisation: D = 4 or 8 vectors (64 and 128 with
// AVX-512; 32 and 64 with AVX2). Others take the any-D code.
template <class Isa, KvDtype kDtype>
DecodeStatus decode_head_dim(const DecodeArgs& a, int64_t begin, int64_t end) {
  if constexpr (Isa::kWidth > 1) {
    if (a.head_dim == 4 * Isa::kWidth) return decode_range<Isa, kDtype, 4>(a, begin, end);
    if (a.head_dim == 8 * Isa::kWidth) return decode_range<Isa, kDtype, 8>(a, begin, end);
  }
  return decode_range<Isa, kDtype, 0>(a, begin, end);
}

template <class Isa>
DecodeStatus decode_dispatch(const DecodeArgs& a, int64_t begin, int64_t end) {
  switch (a.kv_dtype) {
    case KvDtype::kFloat32:
      return decode_head_dim<Isa, KvDtype::kFloat32>(a, begin, end);
    case KvDtype::kBFloat16:
      return decode_head_dim<Isa, KvDtype::kBFloat16>(a, begin, end);
    case KvDtype::kFloat16:
      return decode_head_dim<Isa, KvDtype::kFloat16>(a, begin, end);
  }
  return DecodeStatus::kOk;  // unreachable: the wrapper only passes the three dtypes
}

}  // namespace
}  // namespace crystal_vllm
