// Front-to-back alpha compositing with early termination, forward and backward.
//
// Per ray, over its samples in order: tau_i = sigma_i dt, alpha_i = 1 - exp(-tau_i), T_i = prod_{j<i} (1 -
// alpha_j), w_i = T_i alpha_i; colour C = sum w_i c_i, opacity O = sum w_i, depth D = sum w_i t_i. A sample
// counts while the transmittance before it is above min_transmittance (the PyTorch path's rule), so a ray
// stops once it is opaque.
//
// The backward gives d/d(sigma) and d/d(rgb); the sample positions reach the network, and through it the ray
// origins and directions, because the caller builds them in autograd as o + t d with t held fixed. With
// dL/dtau_i = g_C . (T_{i+1} c_i - (C - C_<=i)) + g_O (T_{i+1} - (O - O_<=i)) + g_D (T_{i+1} t_i - (D - D_<=i))
// (each later weight w_j carries exp(-tau_i)), one pass per ray over the forward's outputs is enough.
//
// Packed layout (training, and rendering with gradients): samples sorted by ray, ray r's samples at
// starts[r] .. starts[r] + counts[r] - 1; sigma (M,), rgb (M, 3), t (M,). Inference layout: (A, n_step)
// samples of the A alive rays, accumulated into per-ray state across calls.
#include "common.h"

namespace instsim {
namespace {

template <typename scalar_t>
__global__ void composite_forward_kernel(const scalar_t* __restrict__ sigma, const scalar_t* __restrict__ rgb,
                                         const scalar_t* __restrict__ t, const int64_t* __restrict__ starts,
                                         const int* __restrict__ counts, int64_t n_rays, scalar_t dt, scalar_t min_t,
                                         scalar_t* __restrict__ out_rgb, scalar_t* __restrict__ out_opacity,
                                         scalar_t* __restrict__ out_depth, int* __restrict__ n_used) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  const int64_t s0 = starts[r];
  const int count = counts[r];
  scalar_t T = 1, cr = 0, cg = 0, cb = 0, op = 0, dep = 0;
  int n = 0;
  for (; n < count && T > min_t; ++n) {
    const int64_t i = s0 + n;
    const scalar_t decay = exp(-sigma[i] * dt);
    const scalar_t w = T * (scalar_t(1) - decay);
    cr += w * rgb[3 * i];
    cg += w * rgb[3 * i + 1];
    cb += w * rgb[3 * i + 2];
    op += w;
    dep += w * t[i];
    T *= decay;
  }
  out_rgb[3 * r] = cr;
  out_rgb[3 * r + 1] = cg;
  out_rgb[3 * r + 2] = cb;
  out_opacity[r] = op;
  out_depth[r] = dep;
  n_used[r] = n;
}

template <typename scalar_t>
__global__ void composite_backward_kernel(const scalar_t* __restrict__ grad_rgb, const scalar_t* __restrict__ grad_opacity,
                                          const scalar_t* __restrict__ grad_depth, const scalar_t* __restrict__ sigma,
                                          const scalar_t* __restrict__ rgb, const scalar_t* __restrict__ t,
                                          const int64_t* __restrict__ starts, const int* __restrict__ n_used,
                                          const scalar_t* __restrict__ out_rgb, const scalar_t* __restrict__ out_opacity,
                                          const scalar_t* __restrict__ out_depth, int64_t n_rays, scalar_t dt,
                                          scalar_t* __restrict__ grad_sigma, scalar_t* __restrict__ grad_rgb_s) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  const int64_t s0 = starts[r];
  const int count = n_used[r];
  const scalar_t gr = grad_rgb[3 * r], gg = grad_rgb[3 * r + 1], gb = grad_rgb[3 * r + 2];
  const scalar_t go = grad_opacity[r], gd = grad_depth[r];
  const scalar_t Cr = out_rgb[3 * r], Cg = out_rgb[3 * r + 1], Cb = out_rgb[3 * r + 2];
  const scalar_t O = out_opacity[r], D = out_depth[r];
  scalar_t T = 1, cr = 0, cg = 0, cb = 0, op = 0, dep = 0;
  for (int n = 0; n < count; ++n) {
    const int64_t i = s0 + n;
    const scalar_t decay = exp(-sigma[i] * dt);
    const scalar_t w = T * (scalar_t(1) - decay);
    const scalar_t ri = rgb[3 * i], gi = rgb[3 * i + 1], bi = rgb[3 * i + 2], ti = t[i];
    cr += w * ri;
    cg += w * gi;
    cb += w * bi;
    op += w;
    dep += w * ti;
    const scalar_t T_next = T * decay;
    const scalar_t dtau = gr * (T_next * ri - (Cr - cr)) + gg * (T_next * gi - (Cg - cg)) +
                          gb * (T_next * bi - (Cb - cb)) + go * (T_next - (O - op)) + gd * (T_next * ti - (D - dep));
    grad_sigma[i] = dtau * dt;
    grad_rgb_s[3 * i] = w * gr;
    grad_rgb_s[3 * i + 1] = w * gg;
    grad_rgb_s[3 * i + 2] = w * gb;
    T = T_next;
  }
}

// one call of the inference loop: composite each alive ray's next n_step samples (t < 0 = no sample) into its
// running colour/opacity/depth/transmittance, and say which rays go on
__global__ void composite_step_kernel(const float* __restrict__ sigma, const float* __restrict__ rgb,
                                      const float* __restrict__ t, const int64_t* __restrict__ alive, int64_t n_alive,
                                      int n_step, float dt, float min_t, const int* __restrict__ k_cur,
                                      const int* __restrict__ k_hi, float* __restrict__ acc_rgb,
                                      float* __restrict__ acc_opacity, float* __restrict__ acc_depth,
                                      float* __restrict__ trans, bool* __restrict__ keep) {
  const int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (a >= n_alive) return;
  const int64_t r = alive[a];
  float T = trans[r], cr = 0, cg = 0, cb = 0, op = 0, dep = 0;
  for (int s = 0; s < n_step && T > min_t; ++s) {
    const int64_t i = a * n_step + s;
    const float ti = t[i];
    if (ti < 0.0f) break;
    const float decay = __expf(-sigma[i] * dt);
    const float w = T * (1.0f - decay);
    cr += w * rgb[3 * i];
    cg += w * rgb[3 * i + 1];
    cb += w * rgb[3 * i + 2];
    op += w;
    dep += w * ti;
    T *= decay;
  }
  acc_rgb[3 * r] += cr;
  acc_rgb[3 * r + 1] += cg;
  acc_rgb[3 * r + 2] += cb;
  acc_opacity[r] += op;
  acc_depth[r] += dep;
  trans[r] = T;
  keep[a] = T > min_t && k_cur[r] <= k_hi[r];
}

// the training step's compaction (fixed capacity, no host sync): from a density pass without gradient over
// the marched samples, find where each ray terminates (the forward's rule: a sample counts while the
// transmittance before it is above min_t) and copy the samples before that point to a second buffer, each
// ray's contiguously, reserved with one atomicAdd on `total`. A ray that would pass `capacity` gets none and is
// marked in `dropped`; `total` ends as the number of slots asked for.
__global__ void compact_kernel(const float* __restrict__ sigma, const float* __restrict__ t_in,
                               const int64_t* __restrict__ starts_in, const int* __restrict__ counts_in,
                               int64_t n_rays, float dt, float min_t, int64_t capacity, int* __restrict__ total,
                               int64_t* __restrict__ starts, int* __restrict__ counts, uint8_t* __restrict__ dropped,
                               int64_t* __restrict__ ray_out, float* __restrict__ t_out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  starts[r] = 0;
  counts[r] = 0;
  const int64_t s0 = starts_in[r];
  const int count = counts_in[r];
  float T = 1.0f;
  int n = 0;
  for (; n < count && T > min_t; ++n) T *= expf(-sigma[s0 + n] * dt);
  if (n == 0) return;
  const int64_t base = atomicAdd(total, n);
  if (base + n > capacity) {
    dropped[r] = 1;
    return;
  }
  starts[r] = base;
  counts[r] = n;
  for (int i = 0; i < n; ++i) {
    ray_out[base + i] = r;
    t_out[base + i] = t_in[s0 + i];
  }
}

}  // namespace

void compact_samples(const at::Tensor& sigma, const at::Tensor& t_in, const at::Tensor& starts_in,
                     const at::Tensor& counts_in, double dt, double min_transmittance, at::Tensor total,
                     at::Tensor starts, at::Tensor counts, at::Tensor dropped, at::Tensor ray, at::Tensor t) {
  check_inputs("compact_samples", sigma, t_in, starts_in, counts_in, total, starts, counts, dropped, ray, t);
  TORCH_CHECK(sigma.scalar_type() == at::kFloat && t_in.scalar_type() == at::kFloat && t.scalar_type() == at::kFloat &&
                  sigma.numel() == t_in.numel(),
              "sigma and t (M,) float32");
  const int64_t n = starts_in.numel();
  TORCH_CHECK(starts_in.scalar_type() == at::kLong && counts_in.scalar_type() == at::kInt && counts_in.numel() == n &&
                  starts.scalar_type() == at::kLong && starts.numel() == n && counts.scalar_type() == at::kInt &&
                  counts.numel() == n && dropped.scalar_type() == at::kByte && dropped.numel() == n,
              "starts (R,) int64, counts (R,) int32, dropped (R,) uint8");
  TORCH_CHECK(total.scalar_type() == at::kInt && total.numel() == 1, "total must be an int32 scalar");
  TORCH_CHECK(ray.scalar_type() == at::kLong && ray.numel() == t.numel(), "ray (M2,) int64 and t (M2,) float32");
  const c10::cuda::CUDAGuard guard(sigma.device());
  if (n == 0) return;
  compact_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sigma.data_ptr<float>(), t_in.data_ptr<float>(), starts_in.data_ptr<int64_t>(), counts_in.data_ptr<int>(), n,
      static_cast<float>(dt), static_cast<float>(min_transmittance), ray.numel(), total.data_ptr<int>(),
      starts.data_ptr<int64_t>(), counts.data_ptr<int>(), dropped.data_ptr<uint8_t>(), ray.data_ptr<int64_t>(),
      t.data_ptr<float>());
  INSTSIM_CHECK_LAUNCH();
}

std::vector<at::Tensor> composite_forward(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& t,
                                          const at::Tensor& starts, const at::Tensor& counts, double dt,
                                          double min_transmittance) {
  INSTSIM_CHECK_INPUT(sigma);
  INSTSIM_CHECK_INPUT(rgb);
  INSTSIM_CHECK_INPUT(t);
  INSTSIM_CHECK_INPUT(starts);
  INSTSIM_CHECK_INPUT(counts);
  TORCH_CHECK(rgb.dim() == 2 && rgb.size(1) == 3 && rgb.size(0) == sigma.numel() && t.numel() == sigma.numel(),
              "sigma (M,), rgb (M, 3) and t (M,) must describe the same samples");
  TORCH_CHECK(rgb.scalar_type() == sigma.scalar_type() && t.scalar_type() == sigma.scalar_type(),
              "sigma, rgb and t must share a dtype");
  TORCH_CHECK(starts.scalar_type() == at::kLong && counts.scalar_type() == at::kInt, "starts int64, counts int32");
  const c10::cuda::CUDAGuard guard(sigma.device());
  const int64_t n = starts.numel();
  auto out_rgb = at::empty({n, 3}, sigma.options());
  auto out_opacity = at::empty({n}, sigma.options());
  auto out_depth = at::empty({n}, sigma.options());
  auto n_used = at::empty({n}, counts.options());
  if (n == 0) return {out_rgb, out_opacity, out_depth, n_used};
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_forward", [&] {
    composite_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sigma.data_ptr<scalar_t>(), rgb.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), starts.data_ptr<int64_t>(),
        counts.data_ptr<int>(), n, static_cast<scalar_t>(dt), static_cast<scalar_t>(min_transmittance),
        out_rgb.data_ptr<scalar_t>(), out_opacity.data_ptr<scalar_t>(), out_depth.data_ptr<scalar_t>(),
        n_used.data_ptr<int>());
  });
  INSTSIM_CHECK_LAUNCH();
  return {out_rgb, out_opacity, out_depth, n_used};
}

std::vector<at::Tensor> composite_backward(const at::Tensor& grad_rgb, const at::Tensor& grad_opacity,
                                           const at::Tensor& grad_depth, const at::Tensor& sigma, const at::Tensor& rgb,
                                           const at::Tensor& t, const at::Tensor& starts, const at::Tensor& n_used,
                                           const at::Tensor& out_rgb, const at::Tensor& out_opacity,
                                           const at::Tensor& out_depth, double dt) {
  check_inputs("composite_backward", grad_rgb, grad_opacity, grad_depth, sigma, rgb, t, starts, n_used, out_rgb,
               out_opacity, out_depth);
  const c10::cuda::CUDAGuard guard(sigma.device());
  const int64_t n = starts.numel();
  // samples past a ray's termination point had no effect: their gradient is zero
  auto grad_sigma = at::zeros_like(sigma);
  auto grad_rgb_s = at::zeros_like(rgb);
  if (n == 0) return {grad_sigma, grad_rgb_s};
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_backward", [&] {
    composite_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_rgb.data_ptr<scalar_t>(), grad_opacity.data_ptr<scalar_t>(), grad_depth.data_ptr<scalar_t>(),
        sigma.data_ptr<scalar_t>(), rgb.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), starts.data_ptr<int64_t>(),
        n_used.data_ptr<int>(), out_rgb.data_ptr<scalar_t>(), out_opacity.data_ptr<scalar_t>(),
        out_depth.data_ptr<scalar_t>(), n, static_cast<scalar_t>(dt), grad_sigma.data_ptr<scalar_t>(),
        grad_rgb_s.data_ptr<scalar_t>());
  });
  INSTSIM_CHECK_LAUNCH();
  return {grad_sigma, grad_rgb_s};
}

at::Tensor composite_step(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& t, const at::Tensor& alive,
                          double dt, double min_transmittance, const at::Tensor& k_cur, const at::Tensor& k_hi,
                          at::Tensor acc_rgb, at::Tensor acc_opacity, at::Tensor acc_depth, at::Tensor trans) {
  check_inputs("composite_step", sigma, rgb, t, alive, k_cur, k_hi, acc_rgb, acc_opacity, acc_depth, trans);
  TORCH_CHECK(sigma.scalar_type() == at::kFloat && rgb.scalar_type() == at::kFloat && acc_rgb.scalar_type() == at::kFloat,
              "the inference step composites float32");
  TORCH_CHECK(t.dim() == 2, "t must be (A, n_step)");
  const c10::cuda::CUDAGuard guard(sigma.device());
  const int64_t n_alive = t.size(0);
  const int n_step = static_cast<int>(t.size(1));
  auto keep = at::empty({n_alive}, alive.options().dtype(at::kBool));
  if (n_alive == 0) return keep;
  composite_step_kernel<<<blocks_for(n_alive), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sigma.data_ptr<float>(), rgb.data_ptr<float>(), t.data_ptr<float>(), alive.data_ptr<int64_t>(), n_alive, n_step,
      static_cast<float>(dt), static_cast<float>(min_transmittance), k_cur.data_ptr<int>(), k_hi.data_ptr<int>(),
      acc_rgb.data_ptr<float>(), acc_opacity.data_ptr<float>(), acc_depth.data_ptr<float>(), trans.data_ptr<float>(),
      keep.data_ptr<bool>());
  INSTSIM_CHECK_LAUNCH();
  return keep;
}

}  // namespace instsim
