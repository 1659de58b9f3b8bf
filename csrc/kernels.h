// Torch-free interface between the op wrappers (ops.cpp) and the per-ISA kernels
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_scalar.cpp).
//
// The kernels are compiled with `#pragma GCC target(...)` for instruction sets that the
// machine running the extension may lack. They must therefore see no torch (or other
// library) header: an inline function from such a header instantiated under the pragma
// would be a weak symbol compiled for AVX-512, and the linker could pick that copy for
// the whole extension. Only plain data crosses this interface.
#pragma once

#include <cstdint>

namespace crystal_vllm {

enum class KvDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One paged_decode_attention call. Work item `i` in [0, batch * num_kv_heads) is
// (request i / num_kv_heads, KV head i % num_kv_heads) and owns `group` query heads.
// The tables and the valid mask of request `req` are those of row `rows[req]` (row `req`
// when `rows` is null), so the fused LRFU op can pass the persistent [R, L, H, ...] state
// of one layer without gathering it first.
struct DecodeArgs {
  const float* query;  // [b, Hq, D] float32, contiguous
  const void* kv_pool;  // [num_head_blocks, 2, block_size, D] in kv_dtype, last dim contiguous
  int64_t pool_stride_block;  // element strides of kv_pool's first three dims
  int64_t pool_stride_kv;
  int64_t pool_stride_row;
  const int64_t* rows;  // [b] or null
  const int32_t* tables;  // table of (row, head) at row * table_stride_row + head * MB
  int64_t table_stride_row;
  const uint8_t* valid;  // mask of (row, head) at row * valid_stride_row + head * S (bool)
  int64_t valid_stride_row;
  float* out;  // [b, Hq, D] float32, contiguous, written
  float* probs;  // [b, Hq, S] float32, contiguous, written
  int64_t num_head_blocks;
  int64_t num_kv_heads;  // H
  int64_t group;  // G = Hq / H
  int64_t head_dim;  // D
  int64_t block_size;
  int64_t max_blocks;  // MB
  int64_t num_slots;  // S <= MB * block_size: the slots attended (a prefix of each head's)
  int64_t slot_stride;  // >= S: distance between two heads' valid masks and probs rows
  float scale;
  KvDtype kv_dtype;
};

// What a kernel found wrong in its work items; the wrapper turns it into an exception
// (kernels run inside parallel regions, where throwing is not allowed).
enum class DecodeStatus : int32_t {
  kOk = 0,
  kValidSlotInUnassignedBlock = 1,
  kHeadBlockOutOfRange = 2,
};

// Processes work items [begin, end). Every kernel accepts any head_dim except that the
// vector ones need head_dim % kernel_width(isa) == 0 (the wrapper picks scalar otherwise).
using DecodeKernel = DecodeStatus (*)(const DecodeArgs& args, int64_t begin, int64_t end);

#if defined(__x86_64__)
DecodeStatus decode_attention_avx512(const DecodeArgs& args, int64_t begin, int64_t end);
DecodeStatus decode_attention_avx2(const DecodeArgs& args, int64_t begin, int64_t end);
#endif
DecodeStatus decode_attention_scalar(const DecodeArgs& args, int64_t begin, int64_t end);

}  // namespace crystal_vllm

namespace crystal_vllm {

// The LRFU part of one fused decode step (lrfu_decode in ops.cpp), for work item
// (request i / H, KV head i % H) of one layer. The policy state fields are the
// persistent [R, L, H, S] tensors of crystal_vllm.policy.lrfu.LRFUState, contiguous, with
// their base pointers already advanced to the layer: entry (row, head, slot) is at
// row * stride_row + head * S + slot.
struct LrfuArgs {
  uint8_t* valid;  // bool
  int64_t* position;
  int64_t* born;
  float* crf;
  int64_t* tau;
  uint8_t* prompt;  // bool
  int64_t stride_row;
  const int64_t* step;  // [R]: the row's step t, already advanced for this step
  const int64_t* rows;  // [b]
  const int64_t* slots;  // [b, H]: the free slot taking the new token (< 0: none)
  const int64_t* positions;  // [b]: the new token's position
  const int64_t* budgets;  // [b, H]
  int32_t* evicted;  // [b, H], written
  int64_t num_kv_heads;  // H
  int64_t group;  // G
  int64_t num_slots;  // S
  float lam;
  float top_p;
  bool gqa_max;  // GQA reduction: max-then-renormalise (true) or mean (false)
  bool protect_prompt;  // prompt entries are never evicted and not counted in the budget
  int64_t recent_window;  // decode entries born in the last min(this, budget) steps are kept
  bool avx2;  // the per-slot passes may use AVX2 (the op's ISA allows it)
};

// Records the new token of item `item` in its slot: valid, position, born = tau = t,
// crf = 1 (a decode insert counts as a hit at its own step), not a prompt entry.
void lrfu_insert(const LrfuArgs& a, int64_t item);

// Bytes of scratch memory lrfu_observe_evict needs (8-byte aligned) for S slots.
int64_t lrfu_scratch_bytes(int64_t num_slots);

// Feeds the item's attention `probs` (G rows, `num_slots` apart, float32, 0 on invalid
// slots) over the first `extent` slots of its head, which hold every valid entry, to the
// LRFU state and evicts down to the budget; writes a.evicted[item].
void lrfu_observe_evict(const LrfuArgs& a, int64_t item, int64_t extent, const float* probs,
                        void* scratch);

}  // namespace crystal_vllm
