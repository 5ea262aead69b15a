// Degree-4 real spherical harmonics (16 coefficients) of unit directions, forward and backward (gradient with
// respect to the direction, which the pose gradient needs). Same constants and signs as tcnn and the PyTorch
// path (instsim/nerf/encoding.py: sh_encode). d (N, 3) -> out (N, 16).
#include "common.h"

namespace instsim {
namespace {

// the constants of instsim.nerf.encoding.sh_encode
#define C0 0.28209479177387814
#define C1 0.48860251190291987
#define C2A 1.0925484305920792
#define C2B 0.94617469575755997
#define C2C 0.31539156525251999
#define C2D 0.54627421529603959
#define C3A 0.59004358992664352
#define C3B 2.8906114426405538
#define C3C 0.45704579946446572
#define C3D 0.3731763325901154
#define C3E 1.4453057213202769

template <typename scalar_t>
__global__ void sh_forward_kernel(const scalar_t* __restrict__ d, int64_t n, scalar_t* __restrict__ out) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  const scalar_t x = d[3 * p], y = d[3 * p + 1], z = d[3 * p + 2];
  const scalar_t xy = x * y, xz = x * z, yz = y * z, x2 = x * x, y2 = y * y, z2 = z * z;
  scalar_t* o = out + 16 * p;
  o[0] = scalar_t(C0);
  o[1] = scalar_t(-C1) * y;
  o[2] = scalar_t(C1) * z;
  o[3] = scalar_t(-C1) * x;
  o[4] = scalar_t(C2A) * xy;
  o[5] = scalar_t(-C2A) * yz;
  o[6] = scalar_t(C2B) * z2 - scalar_t(C2C);
  o[7] = scalar_t(-C2A) * xz;
  o[8] = scalar_t(C2D) * (x2 - y2);
  o[9] = scalar_t(C3A) * y * (scalar_t(-3) * x2 + y2);
  o[10] = scalar_t(C3B) * xy * z;
  o[11] = scalar_t(C3C) * y * (scalar_t(1) - scalar_t(5) * z2);
  o[12] = scalar_t(C3D) * z * (scalar_t(5) * z2 - scalar_t(3));
  o[13] = scalar_t(C3C) * x * (scalar_t(1) - scalar_t(5) * z2);
  o[14] = scalar_t(C3E) * z * (x2 - y2);
  o[15] = scalar_t(C3A) * x * (-x2 + scalar_t(3) * y2);
}

template <typename scalar_t>
__global__ void sh_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ d, int64_t n,
                                   scalar_t* __restrict__ grad_d) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  const scalar_t x = d[3 * p], y = d[3 * p + 1], z = d[3 * p + 2];
  const scalar_t* g = grad_out + 16 * p;
  const scalar_t x2 = x * x, y2 = y * y, z2 = z * z;
  // d(coefficient k)/d(x, y, z), coefficient by coefficient (k = 0 is constant)
  scalar_t gx = scalar_t(-C1) * g[3], gy = scalar_t(-C1) * g[1], gz = scalar_t(C1) * g[2];
  gx += scalar_t(C2A) * y * g[4];
  gy += scalar_t(C2A) * x * g[4];
  gy += scalar_t(-C2A) * z * g[5];
  gz += scalar_t(-C2A) * y * g[5];
  gz += scalar_t(2 * C2B) * z * g[6];
  gx += scalar_t(-C2A) * z * g[7];
  gz += scalar_t(-C2A) * x * g[7];
  gx += scalar_t(2 * C2D) * x * g[8];
  gy += scalar_t(-2 * C2D) * y * g[8];
  gx += scalar_t(-6 * C3A) * x * y * g[9];
  gy += scalar_t(3 * C3A) * (y2 - x2) * g[9];
  gx += scalar_t(C3B) * y * z * g[10];
  gy += scalar_t(C3B) * x * z * g[10];
  gz += scalar_t(C3B) * x * y * g[10];
  gy += scalar_t(C3C) * (scalar_t(1) - scalar_t(5) * z2) * g[11];
  gz += scalar_t(-10 * C3C) * y * z * g[11];
  gz += scalar_t(C3D) * (scalar_t(15) * z2 - scalar_t(3)) * g[12];
  gx += scalar_t(C3C) * (scalar_t(1) - scalar_t(5) * z2) * g[13];
  gz += scalar_t(-10 * C3C) * x * z * g[13];
  gx += scalar_t(2 * C3E) * x * z * g[14];
  gy += scalar_t(-2 * C3E) * y * z * g[14];
  gz += scalar_t(C3E) * (x2 - y2) * g[14];
  gx += scalar_t(3 * C3A) * (y2 - x2) * g[15];
  gy += scalar_t(6 * C3A) * x * y * g[15];
  grad_d[3 * p] = gx;
  grad_d[3 * p + 1] = gy;
  grad_d[3 * p + 2] = gz;
}

}  // namespace

at::Tensor sh_encode_forward(const at::Tensor& d) {
  INSTSIM_CHECK_INPUT(d);
  TORCH_CHECK(d.dim() == 2 && d.size(1) == 3, "directions must be (N, 3)");
  const c10::cuda::CUDAGuard guard(d.device());
  const int64_t n = d.size(0);
  auto out = at::empty({n, 16}, d.options());
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sh_encode_forward", [&] {
    sh_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(d.data_ptr<scalar_t>(), n,
                                                                         out.data_ptr<scalar_t>());
  });
  INSTSIM_CHECK_LAUNCH();
  return out;
}

at::Tensor sh_encode_backward(const at::Tensor& grad_out, const at::Tensor& d) {
  INSTSIM_CHECK_INPUT(grad_out);
  INSTSIM_CHECK_INPUT(d);
  const c10::cuda::CUDAGuard guard(d.device());
  const int64_t n = d.size(0);
  auto grad_d = at::empty_like(d);
  if (n == 0) return grad_d;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sh_encode_backward", [&] {
    sh_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), n, grad_d.data_ptr<scalar_t>());
  });
  INSTSIM_CHECK_LAUNCH();
  return grad_d;
}

}  // namespace instsim
