// Torch-facing side of the crystal_vllm._C extension: argument checks, run-time choice
// of the kernel ISA, parallelisation over (request, KV head), and op registration as
// torch.ops.crystal_vllm.{paged_decode_attention, write_kv}.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cstring>
#include <string>
#include <tuple>

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

  DecodeArgs args{};
  args.query = q.data_ptr<float>();
  args.kv_pool = kv_pool.data_ptr();
  args.pool_stride_block = kv_pool.stride(0);
  args.pool_stride_kv = kv_pool.stride(1);
  args.pool_stride_row = kv_pool.stride(2);
  args.tables = tables.data_ptr<int32_t>();
  args.valid = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  args.out = out.data_ptr<float>();
  args.probs = probs.data_ptr<float>();
  args.num_head_blocks = kv_pool.size(0);
  args.num_kv_heads = h;
  args.group = hq / h;
  args.head_dim = d;
  args.block_size = bs;
  args.max_blocks = mb;
  args.num_slots = s;
  args.scale = static_cast<float>(scale);
  args.kv_dtype = kv_dtype_of(kv_pool);

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
}

TORCH_LIBRARY_IMPL(crystal_vllm, CPU, m) {
  m.impl("paged_decode_attention", &crystal_vllm::paged_decode_attention);
  m.impl("write_kv", &crystal_vllm::write_kv);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crystal-vllm C++ CPU kernels; the ops live in torch.ops.crystal_vllm";
  m.def("cpu_isa", &crystal_vllm::cpu_isa, "The ISA the kernels use: avx512, avx2 or scalar.");
  m.def("set_cpu_isa", &crystal_vllm::set_cpu_isa, py::arg("name"),
        "Select the kernel ISA (auto, avx512, avx2, scalar); returns the previous one.");
}
