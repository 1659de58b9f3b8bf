// Torch-facing side of the crystal_vllm._C extension: argument checks, run-time choice
// of the kernel ISA, parallelisation over (request, KV head), and op registration as
// torch.ops.crystal_vllm.{paged_decode_attention, write_kv, lrfu_decode, first_free_slots}.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace crystal_vllm {
namespace {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      return "scalar";
  }
  return "scalar";
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f");
    case Isa::kAvx2:
      // Every AVX2 CPU so far also has F16C; FMA is checked because AMD shipped it apart.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kScalar:
      return true;
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_isa() {
  if (cpu_has(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_has(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

// The ISA in use; tests and benchmarks lower it through set_cpu_isa().
std::atomic<int> g_isa{static_cast<int>(best_isa())};

// The widest kernel the selected ISA allows whose vector width divides head_dim.
DecodeKernel pick_kernel(int64_t head_dim) {
  const Isa isa = static_cast<Isa>(g_isa.load());
#if defined(__x86_64__)
  if (isa == Isa::kAvx512 && head_dim % 16 == 0) return decode_attention_avx512;
  if (isa >= Isa::kAvx2 && head_dim % 8 == 0) return decode_attention_avx2;
#else
  (void)isa;
  (void)head_dim;
#endif
  return decode_attention_scalar;
}

KvDtype kv_dtype_of(const at::Tensor& kv_pool) {
  switch (kv_pool.scalar_type()) {
    case at::kFloat:
      return KvDtype::kFloat32;
    case at::kBFloat16:
      return KvDtype::kBFloat16;
    case at::kHalf:
      return KvDtype::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "crystal_vllm: kv_pool dtype ", kv_pool.scalar_type(),
                        " is not supported (float32, bfloat16, float16)");
  }
  return KvDtype::kFloat32;  // unreachable
}

void check_pool(const at::Tensor& kv_pool, const char* op) {
  TORCH_CHECK_VALUE(kv_pool.dim() == 4 && kv_pool.size(1) == 2, op,
                    ": kv_pool must have shape [num_head_blocks, 2, block_size, head_dim], got ",
                    kv_pool.sizes());
  TORCH_CHECK_VALUE(kv_pool.device().is_cpu(), op, ": kv_pool must be on the CPU");
  TORCH_CHECK_VALUE(kv_pool.stride(3) == 1, op, ": kv_pool's last dimension must be contiguous");
}

// The DecodeArgs fields both decode ops share: query, pool, outputs and sizes. The caller
// sets where the block tables and valid masks are (rows, tables, valid and their strides).
DecodeArgs decode_args(const at::Tensor& q, const at::Tensor& kv_pool, at::Tensor& out,
                       at::Tensor& probs, int64_t num_kv_heads, int64_t max_blocks,
                       int64_t num_slots, double scale) {
  DecodeArgs args{};
  args.query = q.data_ptr<float>();
  args.kv_pool = kv_pool.data_ptr();
  args.pool_stride_block = kv_pool.stride(0);
  args.pool_stride_kv = kv_pool.stride(1);
  args.pool_stride_row = kv_pool.stride(2);
  args.out = out.data_ptr<float>();
  args.probs = probs.data_ptr<float>();
  args.num_head_blocks = kv_pool.size(0);
  args.num_kv_heads = num_kv_heads;
  args.group = q.size(1) / num_kv_heads;
  args.head_dim = q.size(2);
  args.block_size = kv_pool.size(2);
  args.max_blocks = max_blocks;
  args.num_slots = num_slots;
  args.slot_stride = num_slots;
  args.scale = static_cast<float>(scale);
  args.kv_dtype = kv_dtype_of(kv_pool);
  return args;
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention(const at::Tensor& query,
                                                          const at::Tensor& kv_pool,
                                                          const at::Tensor& block_tables,
                                                          const at::Tensor& valid, double scale) {
  constexpr const char* op = "paged_decode_attention";
  check_pool(kv_pool, op);
  TORCH_CHECK_VALUE(query.dim() == 3 && block_tables.dim() == 3 && valid.dim() == 3, op,
                    ": query, block_tables and valid must be 3-d, got ", query.sizes(), ", ",
                    block_tables.sizes(), ", ", valid.sizes());
  const int64_t b = query.size(0), hq = query.size(1), d = query.size(2);
  const int64_t h = block_tables.size(1), mb = block_tables.size(2), s = valid.size(2);
  const int64_t bs = kv_pool.size(2);
  TORCH_CHECK_VALUE(block_tables.size(0) == b && valid.size(0) == b && valid.size(1) == h &&
                        kv_pool.size(3) == d,
                    op, ": shapes disagree: query ", query.sizes(), ", kv_pool ", kv_pool.sizes(),
                    ", block_tables ", block_tables.sizes(), ", valid ", valid.sizes());
  TORCH_CHECK_VALUE(h > 0 && hq % h == 0, op, ": ", hq, " query heads is not a multiple of ", h);
  TORCH_CHECK_VALUE(s <= mb * bs, op, ": valid has ", s, " slots, more than the table's ", mb,
                    " x ", bs, " = ", mb * bs);
  TORCH_CHECK_VALUE(valid.scalar_type() == at::kBool, op, ": valid must be bool");
  TORCH_CHECK_VALUE(at::isIntegralType(block_tables.scalar_type(), /*includeBool=*/false), op,
                    ": block_tables must be an integer tensor");
  TORCH_CHECK_VALUE(at::isFloatingType(query.scalar_type()), op, ": query must be floating");
  TORCH_CHECK_VALUE(kv_pool.size(0) <= INT32_MAX, op, ": more head-blocks than int32 ids");

  // The query and both outputs are small ([b, Hq, D] and [b, Hq, S]): converting them here
  // keeps the kernels to one query/output dtype.
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor mask = valid.contiguous();
  at::Tensor out = at::empty({b, hq, d}, query.options().dtype(at::kFloat));
  at::Tensor probs = at::empty({b, hq, s}, query.options().dtype(at::kFloat));

  DecodeArgs args = decode_args(q, kv_pool, out, probs, h, mb, s, scale);
  args.rows = nullptr;
  args.tables = tables.data_ptr<int32_t>();
  args.table_stride_row = h * mb;
  args.valid = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  args.valid_stride_row = h * s;

  const DecodeKernel kernel = pick_kernel(d);
  std::atomic<int> status{0};
  at::parallel_for(0, b * h, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    const DecodeStatus st = kernel(args, begin, end);
    if (st != DecodeStatus::kOk) {
      int expected = 0;
      status.compare_exchange_strong(expected, static_cast<int>(st));
    }
  });
  const auto found = static_cast<DecodeStatus>(status.load());
  TORCH_CHECK_VALUE(found != DecodeStatus::kValidSlotInUnassignedBlock, op,
                    ": a valid slot lies in an unassigned head-block");
  TORCH_CHECK_INDEX(found != DecodeStatus::kHeadBlockOutOfRange, op,
                    ": a block table names a head-block >= ", kv_pool.size(0));
  return {out.to(query.scalar_type()), probs};
}

// Decode writes b * H * T rows of D elements (T = 1), so a serial loop of memcpy beats
// torch_ref's chain of masking and indexing ops. Everything is checked before the first
// write, so a bad call leaves the pool untouched (as torch_ref does).
void write_kv(const at::Tensor& kv_pool, const at::Tensor& block_tables, const at::Tensor& slots,
              const at::Tensor& key, const at::Tensor& value) {
  constexpr const char* op = "write_kv";
  check_pool(kv_pool, op);
  TORCH_CHECK_VALUE(block_tables.dim() == 3 && slots.dim() == 3, op,
                    ": block_tables and slots must be 3-d");
  const int64_t b = block_tables.size(0), h = block_tables.size(1), mb = block_tables.size(2);
  const int64_t t = slots.size(2), bs = kv_pool.size(2), d = kv_pool.size(3);
  TORCH_CHECK_VALUE(slots.size(0) == b && slots.size(1) == h && key.sizes() == value.sizes(), op,
                    ": shapes disagree: block_tables ", block_tables.sizes(), ", slots ",
                    slots.sizes(), ", key ", key.sizes(), ", value ", value.sizes());
  TORCH_CHECK_VALUE(key.dim() == 4 && key.size(0) == b && key.size(1) == t && key.size(2) == h &&
                        key.size(3) == d,
                    op, ": key must have shape [b, T, H, D] = [", b, ", ", t, ", ", h, ", ", d,
                    "], got ", key.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(block_tables.scalar_type(), false) &&
                        at::isIntegralType(slots.scalar_type(), false),
                    op, ": block_tables and slots must be integer tensors");

  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor slot = slots.to(at::kLong).contiguous();
  const at::Tensor k = key.to(kv_pool.scalar_type()).contiguous();
  const at::Tensor v = value.to(kv_pool.scalar_type()).contiguous();
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  const int64_t* slot_ptr = slot.data_ptr<int64_t>();
  const int64_t capacity = mb * bs, num_head_blocks = kv_pool.size(0);

  for (int64_t i = 0; i < b * h * t; ++i) {
    const int64_t sl = slot_ptr[i];
    if (sl < 0) continue;
    TORCH_CHECK_VALUE(sl < capacity, op, ": slot ", sl, " is out of range; the block table has ",
                      mb, " entries of ", bs, " slots = ", capacity, " slots");
    const int64_t id = table_ptr[(i / t) * mb + sl / bs];
    TORCH_CHECK_VALUE(id >= 0, op, ": a slot falls into an unassigned (-1) block-table entry");
    TORCH_CHECK_INDEX(id < num_head_blocks, op, ": head-block ", id, " >= ", num_head_blocks);
  }

  const int64_t elem = kv_pool.element_size(), row_bytes = d * elem;
  char* pool = static_cast<char*>(kv_pool.data_ptr());
  const char* k_ptr = static_cast<const char*>(k.data_ptr());
  const char* v_ptr = static_cast<const char*>(v.data_ptr());
  for (int64_t i = 0; i < b * h * t; ++i) {
    const int64_t sl = slot_ptr[i];
    if (sl < 0) continue;
    const int64_t req = i / (h * t), head = (i / t) % h, tok = i % t;
    const int64_t id = table_ptr[(i / t) * mb + sl / bs];
    char* dst = pool + (id * kv_pool.stride(0) + (sl % bs) * kv_pool.stride(2)) * elem;
    const int64_t src = ((req * t + tok) * h + head) * row_bytes;
    std::memcpy(dst, k_ptr + src, row_bytes);
    std::memcpy(dst + kv_pool.stride(1) * elem, v_ptr + src, row_bytes);
  }
}

// One decode step of one layer under an LRFU policy (the policy's generic decode_layer): per
// (request, KV head), record the new token in the state, write its K/V, attend over the
// head's entries, then feed the probabilities to the LRFU update and evict, all inside one
// parallel region so the probabilities never leave the core's cache. The state tensors are
// the policy's persistent [R, L, H, S] fields (updated in place); `rows` picks the batch's
// rows and `layer` the layer, so nothing is gathered or scattered around the call.
std::tuple<at::Tensor, at::Tensor> lrfu_decode(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& kv_pool, const at::Tensor& block_tables, const at::Tensor& rows,
    int64_t layer, const at::Tensor& slots, const at::Tensor& positions,
    const at::Tensor& budgets, const at::Tensor& valid, const at::Tensor& position,
    const at::Tensor& born, const at::Tensor& crf, const at::Tensor& tau,
    const at::Tensor& prompt, const at::Tensor& step, double scale, double lam, double top_p,
    bool gqa_max, bool protect_prompt, int64_t recent_window) {
  constexpr const char* op = "lrfu_decode";
  TORCH_CHECK_VALUE(recent_window >= 1, op, ": recent_window must be >= 1, got ", recent_window);
  check_pool(kv_pool, op);
  TORCH_CHECK_VALUE(query.dim() == 3 && key.dim() == 3 && value.sizes() == key.sizes(), op,
                    ": query must be [b, Hq, D] and key, value [b, H, D], got ", query.sizes(),
                    ", ", key.sizes(), ", ", value.sizes());
  TORCH_CHECK_VALUE(valid.dim() == 4 && block_tables.dim() == 4, op,
                    ": the state and block_tables must be [R, L, H, S] and [R, L, H, MB]");
  const int64_t b = query.size(0), hq = query.size(1), d = query.size(2);
  const int64_t R = valid.size(0), L = valid.size(1), h = valid.size(2), S = valid.size(3);
  const int64_t mb = block_tables.size(3), bs = kv_pool.size(2);
  TORCH_CHECK_VALUE(key.size(0) == b && key.size(1) == h && key.size(2) == d &&
                        kv_pool.size(3) == d,
                    op, ": shapes disagree: query ", query.sizes(), ", key ", key.sizes(),
                    ", kv_pool ", kv_pool.sizes(), ", state ", valid.sizes());
  TORCH_CHECK_VALUE(hq % h == 0, op, ": ", hq, " query heads is not a multiple of ", h);
  TORCH_CHECK_VALUE(block_tables.size(0) == R && block_tables.size(1) == L &&
                        block_tables.size(2) == h && S <= mb * bs,
                    op, ": block_tables ", block_tables.sizes(), " do not cover the state ",
                    valid.sizes(), " with head-blocks of ", bs);
  TORCH_CHECK_VALUE(0 <= layer && layer < L, op, ": layer ", layer, " is out of range [0, ", L,
                    ")");
  TORCH_CHECK_VALUE(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), op,
                    ": block_tables must be contiguous int32");
  const std::pair<const at::Tensor*, at::ScalarType> fields[] = {
      {&valid, at::kBool}, {&position, at::kLong}, {&born, at::kLong},
      {&crf, at::kFloat},  {&tau, at::kLong},      {&prompt, at::kBool}};
  for (const auto& [field, dtype] : fields) {
    TORCH_CHECK_VALUE(field->sizes() == valid.sizes() && field->scalar_type() == dtype &&
                          field->is_contiguous() && field->device().is_cpu(),
                      op, ": every state field must be a contiguous CPU tensor of shape ",
                      valid.sizes(), "; got ", field->scalar_type(), " ", field->sizes());
  }
  const std::pair<const at::Tensor*, std::vector<int64_t>> indices[] = {
      {&rows, {b}}, {&slots, {b, h}}, {&positions, {b}}, {&budgets, {b, h}}, {&step, {R}}};
  for (const auto& [index, shape] : indices) {
    TORCH_CHECK_VALUE(index->scalar_type() == at::kLong && index->is_contiguous() &&
                          index->sizes() == at::IntArrayRef(shape),
                      op, ": rows [b], slots [b, H], positions [b], budgets [b, H] and step [R] "
                      "must be contiguous int64 tensors; got ", index->sizes());
  }

  // Validate every index before the first write, so a bad call changes nothing.
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  const int32_t* table_base = block_tables.data_ptr<int32_t>() + layer * h * mb;
  const int64_t table_stride_row = L * h * mb;
  std::vector<uint8_t> seen(R, 0);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t r = row_ptr[i];
    TORCH_CHECK_INDEX(0 <= r && r < R, op, ": row ", r, " is out of range [0, ", R, ")");
    TORCH_CHECK_VALUE(!seen[r], op, ": row ", r, " appears twice in rows");
    seen[r] = 1;
    for (int64_t head = 0; head < h; ++head) {
      const int64_t sl = slot_ptr[i * h + head];
      if (sl < 0) continue;
      TORCH_CHECK_VALUE(sl < S, op, ": slot ", sl, " is out of range [0, ", S, ")");
      const int64_t id = table_base[r * table_stride_row + head * mb + sl / bs];
      TORCH_CHECK_VALUE(id >= 0, op, ": a slot falls into an unassigned (-1) block-table entry");
      TORCH_CHECK_INDEX(id < kv_pool.size(0), op, ": head-block ", id, " >= ", kv_pool.size(0));
    }
  }

  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor k = key.to(kv_pool.scalar_type()).contiguous();
  const at::Tensor v = value.to(kv_pool.scalar_type()).contiguous();
  at::Tensor out = at::empty({b, hq, d}, query.options().dtype(at::kFloat));
  at::Tensor probs = at::empty({b, hq, S}, query.options().dtype(at::kFloat));
  at::Tensor evicted = at::zeros({b, h}, query.options().dtype(at::kInt));

  const int64_t state_offset = layer * h * S, state_stride_row = L * h * S;
  DecodeArgs args = decode_args(q, kv_pool, out, probs, h, mb, S, scale);
  args.rows = row_ptr;
  args.tables = table_base;
  args.table_stride_row = table_stride_row;
  args.valid = reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()) + state_offset;
  args.valid_stride_row = state_stride_row;

  LrfuArgs lrfu{};
  lrfu.valid = reinterpret_cast<uint8_t*>(valid.data_ptr<bool>()) + state_offset;
  lrfu.position = position.data_ptr<int64_t>() + state_offset;
  lrfu.born = born.data_ptr<int64_t>() + state_offset;
  lrfu.crf = crf.data_ptr<float>() + state_offset;
  lrfu.tau = tau.data_ptr<int64_t>() + state_offset;
  lrfu.prompt = reinterpret_cast<uint8_t*>(prompt.data_ptr<bool>()) + state_offset;
  lrfu.stride_row = state_stride_row;
  lrfu.step = step.data_ptr<int64_t>();
  lrfu.rows = row_ptr;
  lrfu.slots = slot_ptr;
  lrfu.positions = positions.data_ptr<int64_t>();
  lrfu.budgets = budgets.data_ptr<int64_t>();
  lrfu.evicted = evicted.data_ptr<int32_t>();
  lrfu.num_kv_heads = h;
  lrfu.group = hq / h;
  lrfu.num_slots = S;
  lrfu.lam = static_cast<float>(lam);
  lrfu.top_p = static_cast<float>(top_p);
  lrfu.gqa_max = gqa_max;
  lrfu.protect_prompt = protect_prompt;
  lrfu.recent_window = recent_window;
  lrfu.avx2 = static_cast<Isa>(g_isa.load()) >= Isa::kAvx2;

  const DecodeKernel kernel = pick_kernel(d);
  const int64_t elem = kv_pool.element_size(), row_bytes = d * elem;
  char* pool = static_cast<char*>(kv_pool.data_ptr());
  const char* k_ptr = static_cast<const char*>(k.data_ptr());
  const char* v_ptr = static_cast<const char*>(v.data_ptr());
  const int64_t group = hq / h, scratch_words = (lrfu_scratch_bytes(S) + 7) / 8;
  std::atomic<int> status{0};
  at::parallel_for(0, b * h, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(scratch_words);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t req = item / h, head = item % h, sl = slot_ptr[item];
      lrfu_insert(lrfu, item);
      if (sl >= 0) {
        const int64_t id = table_base[row_ptr[req] * table_stride_row + head * mb + sl / bs];
        char* dst = pool + (id * kv_pool.stride(0) + (sl % bs) * kv_pool.stride(2)) * elem;
        std::memcpy(dst, k_ptr + item * row_bytes, row_bytes);
        std::memcpy(dst + kv_pool.stride(1) * elem, v_ptr + item * row_bytes, row_bytes);
      }
      // Heads fill their table from entry 0 (cache/tables.py), so every valid entry lies
      // below the end of the last assigned head-block: attend to and score only that
      // prefix, which is what keeps a step's cost proportional to the entries held.
      const int32_t* table = table_base + row_ptr[req] * table_stride_row + head * mb;
      int64_t blocks = mb;
      while (blocks > 0 && table[blocks - 1] < 0) --blocks;
      DecodeArgs item_args = args;
      item_args.num_slots = std::min(S, blocks * bs);
      const DecodeStatus st = kernel(item_args, item, item + 1);
      if (st != DecodeStatus::kOk) {
        int expected = 0;
        status.compare_exchange_strong(expected, static_cast<int>(st));
        continue;
      }
      lrfu_observe_evict(lrfu, item, item_args.num_slots,
                         args.probs + (req * hq + head * group) * S, scratch.data());
    }
  });
  const auto found = static_cast<DecodeStatus>(status.load());
  TORCH_CHECK_VALUE(found != DecodeStatus::kValidSlotInUnassignedBlock, op,
                    ": a valid slot lies in an unassigned head-block");
  TORCH_CHECK_INDEX(found != DecodeStatus::kHeadBlockOutOfRange, op,
                    ": a block table names a head-block >= ", kv_pool.size(0));
  return {out.to(query.scalar_type()), evicted};
}

// The lowest free (false) slot of every (row in rows, layer, head) of valid [R, L, H, S],
// -1 where there is none: memchr stops at the first free byte, which for a head without
// holes is right past its entries.
at::Tensor first_free_slots(const at::Tensor& valid, const at::Tensor& rows) {
  constexpr const char* op = "first_free_slots";
  TORCH_CHECK_VALUE(valid.dim() == 4 && valid.scalar_type() == at::kBool &&
                        valid.is_contiguous() && valid.device().is_cpu(),
                    op, ": valid must be a contiguous CPU bool tensor [R, L, H, S], got ",
                    valid.scalar_type(), " ", valid.sizes());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
                    op, ": rows must be a contiguous int64 vector");
  const int64_t R = valid.size(0), heads = valid.size(1) * valid.size(2), S = valid.size(3);
  const int64_t b = rows.size(0);
  at::Tensor out = at::empty({b, valid.size(1), valid.size(2)}, rows.options());
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK_INDEX(0 <= row_ptr[i] && row_ptr[i] < R, op, ": row ", row_ptr[i],
                      " is out of range [0, ", R, ")");
  }
  const uint8_t* base = reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>());
  int64_t* slot = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    const uint8_t* head = base + row_ptr[i] * heads * S;
    for (int64_t j = 0; j < heads; ++j, head += S) {
      const void* hole = std::memchr(head, 0, S);
      *slot++ = hole == nullptr ? -1 : static_cast<const uint8_t*>(hole) - head;
    }
  }
  return out;
}

std::string cpu_isa() { return isa_name(static_cast<Isa>(g_isa.load())); }

// Selects the kernel ISA ("auto" = the best this CPU has); returns the previous one.
std::string set_cpu_isa(const std::string& name) {
  Isa isa;
  if (name == "auto") {
    isa = best_isa();
  } else if (name == "avx512") {
    isa = Isa::kAvx512;
  } else if (name == "avx2") {
    isa = Isa::kAvx2;
  } else if (name == "scalar") {
    isa = Isa::kScalar;
  } else {
    TORCH_CHECK_VALUE(false, "set_cpu_isa: unknown ISA '", name,
                      "'; choose auto, avx512, avx2 or scalar");
  }
  TORCH_CHECK_VALUE(cpu_has(isa), "set_cpu_isa: this CPU does not support ", name);
  return isa_name(static_cast<Isa>(g_isa.exchange(static_cast<int>(isa))));
}

}  // namespace
}  // namespace crystal_vllm

TORCH_LIBRARY(crystal_vllm, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor kv_pool, Tensor block_tables, Tensor valid, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "write_kv(Tensor(a!) kv_pool, Tensor block_tables, Tensor slots, Tensor key, "
      "Tensor value) -> ()");
  m.def(
      "lrfu_decode(Tensor query, Tensor key, Tensor value, Tensor(a!) kv_pool, "
      "Tensor block_tables, Tensor rows, int layer, Tensor slots, Tensor positions, "
      "Tensor budgets, Tensor(b!) valid, Tensor(c!) position, Tensor(d!) born, "
      "Tensor(e!) crf, Tensor(f!) tau, Tensor(g!) prompt, Tensor step, float scale, "
      "float lam, float top_p, bool gqa_max, bool protect_prompt, int recent_window) -> "
      "(Tensor, Tensor)");
  m.def("first_free_slots(Tensor valid, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(crystal_vllm, CPU, m) {
  m.impl("paged_decode_attention", &crystal_vllm::paged_decode_attention);
  m.impl("write_kv", &crystal_vllm::write_kv);
  m.impl("lrfu_decode", &crystal_vllm::lrfu_decode);
  m.impl("first_free_slots", &crystal_vllm::first_free_slots);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crystal-vllm C++ CPU kernels; the ops live in torch.ops.crystal_vllm";
  m.def("cpu_isa", &crystal_vllm::cpu_isa, "The ISA the kernels use: avx512, avx2 or scalar.");
  m.def("set_cpu_isa", &crystal_vllm::set_cpu_isa, py::arg("name"),
        "Select the kernel ISA (auto, avx512, avx2, scalar); returns the previous one.");
}
