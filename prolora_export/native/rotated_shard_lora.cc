// A native CPU kernel for ai.prolora::RotatedShardLoRA (SPEC §4), loaded by ONNX Runtime through
// SessionOptions.register_custom_ops_library. When a model carries the op's FunctionProto and this
// library is registered, ONNX Runtime runs this kernel instead of inlining the function; without the
// library the function body runs. Both compute the same Y (fp32 rounding apart).
//
// It computes the compact forward of SPEC §1 directly, one token row at a time (never A or B expanded):
//   z[j, p] = x[chunk j] · A0[p]                    (j < m, p < r_s; the last chunk is cut at d_in)
//   h[i]    = Σ_j z[j, (i + j·s_A) mod r_s]
//   g[k, q] = γ · h[(q − k·s_B) mod r_s]            (k < n)
//   y[k·c_B + c] = Σ_q g[k, q] · B0[c, q]  (+ Σ_v γ·(x · A_u[v]) · B_u[o, v])
// B0 and B_u are transposed once per call into scratch so that the output loops run over contiguous
// memory (the shards are graph inputs that ONNX Runtime adapters may switch on every Run, so nothing
// derived from them may be cached across calls). fp16 inputs are computed in fp32 and rounded once,
// as the function body's Cast/CastLike do.
//
// Written against OrtCustomOp (the C++ CustomOpBase of onnxruntime_cxx_api.h) rather than the lite
// API's typed arguments: a u = r node has EMPTY shard inputs in the middle ("X", "", "", A_u, B_u),
// which the lite wrappers would dereference; KernelContext::GetInput returns null for them here.
//
// Threads: token rows are split over ONNX Runtime's intra-op thread pool (KernelContext::ParallelFor)
// when there is enough work; one decoded token runs inline. Scratch is thread_local and only grows,
// so the steady state (decode) allocates nothing.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// AVX2/FMA clone picked at load time where the CPU has it, portable code otherwise
#define PROLORA_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PROLORA_HOT
#endif

namespace {

constexpr const char* kDomain = "ai.prolora";
constexpr const char* kOpType = "RotatedShardLoRA";
// oldest OrtApi this library can work with (KernelContext_ParallelFor, shape inference: ORT 1.17)
constexpr uint32_t kMinApiVersion = 17;
// below this many multiply-adds a call stays on the calling thread (a pool dispatch costs a few µs)
constexpr int64_t kParallelMinWork = 1 << 18;
constexpr int64_t kMinRowsPerTask = 4;

struct Attributes {
  int64_t d_in = 0, d_out = 0, m = 1, n = 1, s_a = 0, s_b = 0;
  float scaling = 1.0f;
};

// everything one call needs, in fp32
struct Problem {
  int64_t rows = 0, d_in = 0, d_out = 0, m = 1, n = 1, c_a = 0, c_b = 0, rs = 0, u = 0;
  int64_t off_a_step = 0, off_b_step = 0;  // s_A mod r_s, s_B mod r_s (non-negative)
  float scaling = 1.0f;
  const float* a0 = nullptr;   // (r_s, c_A)
  const float* b0t = nullptr;  // (r_s, c_B): B0 transposed
  const float* au = nullptr;   // (u, d_in)
  const float* but = nullptr;  // (u, d_out): B_u transposed
  // exactly one of the two input/output pairs is set
  const float* x32 = nullptr;
  float* y32 = nullptr;
  const Ort::Float16_t* x16 = nullptr;
  Ort::Float16_t* y16 = nullptr;
};

inline int64_t positive_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

// grows only: after the first call of a shape nothing is allocated
inline float* scratch(std::vector<float>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

inline float dot(const float* a, const float* b, int64_t len) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < len; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float* y, const float* x, float alpha, int64_t len) {
  for (int64_t i = 0; i < len; ++i) y[i] += alpha * x[i];
}

// rows [begin, end) of Y
PROLORA_HOT void compute_rows(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<float> work_buf, x_buf, y_buf;
  const int64_t rs = p.rs, u = p.u;
  float* work = scratch(work_buf, static_cast<size_t>(p.m * rs + rs + p.n * rs + u));
  float* z = work;             // (m, r_s)
  float* h = z + p.m * rs;     // (r_s)
  float* g = h + rs;           // (n, r_s), γ included
  float* t = g + p.n * rs;     // (u), γ included
  float* xf = p.x16 ? scratch(x_buf, static_cast<size_t>(p.d_in)) : nullptr;
  float* yf = p.y16 ? scratch(y_buf, static_cast<size_t>(p.d_out)) : nullptr;
  for (int64_t row = begin; row < end; ++row) {
    const float* x;
    if (p.x16) {
      const Ort::Float16_t* src = p.x16 + row * p.d_in;
      for (int64_t i = 0; i < p.d_in; ++i) xf[i] = src[i].ToFloat();
      x = xf;
    } else {
      x = p.x32 + row * p.d_in;
    }
    float* y = p.y16 ? yf : p.y32 + row * p.d_out;
    std::fill(y, y + p.d_out, 0.0f);
    if (rs > 0) {
      for (int64_t j = 0; j < p.m; ++j) {
        const int64_t start = j * p.c_a;
        const int64_t width = std::max<int64_t>(0, std::min(p.c_a, p.d_in - start));
        for (int64_t q = 0; q < rs; ++q) z[j * rs + q] = width > 0 ? dot(x + start, p.a0 + q * p.c_a, width) : 0.0f;
      }
      // h[i] = Σ_j z[j, (i + j·s_A) mod r_s], summed over j in order
      std::fill(h, h + rs, 0.0f);
      for (int64_t j = 0, off = 0; j < p.m; ++j, off = (off + p.off_a_step) % rs) {
        const float* zj = z + j * rs;
        for (int64_t i = 0; i < rs - off; ++i) h[i] += zj[i + off];
        for (int64_t i = rs - off; i < rs; ++i) h[i] += zj[i + off - rs];
      }
      // g[k, q] = γ·h[(q − k·s_B) mod r_s]
      for (int64_t k = 0, off = 0; k < p.n; ++k, off = (off + p.off_b_step) % rs) {
        float* gk = g + k * rs;
        for (int64_t q = 0; q < rs; ++q) gk[q] = p.scaling * h[positive_mod(q - off, rs)];
      }
      for (int64_t k = 0; k < p.n; ++k) {
        const int64_t start = k * p.c_b;
        const int64_t width = std::max<int64_t>(0, std::min(p.c_b, p.d_out - start));
        if (width == 0) continue;
        for (int64_t q = 0; q < rs; ++q) axpy(y + start, p.b0t + q * p.c_b, g[k * rs + q], width);
      }
    }
    if (u > 0) {
      for (int64_t v = 0; v < u; ++v) t[v] = p.scaling * dot(x, p.au + v * p.d_in, p.d_in);
      for (int64_t v = 0; v < u; ++v) axpy(y, p.but + v * p.d_out, t[v], p.d_out);
    }
    if (p.y16) {
      Ort::Float16_t* dst = p.y16 + row * p.d_out;
      for (int64_t o = 0; o < p.d_out; ++o) dst[o] = Ort::Float16_t(yf[o]);
    }
  }
}

struct Task {
  const Problem* problem;
  int64_t rows_per_task;
};

void run_task(void* data, size_t index) {
  const Task& task = *static_cast<const Task*>(data);
  const int64_t begin = static_cast<int64_t>(index) * task.rows_per_task;
  compute_rows(*task.problem, begin, std::min(task.problem->rows, begin + task.rows_per_task));
}

template <typename T>
inline float to_float(T v);
template <>
inline float to_float<float>(float v) { return v; }
template <>
inline float to_float<Ort::Float16_t>(Ort::Float16_t v) { return v.ToFloat(); }

// (rows, cols) → (cols, rows) in fp32
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = to_float(src[r * cols + c]);
}

template <typename T>
const float* as_float(const T* src, int64_t count, std::vector<float>& buffer) {
  if constexpr (std::is_same<T, float>::value) {
    return src;
  } else {
    float* dst = scratch(buffer, static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i].ToFloat();
    return dst;
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

void expect_shape(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  if (got != want)
    throw Ort::Exception(std::string("RotatedShardLoRA: ") + name + " has shape " + shape_str(got) + ", expected " +
                             shape_str(want),
                         ORT_INVALID_ARGUMENT);
}

template <typename T>
struct Kernel {
  Attributes attrs;

  explicit Kernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    attrs.d_in = ki.GetAttribute<int64_t>("in_features");
    attrs.d_out = ki.GetAttribute<int64_t>("out_features");
    attrs.m = ki.GetAttribute<int64_t>("sharing_rate_a");
    attrs.n = ki.GetAttribute<int64_t>("sharing_rate_b");
    attrs.s_a = ki.GetAttribute<int64_t>("stride_a");
    attrs.s_b = ki.GetAttribute<int64_t>("stride_b");
    attrs.scaling = ki.GetAttribute<float>("scaling");
    if (attrs.d_in < 1 || attrs.d_out < 1 || attrs.m < 1 || attrs.n < 1)
      throw Ort::Exception("RotatedShardLoRA: in_features, out_features, sharing_rate_a and sharing_rate_b must be >= 1",
                           ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& err) {
      return Ort::Status(err).release();
    } catch (const std::exception& err) {
      return Ort::Status(err).release();
    }
  }

  void Compute(OrtKernelContext* context) {
    thread_local std::vector<float> b0t_buf, but_buf, a0_buf, au_buf;
    Ort::KernelContext ctx(context);
    const size_t count = ctx.GetInputCount();
    auto input = [&](size_t i) { return i < count ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    Ort::ConstValue x = input(0), a0 = input(1), b0 = input(2), au = input(3), bu = input(4);
    if ((a0 == nullptr) != (b0 == nullptr) || (au == nullptr) != (bu == nullptr))
      throw Ort::Exception("RotatedShardLoRA: A_shard/B_shard and A_unshared/B_unshared come in pairs",
                           ORT_INVALID_ARGUMENT);

    Problem p;
    p.d_in = attrs.d_in;
    p.d_out = attrs.d_out;
    p.m = attrs.m;
    p.n = attrs.n;
    p.c_a = (p.d_in + p.m - 1) / p.m;
    p.c_b = (p.d_out + p.n - 1) / p.n;
    p.scaling = attrs.scaling;

    std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (x_shape.empty() || x_shape.back() != p.d_in)
      throw Ort::Exception("RotatedShardLoRA: X has shape " + shape_str(x_shape) + ", its last dimension must be " +
                               "in_features = " + std::to_string(p.d_in),
                           ORT_INVALID_ARGUMENT);
    p.rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) p.rows *= x_shape[i];

    if (a0 != nullptr) {
      std::vector<int64_t> a_shape = a0.GetTensorTypeAndShapeInfo().GetShape();
      p.rs = a_shape.size() == 2 ? a_shape[0] : -1;
      expect_shape("A_shard", a_shape, {p.rs, p.c_a});
      expect_shape("B_shard", b0.GetTensorTypeAndShapeInfo().GetShape(), {p.c_b, p.rs});
    }
    if (au != nullptr) {
      std::vector<int64_t> a_shape = au.GetTensorTypeAndShapeInfo().GetShape();
      p.u = a_shape.size() == 2 ? a_shape[0] : -1;
      expect_shape("A_unshared", a_shape, {p.u, p.d_in});
      expect_shape("B_unshared", bu.GetTensorTypeAndShapeInfo().GetShape(), {p.d_out, p.u});
    }
    if (p.rs > 0) {
      p.off_a_step = positive_mod(attrs.s_a, p.rs);
      p.off_b_step = positive_mod(attrs.s_b, p.rs);
      p.a0 = as_float(a0.GetTensorData<T>(), p.rs * p.c_a, a0_buf);
      float* b0t = scratch(b0t_buf, static_cast<size_t>(p.c_b * p.rs));
      transpose_into(b0.GetTensorData<T>(), p.c_b, p.rs, b0t);
      p.b0t = b0t;
    }
    if (p.u > 0) {
      p.au = as_float(au.GetTensorData<T>(), p.u * p.d_in, au_buf);
      float* but = scratch(but_buf, static_cast<size_t>(p.d_out * p.u));
      transpose_into(bu.GetTensorData<T>(), p.d_out, p.u, but);
      p.but = but;
    }

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = p.d_out;
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if constexpr (std::is_same<T, float>::value) {
      p.x32 = x.GetTensorData<float>();
      p.y32 = y.GetTensorMutableData<float>();
    } else {
      p.x16 = x.GetTensorData<Ort::Float16_t>();
      p.y16 = y.GetTensorMutableData<Ort::Float16_t>();
    }
    if (p.rows == 0) return;

    const int64_t work_per_row = (p.rs + p.u) * (p.d_in + p.d_out);
    if (p.rows < 2 * kMinRowsPerTask || p.rows * work_per_row < kParallelMinWork) {
      compute_rows(p, 0, p.rows);
      return;
    }
    // enough tasks for the pool to balance, each at least kParallelMinWork / 4 multiply-adds
    const int64_t by_work = std::max<int64_t>(kMinRowsPerTask, (kParallelMinWork / 4) / std::max<int64_t>(work_per_row, 1));
    Task task{&p, std::min(by_work, p.rows)};
    const size_t tasks = static_cast<size_t>((p.rows + task.rows_per_task - 1) / task.rows_per_task);
    ctx.ParallelFor(run_task, tasks, 0, &task);
  }
};

// Y's type is X's and its shape X's with the last dimension out_features. Input 0 only: the others may be
// empty names, which the C++ ShapeInferContext wrapper would try to read.
OrtStatusPtr infer_output(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* in_info = nullptr;
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &in_info)) return status;
  Ort::ConstTensorTypeAndShapeInfo info(in_info);  // owned by the context
  std::vector<int64_t> dims = info.GetShape();
  if (dims.empty()) return nullptr;  // rank unknown: nothing to say
  std::vector<const char*> symbols(dims.size(), nullptr);
  info.GetSymbolicDimensions(symbols.data(), symbols.size());
  int64_t out_features = 0;
  OrtStatusPtr status = nullptr;
  {
    const OrtOpAttr* attr = nullptr;
    if ((status = api.ShapeInferContext_GetAttribute(ctx, "out_features", &attr))) return status;
    size_t size = 0;
    if ((status = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &out_features, sizeof(out_features), &size))) return status;
  }
  dims.back() = out_features;
  symbols.back() = "";
  for (auto& s : symbols)
    if (s == nullptr) s = "";
  OrtTensorTypeAndShapeInfo* out_info = nullptr;
  if ((status = api.CreateTensorTypeAndShapeInfo(&out_info))) return status;
  Ort::TensorTypeAndShapeInfo out(out_info);
  if ((status = api.SetTensorElementType(out_info, info.GetElementType()))) return status;
  if ((status = api.SetDimensions(out_info, dims.data(), dims.size()))) return status;
  if ((status = api.SetSymbolicDimensions(out_info, symbols.data(), symbols.size()))) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out_info);
}

template <typename T, ONNXTensorElementDataType Elem>
struct Op : Ort::CustomOpBase<Op<T, Elem>, Kernel<T>, true> {
  Op() { this->InferOutputShapeFn = infer_output; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel<T>(info);
      return nullptr;
    } catch (const Ort::Exception& err) {
      return Ort::Status(err).release();
    } catch (const std::exception& err) {
      return Ort::Status(err).release();
    }
  }
  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t) const { return Elem; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Elem; }
};

}  // namespace

extern "C" {

// the entry point SessionOptions.register_custom_ops_library looks up
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  const OrtApi* api = nullptr;
  for (uint32_t v = ORT_API_VERSION; v >= kMinApiVersion && api == nullptr; --v) api = api_base->GetApi(v);
  if (api == nullptr) return nullptr;  // cannot even report: an ONNX Runtime older than 1.17
  Ort::InitApi(api);
  static Op<float, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> fp32_op;
  static Op<Ort::Float16_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> fp16_op;
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // alive as long as the process
  try {
    std::lock_guard<std::mutex> lock(mutex);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&fp32_op);
    domain->Add(&fp16_op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& err) {
    return Ort::Status(err).release();
  }
  return nullptr;
}

}  // extern "C"
