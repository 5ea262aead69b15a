// Multiresolution hash encoding (Mueller et al. 2022), forward and backward, including the gradient with
// respect to the input positions (torch-ngp's kernel has it too; tcnn's does; what they lack is the march and
// composite backward, see composite.cu).
//
// Layouts match the PyTorch path (instsim/nerf/encoding.py) so checkpoints load into either backend:
//   x      (N, 3)    points in [0, 1]^3 (clamped; the clamped axes get no gradient)
//   table  (F, S)    feature-major, level l at columns offsets[l] .. offsets[l] + size_l
//   out    (N, L*F)  level-major (level l's features at columns l*F .. l*F + F-1)
// Level l has res[l] cells per side; a dense level (dense[l] != 0) indexes its (res+1)^3 vertices directly,
// a hashed one uses (i * 1) ^ (j * 2654435761) ^ (k * 805459861) mod T. uint32 products keep exactly the
// low bits of the PyTorch path's int64 products, so both backends hit the same entries.
#include "common.h"

#include <cuda_fp16.h>

namespace instsim {
namespace {

struct Cell {
  uint32_t base[3];  // lower corner of the cell
  bool inside[3];    // the coordinate was inside [0, 1] (else clamped: no position gradient)
};

template <typename scalar_t>
__device__ __forceinline__ Cell locate(const scalar_t* __restrict__ xn, int res, scalar_t frac[3]) {
  Cell c;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    scalar_t v = xn[a];
    c.inside[a] = v >= scalar_t(0) && v <= scalar_t(1);
    v = min(max(v, scalar_t(0)), scalar_t(1));
    const scalar_t pos = v * scalar_t(res);
    // the +1 corner must stay inside the level: x == 1 lands in the last cell with frac == 1
    const scalar_t fl = max(min(floor(pos), scalar_t(res - 1)), scalar_t(0));
    frac[a] = pos - fl;
    c.base[a] = static_cast<uint32_t>(fl);
  }
  return c;
}

__device__ __forceinline__ int64_t corner_index(const Cell& c, int corner, int res, bool dense, uint32_t mask,
                                                int64_t offset) {
  const uint32_t i = c.base[0] + ((corner >> 2) & 1);
  const uint32_t j = c.base[1] + ((corner >> 1) & 1);
  const uint32_t k = c.base[2] + (corner & 1);
  if (dense) {
    const int64_t v = res + 1;
    return offset + i + j * v + k * v * v;
  }
  return offset + (((i * 1u) ^ (j * 2654435761u) ^ (k * 805459861u)) & mask);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t corner_weight(const scalar_t frac[3], int corner) {
  const scalar_t wx = (corner & 4) ? frac[0] : scalar_t(1) - frac[0];
  const scalar_t wy = (corner & 2) ? frac[1] : scalar_t(1) - frac[1];
  const scalar_t wz = (corner & 1) ? frac[2] : scalar_t(1) - frac[2];
  return wx * wy * wz;
}

// one thread per (point, level): blockIdx.y is the level, so a block's gathers stay in one level's table part
template <typename scalar_t, int F>
__global__ void hash_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ table,
                                    const int* __restrict__ res, const int64_t* __restrict__ offsets,
                                    const uint8_t* __restrict__ dense, int64_t n, int n_levels, int64_t stride,
                                    uint32_t mask, scalar_t* __restrict__ out) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int l = blockIdx.y;
  if (p >= n) return;
  scalar_t frac[3];
  const int r = res[l];
  const Cell c = locate(x + 3 * p, r, frac);
  scalar_t acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = scalar_t(0);
#pragma unroll
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t idx = corner_index(c, corner, r, dense[l], mask, offsets[l]);
    const scalar_t w = corner_weight(frac, corner);
#pragma unroll
    for (int f = 0; f < F; ++f) acc[f] += w * table[f * stride + idx];
  }
#pragma unroll
  for (int f = 0; f < F; ++f) out[p * n_levels * F + l * F + f] = acc[f];
}

template <typename scalar_t, int F>
__global__ void hash_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ table, const int* __restrict__ res,
                                     const int64_t* __restrict__ offsets, const uint8_t* __restrict__ dense,
                                     int64_t n, int n_levels, int64_t stride, uint32_t mask,
                                     scalar_t* __restrict__ grad_table, scalar_t* __restrict__ grad_x) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int l = blockIdx.y;
  if (p >= n) return;
  scalar_t frac[3];
  const int r = res[l];
  const Cell c = locate(x + 3 * p, r, frac);
  scalar_t go[F];
#pragma unroll
  for (int f = 0; f < F; ++f) go[f] = grad_out[p * n_levels * F + l * F + f];
  scalar_t dfrac[3] = {scalar_t(0), scalar_t(0), scalar_t(0)};
#pragma unroll
  for (int corner = 0; corner < 8; ++corner) {
    const int64_t idx = corner_index(c, corner, r, dense[l], mask, offsets[l]);
    if (grad_table != nullptr) {
      const scalar_t w = corner_weight(frac, corner);
#pragma unroll
      for (int f = 0; f < F; ++f) atomicAdd(grad_table + f * stride + idx, w * go[f]);
    }
    if (grad_x != nullptr) {
      // d(weight)/d(frac_a): the other two factors, signed by the corner's side along a
      scalar_t g = scalar_t(0);
#pragma unroll
      for (int f = 0; f < F; ++f) g += go[f] * table[f * stride + idx];
      const scalar_t wx = (corner & 4) ? frac[0] : scalar_t(1) - frac[0];
      const scalar_t wy = (corner & 2) ? frac[1] : scalar_t(1) - frac[1];
      const scalar_t wz = (corner & 1) ? frac[2] : scalar_t(1) - frac[2];
      dfrac[0] += ((corner & 4) ? g : -g) * wy * wz;
      dfrac[1] += ((corner & 2) ? g : -g) * wx * wz;
      dfrac[2] += ((corner & 1) ? g : -g) * wx * wy;
    }
  }
  if (grad_x != nullptr) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      // frac = x * res - floor(...): d/dx = res * d/dfrac; levels of one point add up
      if (c.inside[a]) atomicAdd(grad_x + 3 * p + a, dfrac[a] * scalar_t(r));
    }
  }
}

// ---- the training step's variant (instsim/nerf/cuda_train.py), two features per level only: the forward
// gathers from a half-precision copy of the table laid out entry-major, (S, 2) as __half2, one 4-byte load per
// corner instead of two 4-byte loads from two feature rows, and the whole table (half the bytes) stays in L2; the
// backward accumulates into an entry-major float32 (S, 2) gradient with one 8-byte vector atomic per corner
// (sm_90) instead of two. The features feed a bf16 MLP, so the half table costs no precision that matters.
__global__ void table_to_half2_kernel(const float* __restrict__ table, int64_t stride, __half2* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= stride) return;
  out[i] = __floats2half2_rn(table[i], table[stride + i]);
}

// one thread per point, all levels: a thread writes (and the backward reads) its point's whole feature row, so
// a warp's stores fill whole cache lines within a few instructions; one thread per (point, level), as the float32
// kernels do, writes 8 bytes per line per pass over the points, 16 passes apart
__global__ void hash_forward_h2_kernel(const float* __restrict__ x, const __half2* __restrict__ table,
                                       const int* __restrict__ res, const int64_t* __restrict__ offsets,
                                       const uint8_t* __restrict__ dense, int64_t n, int n_levels, uint32_t mask,
                                       float* __restrict__ out) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  float2* row = reinterpret_cast<float2*>(out) + p * n_levels;
  for (int l = 0; l < n_levels; ++l) {
    float frac[3];
    const int r = res[l];
    const Cell c = locate(x + 3 * p, r, frac);
    const bool is_dense = dense[l];
    const int64_t offset = offsets[l];
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
    for (int corner = 0; corner < 8; ++corner) {
      const int64_t idx = corner_index(c, corner, r, is_dense, mask, offset);
      const float w = corner_weight(frac, corner);
      const float2 v = __half22float2(table[idx]);
      a0 += w * v.x;
      a1 += w * v.y;
    }
    row[l] = make_float2(a0, a1);
  }
}

__global__ void hash_backward_f2_kernel(const float* __restrict__ grad_out, const float* __restrict__ x,
                                        const int* __restrict__ res, const int64_t* __restrict__ offsets,
                                        const uint8_t* __restrict__ dense, int64_t n, int n_levels, uint32_t mask,
                                        float2* __restrict__ grad_table) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  const float2* row = reinterpret_cast<const float2*>(grad_out) + p * n_levels;
  for (int l = 0; l < n_levels; ++l) {
    const float2 go = row[l];
    if (go.x == 0.0f && go.y == 0.0f) continue;  // padding slots of the fixed buffer, rays past termination
    float frac[3];
    const int r = res[l];
    const Cell c = locate(x + 3 * p, r, frac);
    const bool is_dense = dense[l];
    const int64_t offset = offsets[l];
#pragma unroll
    for (int corner = 0; corner < 8; ++corner) {
      const int64_t idx = corner_index(c, corner, r, is_dense, mask, offset);
      const float w = corner_weight(frac, corner);
      atomicAdd(grad_table + idx, make_float2(w * go.x, w * go.y));
    }
  }
}

#define INSTSIM_DISPATCH_FEATURES(F_VALUE, ...)                                  \
  switch (F_VALUE) {                                                              \
    case 1: { constexpr int F = 1; __VA_ARGS__(); break; }                        \
    case 2: { constexpr int F = 2; __VA_ARGS__(); break; }                        \
    case 4: { constexpr int F = 4; __VA_ARGS__(); break; }                        \
    case 8: { constexpr int F = 8; __VA_ARGS__(); break; }                        \
    default: TORCH_CHECK(false, "hash grid kernels support 1, 2, 4 or 8 features per level, got ", F_VALUE); \
  }

void check_levels(const at::Tensor& res, const at::Tensor& offsets, const at::Tensor& dense) {
  INSTSIM_CHECK_INPUT(res);
  INSTSIM_CHECK_INPUT(offsets);
  INSTSIM_CHECK_INPUT(dense);
  TORCH_CHECK(res.scalar_type() == at::kInt, "res must be int32");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64");
  TORCH_CHECK(dense.scalar_type() == at::kByte, "dense must be uint8");
  TORCH_CHECK(res.numel() == offsets.numel() && res.numel() == dense.numel(), "one res/offset/dense per level");
}

}  // namespace

void hash_table_half2(const at::Tensor& table, at::Tensor out) {
  INSTSIM_CHECK_INPUT(table);
  INSTSIM_CHECK_INPUT(out);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == 2 && table.scalar_type() == at::kFloat,
              "hash_table_half2: table must be (2, S) float32");
  TORCH_CHECK(out.scalar_type() == at::kHalf && out.numel() == table.numel(), "hash_table_half2: out must be (S, 2) half");
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t s = table.size(1);
  if (s == 0) return;
  table_to_half2_kernel<<<blocks_for(s), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table.data_ptr<float>(), s, reinterpret_cast<__half2*>(out.data_ptr<at::Half>()));
  INSTSIM_CHECK_LAUNCH();
}

at::Tensor hash_encode_forward_h2(const at::Tensor& x, const at::Tensor& table_h2, const at::Tensor& res,
                                  const at::Tensor& offsets, const at::Tensor& dense, int64_t log2_table) {
  INSTSIM_CHECK_INPUT(x);
  INSTSIM_CHECK_INPUT(table_h2);
  check_levels(res, offsets, dense);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3 && x.scalar_type() == at::kFloat, "x must be (N, 3) float32");
  TORCH_CHECK(table_h2.scalar_type() == at::kHalf && table_h2.dim() == 2 && table_h2.size(1) == 2,
              "table_h2 must be (S, 2) half");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const int n_levels = static_cast<int>(res.numel());
  auto out = at::empty({n, n_levels * 2}, x.options());
  if (n == 0) return out;
  const uint32_t mask = static_cast<uint32_t>((int64_t(1) << log2_table) - 1);
  hash_forward_h2_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), reinterpret_cast<const __half2*>(table_h2.data_ptr<at::Half>()), res.data_ptr<int>(),
      offsets.data_ptr<int64_t>(), dense.data_ptr<uint8_t>(), n, n_levels, mask, out.data_ptr<float>());
  INSTSIM_CHECK_LAUNCH();
  return out;
}

at::Tensor hash_encode_backward_f2(const at::Tensor& grad_out, const at::Tensor& x, int64_t table_size,
                                   const at::Tensor& res, const at::Tensor& offsets, const at::Tensor& dense,
                                   int64_t log2_table) {
  INSTSIM_CHECK_INPUT(grad_out);
  INSTSIM_CHECK_INPUT(x);
  check_levels(res, offsets, dense);
  const int n_levels = static_cast<int>(res.numel());
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                  grad_out.size(0) == x.size(0) && grad_out.size(1) == 2 * n_levels,
              "grad_out (N, 2L) and x (N, 3) float32");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  auto grad = at::zeros({table_size, 2}, x.options());  // entry-major; the caller transposes it to (2, S)
  if (n == 0) return grad;
  const uint32_t mask = static_cast<uint32_t>((int64_t(1) << log2_table) - 1);
  hash_backward_f2_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_out.data_ptr<float>(), x.data_ptr<float>(), res.data_ptr<int>(), offsets.data_ptr<int64_t>(),
      dense.data_ptr<uint8_t>(), n, n_levels, mask, reinterpret_cast<float2*>(grad.data_ptr<float>()));
  INSTSIM_CHECK_LAUNCH();
  return grad;
}

at::Tensor hash_encode_forward(const at::Tensor& x, const at::Tensor& table, const at::Tensor& res,
                               const at::Tensor& offsets, const at::Tensor& dense, int64_t log2_table) {
  INSTSIM_CHECK_INPUT(x);
  INSTSIM_CHECK_INPUT(table);
  check_levels(res, offsets, dense);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3, "x must be (N, 3)");
  TORCH_CHECK(table.dim() == 2 && x.scalar_type() == table.scalar_type(), "table must be (F, S) of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const int n_levels = static_cast<int>(res.numel());
  const int n_feat = static_cast<int>(table.size(0));
  auto out = at::empty({n, n_levels * n_feat}, x.options());
  if (n == 0) return out;
  const uint32_t mask = static_cast<uint32_t>((int64_t(1) << log2_table) - 1);
  const dim3 grid(blocks_for(n), n_levels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward", [&] {
    INSTSIM_DISPATCH_FEATURES(n_feat, [&] {
      hash_forward_kernel<scalar_t, F><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), res.data_ptr<int>(), offsets.data_ptr<int64_t>(),
          dense.data_ptr<uint8_t>(), n, n_levels, table.size(1), mask, out.data_ptr<scalar_t>());
    });
  });
  INSTSIM_CHECK_LAUNCH();
  return out;
}

std::vector<at::Tensor> hash_encode_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& table,
                                             const at::Tensor& res, const at::Tensor& offsets,
                                             const at::Tensor& dense, int64_t log2_table, bool need_table,
                                             bool need_x) {
  INSTSIM_CHECK_INPUT(grad_out);
  INSTSIM_CHECK_INPUT(x);
  INSTSIM_CHECK_INPUT(table);
  check_levels(res, offsets, dense);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const int n_levels = static_cast<int>(res.numel());
  const int n_feat = static_cast<int>(table.size(0));
  at::Tensor grad_table = need_table ? at::zeros_like(table) : at::Tensor();
  at::Tensor grad_x = need_x ? at::zeros_like(x) : at::Tensor();
  if (n == 0 || (!need_table && !need_x)) return {grad_table, grad_x};
  const uint32_t mask = static_cast<uint32_t>((int64_t(1) << log2_table) - 1);
  const dim3 grid(blocks_for(n), n_levels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward", [&] {
    INSTSIM_DISPATCH_FEATURES(n_feat, [&] {
      hash_backward_kernel<scalar_t, F><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), res.data_ptr<int>(),
          offsets.data_ptr<int64_t>(), dense.data_ptr<uint8_t>(), n, n_levels, table.size(1), mask,
          need_table ? grad_table.data_ptr<scalar_t>() : nullptr, need_x ? grad_x.data_ptr<scalar_t>() : nullptr);
    });
  });
  INSTSIM_CHECK_LAUNCH();
  return {grad_table, grad_x};
}

}  // namespace instsim
