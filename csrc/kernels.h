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
struct DecodeArgs {
  const float* query;  // [b, Hq, D] float32, contiguous
  const void* kv_pool;  // [num_head_blocks, 2, block_size, D] in kv_dtype, last dim contiguous
  int64_t pool_stride_block;  // element strides of kv_pool's first three dims
  int64_t pool_stride_kv;
  int64_t pool_stride_row;
  const int32_t* tables;  // [b, H, MB] contiguous
  const uint8_t* valid;  // [b, H, S] contiguous (torch.bool is one byte)
  float* out;  // [b, Hq, D] float32, contiguous, written
  float* probs;  // [b, Hq, S] float32, contiguous, written
  int64_t num_head_blocks;
  int64_t num_kv_heads;  // H
  int64_t group;  // G = Hq / H
  int64_t head_dim;  // D
  int64_t block_size;
  int64_t max_blocks;  // MB
  int64_t num_slots;  // S <= MB * block_size
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
