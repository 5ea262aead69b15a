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
