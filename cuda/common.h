// Shared helpers of instsim's CUDA kernels: argument checks and launch geometry.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#define INSTSIM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define INSTSIM_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define INSTSIM_CHECK_INPUT(x) \
  INSTSIM_CHECK_CUDA(x);       \
  INSTSIM_CHECK_CONTIGUOUS(x)
// a kernel launch error surfaces at the call that caused it, not at some later synchronisation
#define INSTSIM_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace instsim {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>((n + threads - 1) / threads);
}

}  // namespace instsim

namespace instsim {

// for kernels with many tensor arguments: each must be a contiguous CUDA tensor
template <typename... Tensors>
void check_inputs(const char* fn, const Tensors&... xs) {
  const bool ok = ((xs.is_cuda() && xs.is_contiguous()) && ...);
  TORCH_CHECK(ok, fn, ": every tensor argument must be a contiguous CUDA tensor");
}

}  // namespace instsim
