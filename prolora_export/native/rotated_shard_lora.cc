// A native CPU kernel for ai.prolora::RotatedShardLoRA (SPEC §4) and its slot variant
// RotatedShardLoRASlots (SPEC §5: a different adapter per batch row), loaded by ONNX Runtime through
// SessionOptions.register_custom_ops_library. When a model carries the op's FunctionProto and this
// library is registered, ONNX Runtime runs this kernel instead of inlining the function; without the
// library the function body runs. Both compute the same Y (fp32 rounding apart).
//
// It computes the compact forward of SPEC §1 directly, one token row at a time (never A or B expanded):
//   z[j, p] = x[chunk j] · A0[p]                    (j < m, p < r_s; the last chunk is cut at d_in)
//   h[i]    = Σ_j z[j, (i + j·s_A) mod r_s]
//   g[k, q] = γ · h[(q − k·s_B) mod r_s]            (k < n)
//   y[k·c_B + c] = Σ_q g[k, q] · B0[c, q]  (+ Σ_v γ·(x · A_u[v]) · B_u[o, v])
// B_u, and B0 where an adapter has a row block or more in the call, are transposed once per call into
// scratch so that the output loops run over contiguous memory; for a decoded row or two B0 is turned 64 rows
// at a time into an L1 tile that serves every chunk k (the shards are graph inputs that ONNX Runtime adapters
// may switch on every Run, so nothing derived from them may be cached across calls), and the shards are
// prefetched whole, being cold. fp16 inputs are computed in fp32
// and rounded once, as the function body's Cast/CastLike do.
//
// Written against OrtCustomOp (the C++ CustomOpBase of onnxruntime_cxx_api.h) rather than the lite
// API's typed arguments: a u = r node has EMPTY shard inputs in the middle ("X", "", "", A_u, B_u),
// which the lite wrappers would dereference; KernelContext::GetInput returns null for them here.
//
// Speed: rows go 4 at a time through register-blocked loops over 8-float vectors (GCC vector extensions,
// an AVX2/FMA clone where the CPU has it); each (row, rank) is summed in the same order whatever the
// blocking, so results never depend on the thread count. Built with -O3: at -O2 GCC leaves the small
// block loops rolled and the accumulators in memory (3x slower, measured).
//
// Threads: token rows are split over ONNX Runtime's intra-op thread pool (KernelContext::ParallelFor)
// when there is enough work; one decoded token runs inline. Scratch is thread_local and only grows,
// so the steady state (decode) allocates nothing.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// AVX2/FMA clone picked at load time where the CPU has it, portable code otherwise
#define PROLORA_HOT __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define PROLORA_HOT __attribute__((flatten))
#endif

namespace {

constexpr const char* kDomain = "ai.prolora";
constexpr const char* kOpType = "RotatedShardLoRA";
constexpr const char* kSlotOpType = "RotatedShardLoRASlots";  // SPEC §5: a different adapter per batch row
// an adapted projection's nodes fused at session load (prolora_export/native/fuse.py), never written to a file
constexpr const char* kFusedOpType = "RotatedShardLoRAAdd";
constexpr const char* kFusedSlotOpType = "RotatedShardLoRASlotsAdd";
constexpr size_t kMaxParts = 4;  // modules one fused node adds (Q/K/V packed: 3)
// oldest OrtApi this library can work with (KernelContext_ParallelFor, shape inference: ORT 1.17)
constexpr uint32_t kMinApiVersion = 17;
// below this many multiply-adds a call stays on the calling thread (a pool dispatch costs a few µs)
constexpr int64_t kParallelMinWork = 1 << 18;
constexpr int64_t kMinRowsPerTask = 4;
// the OrtApi version that reads a tensor's shape in place (GetTensorElementTypeAndShapeDataReference: ORT 1.24)
constexpr uint32_t kShapeReferenceApiVersion = 24;
// the OrtApi version this library runs with (RegisterCustomOps)
uint32_t api_version = 0;

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
  // B0 transposed (r_s, c_B) where enough rows share it to repay the transposition; else as stored (c_B, r_s),
  // turned a tile at a time (transpose_rows; Kernel::Compute's transpose_b0)
  const float* b0 = nullptr;
  bool b0_stored = false;
  const float* au = nullptr;   // (u, d_in)
  const float* but = nullptr;  // (u, d_out): B_u transposed
  // exactly one of the two input/output pairs is set
  const float* x32 = nullptr;
  float* y32 = nullptr;
  const Ort::Float16_t* x16 = nullptr;
  Ort::Float16_t* y16 = nullptr;
  // row i of this problem is row row_map[i] of X and Y (one slot's rows, interleaved with other slots'
  // in the batch); null: row i is row i
  const int64_t* row_map = nullptr;
  int64_t ldy = 0;   // Y's row stride: d_out, or a packed projection's width (the fused op)
  bool add = false;  // Y already holds the base projection's output: the delta is added to it (fp32 only)
};

inline int64_t positive_mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

// grows only: after the first call of a shape nothing is allocated
template <typename V>
inline V* scratch(std::vector<V>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// 8 floats: GCC vector extensions give one AVX register in the x86-64-v3 clone, two SSE ones otherwise
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// fp16 → fp32, count values (exact): 8 a time with F16C's vcvtph2ps where the CPU has it, else one by one
// (Ort::Float16_t::ToFloat converts by bit manipulation: an fp16 shard read that way cost more than the
// memory traffic its half size saves)
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx,f16c"))) void widen_half_f16c(const Ort::Float16_t* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < count; ++i) dst[i] = src[i].ToFloat();
}
#endif

void widen_half(const Ort::Float16_t* src, int64_t count, float* dst) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (f16c) return widen_half_f16c(src, count, dst);
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = src[i].ToFloat();
}

// out[r][q] = Σ_c x[r][c]·w[q·ldw + c] for R rows and Q ranks: x is read once per Q ranks, w once per R rows.
// Every (r, q) is summed in the same order whatever R and Q are, so blocking never changes a result.
template <int R, int Q>
inline void dots_block(const float* const* x, int64_t width, const float* w, int64_t ldw, float* const* out) {
  v8 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = v8{};
  int64_t c = 0;
  for (; c + 8 <= width; c += 8) {
    v8 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load8(x[r] + c);
    for (int q = 0; q < Q; ++q) {
      const v8 wv = load8(w + q * ldw + c);
      for (int r = 0; r < R; ++r) acc[r][q] += xv[r] * wv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) {
      float sum = hsum(acc[r][q]);
      for (int64_t i = c; i < width; ++i) sum += x[r][i] * w[q * ldw + i];
      out[r][q] = sum;
    }
}

// out[r][q] for q < ranks, in blocks of Q ranks (remainder one by one)
template <int R>
inline void dots(const float* const* x, int64_t width, const float* w, int64_t ldw, int64_t ranks, float* const* out) {
  constexpr int Q = R == 1 ? 4 : 2;  // ≤ 8 accumulators plus the row vectors stay in 16 registers
  float* o[R];
  int64_t q = 0;
  for (; q + Q <= ranks; q += Q) {
    for (int r = 0; r < R; ++r) o[r] = out[r] + q;
    dots_block<R, Q>(x, width, w + q * ldw, ldw, o);
  }
  while (q < ranks) {  // the rest in one block where possible (each block is one pass over x)
    for (int r = 0; r < R; ++r) o[r] = out[r] + q;
    const int64_t left = ranks - q;
    if (Q > 3 && left >= 3) {
      dots_block<R, 3>(x, width, w + q * ldw, ldw, o);
      q += 3;
    } else if (Q > 2 && left >= 2) {
      dots_block<R, 2>(x, width, w + q * ldw, ldw, o);
      q += 2;
    } else {
      dots_block<R, 1>(x, width, w + q * ldw, ldw, o);
      q += 1;
    }
  }
}

// 8 floats `stride` apart
inline v8 strided8(const float* p, int64_t stride) {
  return v8{p[0], p[stride], p[2 * stride], p[3 * stride], p[4 * stride], p[5 * stride], p[6 * stride], p[7 * stride]};
}

// The 8×8 block at p (row i at p + i·ld) as 8 vectors, one per column: 8 row loads and 24 shuffles
inline void transpose8(const float* p, int64_t ld, v8 (&col)[8]) {
  typedef int32_t i8 __attribute__((vector_size(32)));
  v8 row[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) row[i] = load8(p + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(row[i], row[i + 1], i8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(row[i], row[i + 1], i8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      s[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], i8{0, 1, 8, 9, 4, 5, 12, 13});
      s[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], i8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int j = 0; j < 4; ++j) {
    col[j] = __builtin_shuffle(s[j], s[j + 4], i8{0, 1, 2, 3, 8, 9, 10, 11});
    col[j + 4] = __builtin_shuffle(s[j], s[j + 4], i8{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// y[r][c] = Σ_q g[r][q]·b[q·ldq + c] + Σ_v t[r][v]·ut[v·ldu + c] for c < width, B as (ranks, outputs): the
// shared ranks of one B chunk and the unshared ranks of the same outputs in one pass, so each output is
// written once. Each output sums its ranks in order, then its unshared ones, whatever R and C are.
template <int R, int C>
inline void outputs_block(const float* const* g, const float* b, int64_t ldq, int64_t ranks, const float* const* t,
                          const float* ut, int64_t ldu, int64_t unshared, float* const* y, int64_t c, bool add) {
  v8 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) acc[r][i] = v8{};
  for (int64_t q = 0; q < ranks; ++q)
    for (int i = 0; i < C; ++i) {
      const v8 bv = load8(b + q * ldq + c + 8 * i);
      for (int r = 0; r < R; ++r) acc[r][i] += g[r][q] * bv;
    }
  for (int64_t v = 0; v < unshared; ++v)
    for (int i = 0; i < C; ++i) {
      const v8 uv = load8(ut + v * ldu + c + 8 * i);
      for (int r = 0; r < R; ++r) acc[r][i] += t[r][v] * uv;
    }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) store8(y[r] + c + 8 * i, add ? load8(y[r] + c + 8 * i) + acc[r][i] : acc[r][i]);
}

// y[r][c] = Σ_q g[r][q]·b[q·ldq + c] + Σ_v t[r][v]·ut[v·ldu + c] for c < width (outputs_block); with `add`,
// that sum is added to y[r][c] (one rounding, as an Add node after the op). Several output vectors per step
// give independent accumulation chains (one row alone would wait on each FMA).
template <int R>
inline void outputs(const float* const* g, const float* b, int64_t ldq, int64_t ranks, const float* const* t,
                    const float* ut, int64_t ldu, int64_t unshared, float* const* y, int64_t width, bool add) {
  constexpr int C = R == 1 ? 4 : 2;
  int64_t c = 0;
  for (; c + 8 * C <= width; c += 8 * C) outputs_block<R, C>(g, b, ldq, ranks, t, ut, ldu, unshared, y, c, add);
  for (; c + 8 <= width; c += 8) outputs_block<R, 1>(g, b, ldq, ranks, t, ut, ldu, unshared, y, c, add);
  for (; c < width; ++c)
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int64_t q = 0; q < ranks; ++q) sum += g[r][q] * b[q * ldq + c];
      for (int64_t v = 0; v < unshared; ++v) sum += t[r][v] * ut[v * ldu + c];
      y[r][c] = add ? y[r][c] + sum : sum;
    }
}

constexpr int64_t kTile = 64;  // B0 rows turned per tile: r_s·64 floats stay in L1 for every chunk k

// Rows [0, rows) of a row-major matrix with `cols` columns (data up to src_end) into dst as (cols, rows): 8 rows
// at a time through registers (transpose8), gathered where a block would read past src_end
inline void transpose_rows(const float* src, int64_t cols, const float* src_end, int64_t rows, float* dst) {
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {
    const float* block = src + c * cols;
    for (int64_t q0 = 0; q0 < cols; q0 += 8) {
      const int64_t count = std::min<int64_t>(8, cols - q0);
      if (block + 7 * cols + q0 + 8 <= src_end) {
        v8 col[8];
        transpose8(block + q0, cols, col);
        for (int64_t k = 0; k < count; ++k) store8(dst + (q0 + k) * rows + c, col[k]);
      } else {
        for (int64_t k = 0; k < count; ++k) store8(dst + (q0 + k) * rows + c, strided8(block + q0 + k, cols));
      }
    }
  }
  for (; c < rows; ++c)
    for (int64_t q = 0; q < cols; ++q) dst[q * rows + c] = src[c * cols + q];
}

// R consecutive rows starting at `row`; work holds (m·r_s + r_s + n·r_s + u) floats per row, tile r_s·kTile
template <int R>
inline void compute_block(const Problem& p, int64_t row, float* work, float* xf, float* yf, float* tile) {
  const int64_t rs = p.rs, u = p.u, per_row = p.m * rs + rs + p.n * rs + u;
  const float* x[R];
  float* y[R];
  float *z[R], *h[R], *g[R], *t[R];
  int64_t at[R];  // the rows of X and Y
  for (int r = 0; r < R; ++r) {
    at[r] = p.row_map ? p.row_map[row + r] : row + r;
    if (p.x16) {
      const Ort::Float16_t* src = p.x16 + at[r] * p.d_in;
      float* dst = xf + r * p.d_in;
      widen_half(src, p.d_in, dst);
      x[r] = dst;
    } else {
      x[r] = p.x32 + at[r] * p.d_in;
    }
    y[r] = p.y16 ? yf + r * p.d_out : p.y32 + at[r] * p.ldy;
    z[r] = work + r * per_row;  // (m, r_s)
    h[r] = z[r] + p.m * rs;     // (r_s)
    g[r] = h[r] + rs;           // (n, r_s), γ included
    t[r] = g[r] + p.n * rs;     // (u), γ included
  }
  if (rs > 0) {
    for (int64_t j = 0; j < p.m; ++j) {  // z[j, ·] = x[chunk j]·A0ᵀ (the last chunks cut at d_in)
      const int64_t start = j * p.c_a, width = std::max<int64_t>(0, std::min(p.c_a, p.d_in - start));
      const float* xj[R];
      float* zj[R];
      for (int r = 0; r < R; ++r) xj[r] = x[r] + std::min(start, p.d_in), zj[r] = z[r] + j * rs;
      dots<R>(xj, width, p.a0, p.c_a, rs, zj);
    }
    for (int r = 0; r < R; ++r) {
      // h[i] = Σ_j z[j, (i + j·s_A) mod r_s], summed over j in order
      std::fill(h[r], h[r] + rs, 0.0f);
      for (int64_t j = 0, off = 0; j < p.m; ++j, off = (off + p.off_a_step) % rs) {
        const float* zj = z[r] + j * rs;
        for (int64_t i = 0; i < rs - off; ++i) h[r][i] += zj[i + off];
        for (int64_t i = rs - off; i < rs; ++i) h[r][i] += zj[i + off - rs];
      }
      // g[k, q] = γ·h[(q − k·s_B) mod r_s]: h rotated right by off = k·s_B mod r_s (two runs, no division)
      for (int64_t k = 0, off = 0; k < p.n; ++k, off = (off + p.off_b_step) % rs) {
        float* gk = g[r] + k * rs;
        for (int64_t q = 0; q < off; ++q) gk[q] = p.scaling * h[r][q + rs - off];
        for (int64_t q = off; q < rs; ++q) gk[q] = p.scaling * h[r][q - off];
      }
    }
  }
  if (u > 0) {
    dots<R>(x, p.d_in, p.au, p.d_in, u, t);
    for (int r = 0; r < R; ++r)
      for (int64_t v = 0; v < u; ++v) t[r][v] *= p.scaling;
  }
  // every chunk k reads the same B0 (its rotation is in g): columns [c0, c0 + w) of B0ᵀ serve outputs
  // k·c_B + c0 … of every chunk, the last chunk cut at d_out
  const int64_t c_b = rs > 0 ? p.c_b : p.d_out, step = p.b0_stored ? kTile : c_b;
  for (int64_t c0 = 0; c0 < c_b; c0 += step) {
    const int64_t w = std::min(step, c_b - c0);
    const float* b = p.b0 + c0;  // transposed: (r_s, c_B), rows c_B apart
    int64_t ldq = p.c_b;
    if (p.b0_stored) {  // B0's rows [c0, c0 + w) as (r_s, w)
      transpose_rows(p.b0 + c0 * rs, rs, p.b0 + p.c_b * rs, w, tile);
      b = tile, ldq = w;
    }
    for (int64_t k = 0; k < (rs > 0 ? p.n : 1); ++k) {
      const int64_t start = k * c_b + c0, width = std::min(w, p.d_out - start);
      if (width <= 0) break;
      const float* gk[R];
      float* yk[R];
      for (int r = 0; r < R; ++r) gk[r] = g[r] + k * rs, yk[r] = y[r] + start;
      outputs<R>(gk, b, ldq, rs, t, p.but + start, p.d_out, u, yk, width, p.add);
    }
  }
  if (p.y16)
    for (int r = 0; r < R; ++r) {
      Ort::Float16_t* dst = p.y16 + at[r] * p.d_out;
      for (int64_t o = 0; o < p.d_out; ++o) dst[o] = Ort::Float16_t(y[r][o]);
    }
}

constexpr int kRowBlock = 4;

// Asks for every cache line of `bytes` at `data` (into L2) before the loops read it. A decoded token's shards
// are cold (the base weights streamed through the caches since the last call), and the loops' short
// streams alone keep too few misses in flight: 13 % less kernel time on demo int4 decode (measured).
inline void prefetch(const void* data, int64_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
}

// rows [begin, end) of Y, kRowBlock at a time
PROLORA_HOT void compute_rows(const Problem& p, int64_t begin, int64_t end) {
  thread_local std::vector<float> work_buf, x_buf, y_buf, tile_buf;
  const int64_t per_row = p.m * p.rs + p.rs + p.n * p.rs + p.u;
  float* work = scratch(work_buf, static_cast<size_t>(kRowBlock * per_row));
  float* xf = p.x16 ? scratch(x_buf, static_cast<size_t>(kRowBlock * p.d_in)) : nullptr;
  float* yf = p.y16 ? scratch(y_buf, static_cast<size_t>(kRowBlock * p.d_out)) : nullptr;
  float* tile = scratch(tile_buf, static_cast<size_t>(p.rs * kTile));
  if (p.rows < kRowBlock) {  // each shard is read once: ask for all of it now
    prefetch(p.a0, p.rs * p.c_a * 4), prefetch(p.au, p.u * p.d_in * 4);
    prefetch(p.b0, p.rs * p.c_b * 4), prefetch(p.but, p.u * p.d_out * 4);
  }
  int64_t row = begin;
  for (; row + kRowBlock <= end; row += kRowBlock) compute_block<kRowBlock>(p, row, work, xf, yf, tile);
  for (; row < end; ++row) compute_block<1>(p, row, work, xf, yf, tile);
}

// task(i) for i < count over ONNX Runtime's intra-op pool (on the calling thread where it has none)
template <typename F>
void for_each_task(const Ort::KernelContext& ctx, size_t count, F& task) {
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<F*>(data))(i); }, count, 0, &task);
}

// multiply-adds per row of X (the parallel policy's measure of work)
inline int64_t row_work(const Problem& p) { return (p.rs + p.u) * (p.d_in + p.d_out); }

// count values in fp32: the source itself for fp32, else widened into dst
inline const float* widened(const float* src, int64_t, float*) { return src; }
inline const float* widened(const Ort::Float16_t* src, int64_t count, float* dst) {
  widen_half(src, count, dst);
  return dst;
}

// (rows, cols) → (cols, rows) in fp32, into dst: B0 (for a row block or more) and B_u for the output loops,
// which then run over contiguous memory.
PROLORA_HOT const float* transposed(const float* src, int64_t rows, int64_t cols, float* dst) {
  if (rows == 1 || cols == 1) return src;  // same layout either way
  transpose_rows(src, cols, src + rows * cols, rows, dst);
  return dst;
}

// fp16: widened (through `wide`, rows·cols floats of scratch, when it must be transposed too) into dst
const float* transposed(const Ort::Float16_t* src, int64_t rows, int64_t cols, float* dst, float* wide) {
  if (rows == 1 || cols == 1) return widened(src, rows * cols, dst);
  widen_half(src, rows * cols, wide);
  return transposed(wide, rows, cols, dst);
}

// a tensor's dimensions and element type, read through one type-and-shape info (rank ≤ 8 here: the op's
// tensors have rank 2, X any rank ≤ 8)
struct Dims {
  int64_t d[8] = {};
  size_t rank = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Dims() = default;
  explicit Dims(const Ort::ConstValue& value) {
    if (api_version >= kShapeReferenceApiVersion) {  // the value's own shape: no info object allocated and freed
      const int64_t* shape = nullptr;
      Ort::ThrowOnError(Ort::GetApi().GetTensorElementTypeAndShapeDataReference(value, &type, &shape, &rank));
      check_rank();
      std::copy(shape, shape + rank, d);
      return;
    }
    Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
    type = info.GetElementType();
    rank = info.GetDimensionsCount();
    check_rank();
    Ort::ThrowOnError(Ort::GetApi().GetDimensions(info, d, rank));
  }
  void check_rank() const {
    if (rank > std::size(d))
      throw Ort::Exception("RotatedShardLoRA: inputs of rank > 8 are not supported", ORT_INVALID_ARGUMENT);
  }
  std::string str() const {
    std::string s = "(";
    for (size_t i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + ")";
  }
  void expect(const char* name, int64_t rows, int64_t cols) const {
    if (rank != 2 || d[0] != rows || d[1] != cols)
      throw Ort::Exception(std::string("RotatedShardLoRA: ") + name + " has shape " + str() + ", expected (" +
                               std::to_string(rows) + ", " + std::to_string(cols) + ")",
                           ORT_INVALID_ARGUMENT);
  }
};

// The parallel policy for one Problem: rows split over ONNX Runtime's intra-op pool when there is
// enough work, inline otherwise (one decoded token never touches the pool).
void run_problem(const Ort::KernelContext& ctx, const Problem& p) {
  if (p.rows == 0) return;
  const int64_t work_per_row = row_work(p);
  if (p.rows < 2 * kMinRowsPerTask || p.rows * work_per_row < kParallelMinWork) {
    compute_rows(p, 0, p.rows);
    return;
  }
  // enough tasks for the pool to balance, each at least kParallelMinWork / 4 multiply-adds
  const int64_t by_work = std::max<int64_t>(kMinRowsPerTask, (kParallelMinWork / 4) / std::max<int64_t>(work_per_row, 1));
  const int64_t rows_per_task = std::min(by_work, p.rows);
  auto task = [&](size_t index) {
    const int64_t begin = static_cast<int64_t>(index) * rows_per_task;
    compute_rows(p, begin, std::min(p.rows, begin + rows_per_task));
  };
  for_each_task(ctx, static_cast<size_t>((p.rows + rows_per_task - 1) / rows_per_task), task);
}

// true for an fp16 tensor, false for fp32; any other type is refused
inline bool half(const Dims& dims) {
  if (dims.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && dims.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw Ort::Exception("RotatedShardLoRA: shards must be float32 or float16", ORT_INVALID_ARGUMENT);
  return dims.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// ONNX Runtime's C API takes errors as OrtStatus, never as exceptions: run `body`, turning what it throws into one
template <typename F>
OrtStatusPtr as_status(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& err) {
    return Ort::Status(err).release();
  } catch (const std::exception& err) {
    return Ort::Status(err).release();
  }
}

// one module's shard inputs: A_shard, B_shard, A_unshared, B_unshared (null where a name is empty or absent)
using Shards = std::array<Ort::ConstValue, 4>;

inline Shards shard_inputs(const Ort::KernelContext& ctx, size_t first) {
  const size_t count = ctx.GetInputCount();
  Shards shards;
  for (size_t i = 0; i < shards.size(); ++i) shards[i] = first + i < count ? ctx.GetInput(first + i) : Ort::ConstValue{nullptr};
  if ((shards[0] == nullptr) != (shards[1] == nullptr) || (shards[2] == nullptr) != (shards[3] == nullptr))
    throw Ort::Exception("RotatedShardLoRA: A_shard/B_shard and A_unshared/B_unshared come in pairs", ORT_INVALID_ARGUMENT);
  return shards;
}

// one used slot of a call: which slot, and its Problem (its rows; its shards once prepared)
struct Job {
  int64_t slot = 0;
  Problem problem;
};

// Kernel of RotatedShardLoRA (Slots = false: X, A_shard, B_shard, A_unshared, B_unshared) and of
// RotatedShardLoRASlots (SPEC §5; Slots = true: X (batch, …, d_in), adapter_index (batch,), then the
// shards with a leading slot axis K). Row b of a slot graph uses slot adapter_index[b]; −1 gives an exact
// zero delta (the base model). Each slot some row uses is prepared (B transposed, fp16 widened) once, and
// its rows, wherever they sit in the batch, are computed as one Problem.
template <typename T, bool Slots>
struct Kernel {
  static constexpr size_t kFirstShard = Slots ? 2 : 1;
  static constexpr size_t kShardRank = Slots ? 3 : 2;
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
      fail("in_features, out_features, sharing_rate_a and sharing_rate_b must be >= 1");
  }

  [[noreturn]] static void fail(const std::string& what) {
    throw Ort::Exception(std::string(Slots ? kSlotOpType : kOpType) + ": " + what, ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return as_status([&] { Compute(context); });
  }

  // Y = 0 in X's shape with the last dimension out_features (the null kernel's output)
  void write_zeros(Ort::KernelContext& ctx) const {
    Dims dims(ctx.GetInput(0));
    dims.d[dims.rank - 1] = attrs.d_out;
    int64_t size = 1;
    for (size_t i = 0; i < dims.rank; ++i) size *= dims.d[i];
    T* y = ctx.GetOutput(0, dims.d, dims.rank).GetTensorMutableData<T>();
    std::fill(y, y + size, T(0.0f));
  }

  // a shard's shape: (rows, cols), after the slot axis for a slot graph (K must agree between shards)
  static void expect(const Dims& dims, const char* name, int64_t rows, int64_t cols, int64_t& slots) {
    const bool ok = dims.rank == kShardRank && dims.d[kShardRank - 2] == rows && dims.d[kShardRank - 1] == cols &&
                    (!Slots || slots < 0 || dims.d[0] == slots);
    if (!ok)
      fail(std::string(name) + " has shape " + dims.str() + ", expected (" +
           (Slots ? (slots < 0 ? std::string("slots, ") : std::to_string(slots) + ", ") : std::string()) +
           std::to_string(rows) + ", " + std::to_string(cols) + ")");
    slots = Slots ? dims.d[0] : 1;
  }

  static void touch(const Shards& values) {
    unsigned sum = 0;
    for (const Ort::ConstValue& value : values) {
      if (value == nullptr) continue;
      const size_t bytes = value.GetTensorTypeAndShapeInfo().GetElementCount() * (half(Dims(value)) ? 2 : 4);
      const unsigned char* data = static_cast<const unsigned char*>(value.GetTensorRawData());
      for (size_t i = 0; i < bytes; i += 64) sum += data[i];
    }
    static volatile unsigned sink;
    sink = sum;
  }

  static int64_t leading(const Dims& dims) { return dims.rank == kShardRank ? dims.d[kShardRank - 2] : -1; }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
#ifdef PROLORA_NULL_KERNEL
    // a measurement variant (bench/bench_kernel.py): Y = 0 without reading the shards, so that the node's own
    // cost (ONNX Runtime's dispatch of one more node, Y's allocation) can be told from the kernel's work
    return write_zeros(ctx);
#endif
    const Shards shards = shard_inputs(ctx, kFirstShard);
#ifdef PROLORA_TOUCH_KERNEL
    // a measurement variant (bench/bench_kernel.py): reads one value per cache line of every shard, then Y = 0
    // as the null kernel, so that bringing the shards into cache is priced apart from the arithmetic
    touch(shards);
    return write_zeros(ctx);
#endif
    Ort::ConstValue x = ctx.GetInput(0);
    const Dims x_dims(x);
    Dims y_dims = x_dims;
    if (y_dims.rank > 0) y_dims.d[y_dims.rank - 1] = attrs.d_out;
    check_x(attrs, x_dims);
    T* y = ctx.GetOutput(0, y_dims.d, y_dims.rank).template GetTensorMutableData<T>();
    apply(ctx, attrs, x, x_dims, Slots ? ctx.GetInput(1) : Ort::ConstValue{nullptr}, shards, y, attrs.d_out, false);
  }

  static void check_x(const Attributes& attrs, const Dims& x_dims) {
    if (x_dims.rank < (Slots ? 2u : 1u) || x_dims.d[x_dims.rank - 1] != attrs.d_in)
      fail("X has shape " + x_dims.str() + ", expected (" + (Slots ? "batch, …, " : "…, ") +
           std::to_string(attrs.d_in) + ")");
  }

  // One module's delta for X into Y (y_data: its first column; rows ldy apart): written, or with `add` added
  // to what Y holds (the fused op's base output; fp32 only). index_value: adapter_index (slot op only).
  static void apply(const Ort::KernelContext& ctx, const Attributes& attrs, const Ort::ConstValue& x,
                    const Dims& x_dims, const Ort::ConstValue& index_value, const Shards& shards, T* y_data,
                    int64_t ldy, bool add) {
    thread_local std::vector<float> a0_buf, b0_buf, au_buf, bu_buf, wide_buf;
    thread_local std::vector<int64_t> position_buf, row_map_buf;
    thread_local std::vector<Job> jobs_buf;
    const Ort::ConstValue &a0 = shards[0], &b0 = shards[1], &au = shards[2], &bu = shards[3];
    Problem p;
    p.d_in = attrs.d_in;
    p.d_out = attrs.d_out;
    p.m = attrs.m;
    p.n = attrs.n;
    p.c_a = (p.d_in + p.m - 1) / p.m;
    p.c_b = (p.d_out + p.n - 1) / p.n;
    p.scaling = attrs.scaling;
    p.ldy = ldy;
    p.add = add;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_dims.rank; ++i) rows *= x_dims.d[i];
    const int64_t batch = Slots ? x_dims.d[0] : 1;

    int64_t slots = -1;
    Dims a0_dims, b0_dims, au_dims, bu_dims;
    if (a0 != nullptr) {
      a0_dims = Dims(a0), b0_dims = Dims(b0);
      p.rs = leading(a0_dims);
      expect(a0_dims, "A_shard", p.rs, p.c_a, slots);
      expect(b0_dims, "B_shard", p.c_b, p.rs, slots);
    }
    if (au != nullptr) {
      au_dims = Dims(au), bu_dims = Dims(bu);
      p.u = leading(au_dims);
      expect(au_dims, "A_unshared", p.u, p.d_in, slots);
      expect(bu_dims, "B_unshared", p.d_out, p.u, slots);
    }
    if (slots < 0) slots = Slots ? 0 : 1;
    if (p.rs > 0) {
      p.off_a_step = positive_mod(attrs.s_a, p.rs);
      p.off_b_step = positive_mod(attrs.s_b, p.rs);
    }

    // the slot each batch row reads (single-adapter op: slot 0 for all), and where each used slot is prepared
    const int64_t* index = nullptr;
    if (slots > static_cast<int64_t>(position_buf.size())) position_buf.resize(static_cast<size_t>(slots));
    int64_t* position = position_buf.data();
    std::fill(position, position + slots, -1);
    int64_t used = 0;
    if constexpr (Slots) {
      const Dims index_dims(index_value);
      if (index_dims.rank != 1 || index_dims.d[0] != batch)
        fail("adapter_index has shape " + index_dims.str() + ", expected (" + std::to_string(batch) + ",)");
      index = index_value.GetTensorData<int64_t>();
      for (int64_t b = 0; b < batch; ++b) {
        if (index[b] < -1 || index[b] >= slots)
          fail("adapter_index[" + std::to_string(b) + "] = " + std::to_string(index[b]) + " is neither -1 nor one of " +
               std::to_string(slots) + " slots");
        if (index[b] >= 0 && position[index[b]] < 0) position[index[b]] = used++;
      }
    } else {
      position[0] = used++;
    }
    const int64_t a0_size = p.rs * p.c_a, b0_size = p.c_b * p.rs, au_size = p.u * p.d_in, bu_size = p.d_out * p.u;
    if (used > static_cast<int64_t>(jobs_buf.size())) jobs_buf.resize(static_cast<size_t>(used));
    // each shard in its own type (fp32 or fp16; an fp16 graph may feed fp32 X or shards to some node)
    const bool a0_16 = p.rs > 0 && half(a0_dims), b0_16 = p.rs > 0 && half(b0_dims),
               au_16 = p.u > 0 && half(au_dims), bu_16 = p.u > 0 && half(bu_dims);
    // B0 transposed once pays where a slot has a row block or more (prefill, a batch on one adapter); for a
    // decoded row or two it is turned a tile at a time in L1 (transpose_rows: the whole transposition's scratch
    // writes cost more than the products then; demo decode, measured)
    const bool transpose_b0 = rows >= kRowBlock * used;
    // scratch for every used slot apart, so that slots can be prepared on different threads
    const int64_t wide_size = b0_16 || bu_16 ? std::max(b0_size, bu_size) : 0;
    float* a0_dst = scratch(a0_buf, static_cast<size_t>(a0_16 ? used * a0_size : 0));
    float* b0_dst = scratch(b0_buf, static_cast<size_t>(transpose_b0 || b0_16 ? used * b0_size : 0));
    float* au_dst = scratch(au_buf, static_cast<size_t>(au_16 ? used * au_size : 0));
    float* bu_dst = scratch(bu_buf, static_cast<size_t>(used * bu_size));
    float* wide = scratch(wide_buf, static_cast<size_t>(used * wide_size));
    int64_t* maps = scratch(row_map_buf, static_cast<size_t>(rows));
    Job* jobs = jobs_buf.data();  // the tasks below may run on other threads, which have thread_locals of their own

    const T* x_data = x.GetTensorData<T>();
    if (rows == 0) return;
    const int64_t per_batch = rows / batch;
    // where batch row b's slot was prepared; −1: the base model, an exact zero delta
    auto prepared_at = [&](int64_t b) { return Slots && index[b] < 0 ? -1 : position[Slots ? index[b] : 0]; };
    for (int64_t b = 0; b < batch && !add; ++b)
      if (prepared_at(b) < 0)
        for (int64_t row = b * per_batch; row < (b + 1) * per_batch; ++row)
          std::fill(y_data + row * ldy, y_data + row * ldy + p.d_out, T(0.0f));
    // one Problem per used slot over all of its rows, so that they go through the row-blocked loops and the
    // pool split together as the single-adapter op's do (not one small Problem per batch row): read in place
    // where the slot's batch rows are consecutive (one slot for the whole batch), else through a row map
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t at = position[s];
      if (at < 0) continue;
      Job& job = jobs[at];
      job.slot = s;
      int64_t first = -1, last = -1, count = 0;
      for (int64_t b = 0; b < batch; ++b)
        if (prepared_at(b) == at) first = first < 0 ? b : first, last = b, ++count;
      Problem& q = job.problem;
      q = p;
      q.rows = count * per_batch;
      if (last - first + 1 > count) {
        int64_t* map = maps;
        maps += q.rows;
        for (int64_t b = first, i = 0; b <= last; ++b)
          if (prepared_at(b) == at)
            for (int64_t t = 0; t < per_batch; ++t) map[i++] = (b - first) * per_batch + t;
        q.row_map = map;
      }
      const T* xs = x_data + first * per_batch * p.d_in;
      T* ys = y_data + first * per_batch * ldy;
      if constexpr (std::is_same<T, float>::value) {
        q.x32 = xs, q.y32 = ys;
      } else {
        q.x16 = xs, q.y16 = ys;
      }
    }
    // slot `at`'s shards, ready for compute_rows (fp32; B_u transposed, B0 as Problem::b0 says), in its scratch
    auto prepare = [&](int64_t at) {
      Problem& q = jobs[at].problem;
      const int64_t s = jobs[at].slot;
      float* tmp = wide + at * wide_size;
      if (p.rs > 0) {
        q.a0 = a0_16 ? widened(a0.GetTensorData<Ort::Float16_t>() + s * a0_size, a0_size, a0_dst + at * a0_size)
                     : a0.GetTensorData<float>() + s * a0_size;
        float* dst = b0_dst + at * b0_size;
        if (transpose_b0)
          q.b0 = b0_16 ? transposed(b0.GetTensorData<Ort::Float16_t>() + s * b0_size, p.c_b, p.rs, dst, tmp)
                       : transposed(b0.GetTensorData<float>() + s * b0_size, p.c_b, p.rs, dst);
        else
          q.b0 = b0_16 ? widened(b0.GetTensorData<Ort::Float16_t>() + s * b0_size, b0_size, dst)
                       : b0.GetTensorData<float>() + s * b0_size;
        q.b0_stored = !transpose_b0;
      }
      if (p.u > 0) {
        q.au = au_16 ? widened(au.GetTensorData<Ort::Float16_t>() + s * au_size, au_size, au_dst + at * au_size)
                     : au.GetTensorData<float>() + s * au_size;
        q.but = bu_16 ? transposed(bu.GetTensorData<Ort::Float16_t>() + s * bu_size, p.d_out, p.u, bu_dst + at * bu_size, tmp)
                      : transposed(bu.GetTensorData<float>() + s * bu_size, p.d_out, p.u, bu_dst + at * bu_size);
      }
    };
    // several adapters in the call (a mixed batch): one task per slot, each preparing its shards and
    // computing its rows, so that both the cold shard reads and the products spread over the pool
    if (used > 1 && (rows + used) * row_work(p) >= kParallelMinWork) {
      auto task = [&](size_t at) {
        prepare(static_cast<int64_t>(at));
        const Problem& q = jobs[at].problem;
        compute_rows(q, 0, q.rows);
      };
      for_each_task(ctx, static_cast<size_t>(used), task);
      return;
    }
    for (int64_t at = 0; at < used; ++at) {
      prepare(at);
      run_problem(ctx, jobs[at].problem);
    }
  }
};

// Kernel of RotatedShardLoRAAdd (Base, X, then each module's A_shard, B_shard, A_unshared, B_unshared) and
// RotatedShardLoRASlotsAdd (Base, X, adapter_index, the same), fp32: Y = Base with module i's delta added at
// columns [column_offsets[i], + out_features[i]). It stands for one adapted projection's SPEC §4/§5 nodes and
// the Pad/Concat/Add after them (prolora_export/native/fuse.py builds it when it loads a graph; files keep
// the standard op), and computes what they did bit for bit: each delta as the op's kernel sums it, added
// to the base once, as the Add did. One node instead of up to six (demo model: 150 instead of 390).
template <bool Slots>
struct FusedKernel {
  static constexpr size_t kFirstShard = Slots ? 3 : 2;
  std::vector<Attributes> parts;
  std::vector<int64_t> offsets;
  int64_t width = 0;

  explicit FusedKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    const int64_t d_in = ki.GetAttribute<int64_t>("in_features");
    width = ki.GetAttribute<int64_t>("width");
    offsets = ki.GetAttributes<int64_t>("column_offsets");
    const auto d_out = ki.GetAttributes<int64_t>("out_features"), m = ki.GetAttributes<int64_t>("sharing_rate_a"),
               n = ki.GetAttributes<int64_t>("sharing_rate_b"), s_a = ki.GetAttributes<int64_t>("stride_a"),
               s_b = ki.GetAttributes<int64_t>("stride_b");
    const auto scaling = ki.GetAttributes<float>("scaling");
    const size_t count = offsets.size();
    if (count == 0 || count > kMaxParts || d_out.size() != count || m.size() != count || n.size() != count ||
        s_a.size() != count || s_b.size() != count || scaling.size() != count)
      fail("needs 1 to " + std::to_string(kMaxParts) + " modules, every list attribute one value per module");
    for (size_t i = 0; i < count; ++i) {
      parts.push_back(Attributes{d_in, d_out[i], m[i], n[i], s_a[i], s_b[i], scaling[i]});
      if (d_in < 1 || d_out[i] < 1 || m[i] < 1 || n[i] < 1 || offsets[i] < 0 || offsets[i] + d_out[i] > width)
        fail("module " + std::to_string(i) + " has sizes or columns outside the projection's " + std::to_string(width));
    }
  }

  [[noreturn]] static void fail(const std::string& what) {
    throw Ort::Exception(std::string(Slots ? kFusedSlotOpType : kFusedOpType) + ": " + what, ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return as_status([&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue base = ctx.GetInput(0), x = ctx.GetInput(1);
    const Dims base_dims(base), x_dims(x);
    bool leading_match = base_dims.rank == x_dims.rank && base_dims.rank > 0;
    for (size_t i = 0; leading_match && i + 1 < x_dims.rank; ++i) leading_match = base_dims.d[i] == x_dims.d[i];
    if (!leading_match || base_dims.d[base_dims.rank - 1] != width)
      fail("Base has shape " + base_dims.str() + ", expected X's " + x_dims.str() + " with " + std::to_string(width) +
           " features");
    int64_t size = 1;
    for (size_t i = 0; i < base_dims.rank; ++i) size *= base_dims.d[i];
    float* y = ctx.GetOutput(0, base_dims.d, base_dims.rank).GetTensorMutableData<float>();
    const float* from = base.GetTensorData<float>();
    if (y != from) std::copy(from, from + size, y);
    const Ort::ConstValue index = Slots ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
    for (size_t i = 0; i < parts.size(); ++i) {
      const Shards shards = shard_inputs(ctx, kFirstShard + 4 * i);
#ifdef PROLORA_TOUCH_KERNEL
      Kernel<float, Slots>::touch(shards);
      continue;
#endif
#ifdef PROLORA_NULL_KERNEL
      continue;
#endif
      Kernel<float, Slots>::check_x(parts[i], x_dims);
      Kernel<float, Slots>::apply(ctx, parts[i], x, x_dims, index, shards, y + offsets[i], width, true);
    }
  }
};

std::atomic<uint64_t> unknown_dims{0};

// Y's type is input 0's (X, or the fused op's Base), its shape input 0's with the last dimension out_features
// (the fused op: kept). Input 0 only: the others may be empty names, which the C++ ShapeInferContext wrapper
// would try to read.
OrtStatusPtr infer_shape(OrtShapeInferContext* ctx, bool out_features_last) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* in_info = nullptr;
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &in_info)) return status;
  Ort::ConstTensorTypeAndShapeInfo info(in_info);  // owned by the context
  std::vector<int64_t> dims = info.GetShape();
  if (dims.empty()) return nullptr;  // rank unknown: nothing to say
  std::vector<const char*> symbols(dims.size(), nullptr);
  info.GetSymbolicDimensions(symbols.data(), symbols.size());
  OrtStatusPtr status = nullptr;
  if (out_features_last) {
    const OrtOpAttr* attr = nullptr;
    if ((status = api.ShapeInferContext_GetAttribute(ctx, "out_features", &attr))) return status;
    size_t size = 0;
    if ((status = api.ReadOpAttr(attr, ORT_OP_ATTR_INT, &dims.back(), sizeof(int64_t), &size))) return status;
    symbols.back() = "";
  }
  // a dimension of unknown size goes out as a fresh symbol: ORT would write -1 as a known size of -1
  std::vector<std::string> fresh(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    if (symbols[i] == nullptr) symbols[i] = "";
    if (dims[i] < 0 && symbols[i][0] == '\0') {
      fresh[i] = "rotated_shard_lora_dim_" + std::to_string(unknown_dims.fetch_add(1));
      symbols[i] = fresh[i].c_str();
    }
  }
  OrtTensorTypeAndShapeInfo* out_info = nullptr;
  if ((status = api.CreateTensorTypeAndShapeInfo(&out_info))) return status;
  Ort::TensorTypeAndShapeInfo out(out_info);
  if ((status = api.SetTensorElementType(out_info, info.GetElementType()))) return status;
  if ((status = api.SetDimensions(out_info, dims.data(), dims.size()))) return status;
  if ((status = api.SetSymbolicDimensions(out_info, symbols.data(), symbols.size()))) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out_info);
}

OrtStatusPtr infer_output(const OrtCustomOp*, OrtShapeInferContext* ctx) { return infer_shape(ctx, true); }
OrtStatusPtr infer_like_base(const OrtCustomOp*, OrtShapeInferContext* ctx) { return infer_shape(ctx, false); }

template <bool Slots>
struct FusedOp : Ort::CustomOpBase<FusedOp<Slots>, FusedKernel<Slots>, true> {
  FusedOp() {
    this->InferOutputShapeFn = infer_like_base;
    // Y may take Base's buffer (fuse.py fuses only where this node is Base's one reader): ONNX Runtime's planner
    // then skips allocating Y, and the kernel its copy of Base
    this->GetMayInplace = [](int** input_index, int** output_index) -> size_t {
      *input_index = new int[1]{0};
      *output_index = new int[1]{0};
      return 1;
    };
    this->ReleaseMayInplace = [](int* input_index, int* output_index) {
      delete[] input_index;
      delete[] output_index;
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return as_status([&] { *kernel = new FusedKernel<Slots>(info); });
  }
  const char* GetName() const { return Slots ? kFusedSlotOpType : kFusedOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return FusedKernel<Slots>::kFirstShard + 4 * kMaxParts; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index < 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (Slots && index == 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // shards: fp32 or fp16, checked by the kernel
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < FusedKernel<Slots>::kFirstShard ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

template <typename T, ONNXTensorElementDataType Elem, bool Slots>
struct Op : Ort::CustomOpBase<Op<T, Elem, Slots>, Kernel<T, Slots>, true> {
  Op() { this->InferOutputShapeFn = infer_output; }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return as_status([&] { *kernel = new Kernel<T, Slots>(info); });
  }
  const char* GetName() const { return Slots ? kSlotOpType : kOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return Slots ? 6 : 5; }
  // X is Elem; adapter_index int64; the shards fp32 or fp16 independently of X (an fp16 export may give some
  // node an fp32 X, as its function body's Casts allow), checked by the kernel
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 0) return Elem;
    if (Slots && index == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < (Slots ? 2u : 1u) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
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
  for (uint32_t version = ORT_API_VERSION; version >= kMinApiVersion && api == nullptr; --version)
    if ((api = api_base->GetApi(version)) != nullptr) api_version = version;
  if (api == nullptr) return nullptr;  // cannot even report: an ONNX Runtime older than 1.17
  Ort::InitApi(api);
  static Op<float, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false> fp32_op;
  static Op<Ort::Float16_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false> fp16_op;
  static Op<float, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true> fp32_slot_op;
  static Op<Ort::Float16_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true> fp16_slot_op;
  static FusedOp<false> fused_op;
  static FusedOp<true> fused_slot_op;
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // alive as long as the process
  try {
    std::lock_guard<std::mutex> lock(mutex);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{&fp32_op, &fp16_op, &fp32_slot_op, &fp16_slot_op, &fused_op,
                                                             &fused_slot_op})
      domain->Add(op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& err) {
    return Ort::Status(err).release();
  }
  return nullptr;
}

}  // extern "C"
