/* The CPU kernel as torch ops: hf_roast::roast_linear_cpu and hf_roast::roast_weight_cpu, defined (schema and
   fake implementation) in hf_roast/backends/custom_ops.py and implemented here for the CPU dispatch key.

   This file is not compiled alone: hf_roast/backends/cpu/build.py appends it to roast_cpu.cpp (whose structs
   and entry points it calls) after the generated constants (the Geometry field order, the mapper and sign
   ids, the kernel's limits), so that nothing here restates a Python fact. The library registers these
   kernels when Python calls hf_roast_register_ops, once per process, rather than in a static initialiser:
   a second copy of the library (another cache directory) must not register them twice.

   Why ops rather than ctypes calls: a compiled graph calls an op straight from its wrapper, and an op whose
   CPU kernel is C++ costs the dispatcher a few microseconds, where a Python kernel cost about 30 us per call
   (its Python autograd wrapper, the kernel's own Python, a ctypes call), 210 times a SmolLM2 token. */

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <atomic>
#include <optional>
#include <vector>

/* How often each branch ran (0: the GEMV, 1: the W build): tests read them to know this kernel ran. */
static std::atomic<int64_t> kernel_calls[2];

extern "C" int64_t hf_roast_kernel_calls(int64_t which) { return kernel_calls[which].load(); }

static int64_t rounding_of(at::ScalarType t) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  if (t == at::kHalf) return 2;
  return -1;
}

/* torch's thread count, but one thread below PARALLEL_GRAIN multiply-adds per thread. */
static int64_t threads_for(int64_t work) {
  const int64_t most = at::get_num_threads(), wanted = work / PARALLEL_GRAIN;
  return wanted < 1 ? 1 : (wanted < most ? wanted : most);
}

/* The Args of one layer's call, from the op's arguments: z (float, or packed codes with scales and zformat
   [bits, group]), the tile tables and the geometry. The tensors the pointers reach are kept in keep. */
static Args layer_args(const at::Tensor& z, const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& tile_slot, const at::Tensor& tile_scale,
                       at::IntArrayRef geometry, at::IntArrayRef zformat, int64_t rounding,
                       std::vector<at::Tensor>& keep) {
  TORCH_CHECK(geometry.size() == GEOMETRY_FIELDS, "hf_roast CPU kernel: geometry has ", geometry.size(),
              " values, not ", GEOMETRY_FIELDS, " (hf_roast.backends.geometry.Geometry.as_list)");
  TORCH_CHECK(zformat.size() == 2, "hf_roast CPU kernel: zformat is [bits, group_size]");
  const int64_t tr = geometry[GEO_tile_rows], tc = geometry[GEO_tile_cols], mapper = geometry[GEO_mapper];
  TORCH_CHECK(tr >= 1 && tc >= 1 && tr <= MAX_TILE && tc <= MAX_TILE, "the CPU path takes mapping tiles of at most ",
              MAX_TILE, "x", MAX_TILE, ", not ", tr, "x", tc);
  TORCH_CHECK(mapper >= 0 && mapper < MAPPER_COUNT, "hf_roast CPU kernel: unknown mapper id ", mapper);
  const bool tiled = TILED_MAPPER[mapper];
  TORCH_CHECK(tile_slot.has_value() == tiled, "hf_roast CPU kernel: a tile mapper needs tile_slot, hashednet none");
  TORCH_CHECK(z.device().is_cpu() && tile_scale.device().is_cpu(), "the CPU path runs on CPU tensors, not ",
              z.device());
  TORCH_CHECK(tile_scale.scalar_type() == at::kFloat, "hf_roast CPU kernel: tile_scale must be float32");
  Args A;
  memset(&A, 0, sizeof(A));
  const int64_t bits = zformat[0];
  if (bits == 0) {
    const int64_t kind = rounding_of(z.scalar_type());
    TORCH_CHECK(kind >= 0, "the CPU path reads a float32, bfloat16 or float16 z, not ", z.scalar_type());
    const at::Tensor data = z.contiguous();
    keep.push_back(data);
    A.z.data = data.data_ptr();
    A.z.zkind = kind;
  } else {
    TORCH_CHECK(bits == 8 || bits == 4, "the CPU path reads 8- or 4-bit codes, not ", bits, "-bit");
    TORCH_CHECK(z.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && scales.has_value() &&
                    scales->scalar_type() == at::kFloat,
                "the CPU path reads ", bits, "-bit codes as ", bits == 8 ? "int8" : "uint8", " with fp32 scales");
    const at::Tensor codes = z.contiguous(), s = scales->contiguous();
    keep.push_back(codes);
    keep.push_back(s);
    A.z.codes = codes.data_ptr();
    A.z.scales = s.data_ptr<float>();
    A.z.bits = bits;
    A.z.group = zformat[1];
  }
  const at::Tensor scale = tile_scale.contiguous();
  keep.push_back(scale);
  A.tile_scale = scale.data_ptr<float>();
  if (tiled) {
    TORCH_CHECK(tile_slot->scalar_type() == at::kLong, "hf_roast CPU kernel: tile_slot must be int64");
    const at::Tensor slots = tile_slot->contiguous();
    keep.push_back(slots);
    A.tile_slot = slots.data_ptr<int64_t>();
  }
  A.rows = geometry[GEO_rows];
  A.cols = geometry[GEO_cols];
  A.tr = tr;
  A.tc = tc;
  A.n_tr = tiles_along(A.rows, tr);
  A.n_tc = tiles_along(A.cols, tc);
  A.rounding = rounding;
  A.element_sign = geometry[GEO_sign] == SIGN_ELEMENT;
  /* fp32 weights straight from (dequantised) fp32 tiles unless a sign, a hash or a rounding intervenes */
  A.build = rounding != 0 || A.element_sign || !tiled || (bits == 0 && A.z.zkind != 0);
  A.tile_offset = geometry[GEO_tile_offset];
  A.segment_start = geometry[GEO_seg_start];
  A.segment_size = geometry[GEO_seg_size];
  A.slot_a = geometry[GEO_slot_a];
  A.slot_b = geometry[GEO_slot_b];
  A.sign_a = geometry[GEO_sign_a];
  A.sign_b = geometry[GEO_sign_b];
  return A;
}

/* W (rows x cols, fp32) into the contiguous fp32 out. */
static void build_into(const Args& args, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == args.rows && out.size(1) == args.cols,
              "hf_roast CPU kernel: W needs a contiguous fp32 ", args.rows, "x", args.cols, " output, not ",
              out.scalar_type(), " ", out.sizes(), out.is_contiguous() ? "" : " (not contiguous)");
  Args A = args;
  A.threads = threads_for(A.rows * A.cols);
  TORCH_CHECK(hf_roast_build_weight(&A, out.data_ptr<float>()) == 0, "hf_roast CPU kernel refused a ", A.tr, "x",
              A.tc, " tile");
  kernel_calls[1]++;
}

/* x W^T + b in x's dtype: the fused GEMV for at most MAX_ROWS rows, else W built in one pass and one GEMM
   (at::linear, as the PyTorch path runs it on CPU with this W: the same values). */
static at::Tensor roast_linear_cpu(const at::Tensor& x, const at::Tensor& z, const std::optional<at::Tensor>& scales,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tile_slot,
                                   const at::Tensor& tile_scale, at::IntArrayRef geometry, at::IntArrayRef zformat) {
  const int64_t rounding = rounding_of(x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && rounding >= 0,
              "the CPU kernel takes float32, bfloat16 or float16 CPU activations, not ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(geometry.size() == GEOMETRY_FIELDS, "hf_roast CPU kernel: geometry has ", geometry.size(), " values");
  const int64_t rows = geometry[GEO_rows], cols = geometry[GEO_cols];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "hf_roast::roast_linear_cpu: the input has ",
              x.dim() ? x.size(-1) : 0, " features, the layer takes ", cols);
  const int64_t n = cols ? x.numel() / cols : 0;
  std::vector<at::Tensor> keep;
  if (n > MAX_ROWS) {
    const Args A = layer_args(z, scales, tile_slot, tile_scale, geometry, zformat, 0, keep);
    const at::Tensor w = at::empty({rows, cols}, x.options().dtype(at::kFloat));
    build_into(A, w);
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(x.scalar_type());
    return at::linear(x, w.to(x.scalar_type()), b);
  }
  Args A = layer_args(z, scales, tile_slot, tile_scale, geometry, zformat, rounding, keep);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows;
  const at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
  if (n == 0) return y.to(x.scalar_type());
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(x.scalar_type()).to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == rows, "hf_roast CPU kernel: the bias has ", b.numel(), " values, the layer ", rows,
                " outputs");
    A.bias = b.data_ptr<float>();
  }
  A.x = x32.data_ptr<float>();
  A.n_rows = n;
  A.y = y.data_ptr<float>();
  A.threads = threads_for(n * rows * cols);
  TORCH_CHECK(hf_roast_gemv(&A) == 0, "hf_roast CPU kernel refused ", n, " rows with a ", A.tr, "x", A.tc, " tile");
  kernel_calls[0]++;
  return rounding == 0 ? y : y.to(x.scalar_type());
}

/* W into out (fp32, rows x cols, contiguous): the PyTorch path's weight on CPU, built in one pass. */
static void roast_weight_cpu(const at::Tensor& z, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& tile_slot, const at::Tensor& tile_scale,
                             at::IntArrayRef geometry, at::IntArrayRef zformat, const at::Tensor& out) {
  std::vector<at::Tensor> keep;
  build_into(layer_args(z, scales, tile_slot, tile_scale, geometry, zformat, 0, keep), out);
}

/* z[start : start + n] of a packed z, dequantised by the kernel's own reader (fp32). */
static at::Tensor roast_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                                       int64_t group, int64_t start, int64_t n) {
  TORCH_CHECK(bits == 8 || bits == 4, "hf_roast CPU kernel reads 8- or 4-bit codes, not ", bits, "-bit");
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && scales.scalar_type() == at::kFloat,
              "the CPU path reads ", bits, "-bit codes as ", bits == 8 ? "int8" : "uint8", " with fp32 scales");
  TORCH_CHECK(start >= 0 && n >= 0, "hf_roast CPU kernel: a negative span");
  const at::Tensor c = codes.contiguous(), s = scales.contiguous();
  const at::Tensor out = at::empty({n}, scales.options());
  TORCH_CHECK(hf_roast_dequantize(c.data_ptr(), s.data_ptr<float>(), bits, group, start, n, out.data_ptr<float>()) == 0,
              "hf_roast CPU kernel refused z_bits=", bits);
  return out;
}

extern "C" int hf_roast_register_ops() {
  static torch::Library* library = nullptr;
  if (library != nullptr) return 0;
  library = new torch::Library(torch::Library::IMPL, "hf_roast", c10::DispatchKey::CPU, __FILE__, __LINE__);
  library->impl("roast_linear_cpu", TORCH_FN(roast_linear_cpu));
  library->impl("roast_weight_cpu", TORCH_FN(roast_weight_cpu));
  library->impl("roast_dequantize_cpu", TORCH_FN(roast_dequantize_cpu));
  return 0;
}
