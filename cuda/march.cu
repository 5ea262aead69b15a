// Ray marching through the occupancy grid, for training (all samples of a batch, packed) and for inference
// (a few samples per alive ray per call, see composite.cu for the matching compositing step).
//
// Samples sit on the same lattice as the PyTorch path (instsim/nerf/rendering.py: march): t_k = (k + u) dt
// from the ray origin, k between the entry and exit of the occupied box, kept where the point lies in the
// cube [-1, 1]^3 and its fine occupancy cell is occupied. Empty cells are skipped in one jump: from a point
// in an empty cell straight to the first lattice point past the cell's exit (a DDA), so both backends choose
// the same sample set (up to float rounding at cell boundaries). Rays are (R, 3) float32 in NeRF units with
// unit directions; `occ` is the (G^3,) uint8 occupancy in the grid's (i * G + j) * G + k order.
#include "common.h"

namespace instsim {
namespace {

struct Ray {
  float o[3];
  float d[3];
  float u;
};

__device__ __forceinline__ Ray load_ray(const float* o, const float* d, const float* u, int64_t r) {
  Ray ray;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    ray.o[a] = o[3 * r + a];
    ray.d[a] = d[3 * r + a];
  }
  ray.u = u[r];
  return ray;
}

// lattice indices [k_lo, k_hi] of the ray's samples inside the box [lo, hi] (slab method, as ray_box in
// rendering.py: near >= 0, a direction component under 1e-9 in magnitude counts as +1e-9)
__device__ __forceinline__ void lattice_range(const Ray& ray, const float* bbox, float dt, int* k_lo, int* k_hi) {
  float far = 3.0e38f, tmin = -3.0e38f;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const float da = fabsf(ray.d[a]) < 1e-9f ? 1e-9f : ray.d[a];
    const float inv = 1.0f / da;
    const float t0 = (bbox[a] - ray.o[a]) * inv;
    const float t1 = (bbox[3 + a] - ray.o[a]) * inv;
    tmin = fmaxf(tmin, fminf(t0, t1));
    far = fminf(far, fmaxf(t0, t1));
  }
  const float near = fmaxf(tmin, 0.0f);
  *k_lo = static_cast<int>(ceilf(near / dt - ray.u));
  *k_hi = static_cast<int>(floorf(far / dt - ray.u));
}

// the first lattice index >= k whose point is in an occupied cell, or a value > k_hi when there is none
__device__ __forceinline__ int next_occupied(const Ray& ray, int k, int k_hi, float dt, const uint8_t* occ, int grid) {
  const float cell = 2.0f / grid;
  while (k <= k_hi) {
    const float t = (k + ray.u) * dt;
    float p[3];
    bool inside = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      p[a] = ray.o[a] + t * ray.d[a];
      inside = inside && fabsf(p[a]) <= 1.0f;
    }
    if (!inside) {
      ++k;
      continue;
    }
    int ijk[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) ijk[a] = min(max(static_cast<int>(floorf((p[a] + 1.0f) * (0.5f * grid))), 0), grid - 1);
    if (occ[(ijk[0] * grid + ijk[1]) * grid + ijk[2]]) return k;
    float t_exit = 3.0e38f;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      if (fabsf(ray.d[a]) < 1e-9f) continue;
      const float wall = (ray.d[a] > 0.0f ? ijk[a] + 1 : ijk[a]) * cell - 1.0f;
      t_exit = fminf(t_exit, (wall - ray.o[a]) / ray.d[a]);
    }
    // a little short of the wall: a point just past it must never be skipped (one extra test costs little)
    const int k_next = static_cast<int>(ceilf(t_exit / dt - ray.u - 1e-3f));
    k = max(k + 1, k_next);
  }
  return k;
}

template <bool kWrite>
__global__ void march_train_kernel(const float* __restrict__ o, const float* __restrict__ d,
                                   const float* __restrict__ u, const float* __restrict__ bbox,
                                   const uint8_t* __restrict__ occ, int grid, float dt, int max_samples, int64_t n_rays,
                                   int* __restrict__ counts, const int64_t* __restrict__ starts,
                                   int64_t* __restrict__ ray_out, float* __restrict__ t_out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  const Ray ray = load_ray(o, d, u, r);
  int k, k_hi;
  lattice_range(ray, bbox, dt, &k, &k_hi);
  int n = 0;
  while (n < max_samples) {
    k = next_occupied(ray, k, k_hi, dt, occ, grid);
    if (k > k_hi) break;
    if (kWrite) {
      ray_out[starts[r] + n] = r;
      t_out[starts[r] + n] = (k + ray.u) * dt;
    }
    ++n;
    ++k;
  }
  if (!kWrite) counts[r] = n;
}

__global__ void march_init_kernel(const float* __restrict__ o, const float* __restrict__ d,
                                  const float* __restrict__ u, const float* __restrict__ bbox, float dt, int64_t n_rays,
                                  int* __restrict__ k_cur, int* __restrict__ k_hi) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  lattice_range(load_ray(o, d, u, r), bbox, dt, k_cur + r, k_hi + r);
}

__global__ void march_step_kernel(const float* __restrict__ o, const float* __restrict__ d,
                                  const float* __restrict__ u, const int64_t* __restrict__ alive, int64_t n_alive,
                                  int* __restrict__ k_cur, const int* __restrict__ k_hi, int* __restrict__ n_done,
                                  const uint8_t* __restrict__ occ, int grid, float dt, int n_step, int max_samples,
                                  float* __restrict__ t_out) {
  const int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (a >= n_alive) return;
  const int64_t r = alive[a];
  const Ray ray = load_ray(o, d, u, r);
  int k = k_cur[r];
  int done = n_done[r];
  const int hi = k_hi[r];
  int s = 0;
  for (; s < n_step && done < max_samples; ++s) {
    k = next_occupied(ray, k, hi, dt, occ, grid);
    if (k > hi) break;
    t_out[a * n_step + s] = (k + ray.u) * dt;
    ++k;
    ++done;
  }
  for (; s < n_step; ++s) t_out[a * n_step + s] = -1.0f;  // no sample: the compositing step stops here
  // a ray whose march is over is marked by k_cur > k_hi
  k_cur[r] = (done >= max_samples) ? k_hi[r] + 1 : k;
  n_done[r] = done;
}

// fixed-capacity version for the training step (no host sync: the sample buffer has a static size, so the
// step can be captured as a CUDA graph): rays r >= n_active[0] get no samples; each other ray counts its
// samples, reserves that many contiguous slots with one atomicAdd on `total`, and writes them there. A ray
// whose slots would pass `capacity` gets none and is marked in `dropped` (the caller leaves it out of the
// loss); `total` ends as the number of slots asked for, so the caller can grow the buffer.
__global__ void march_fixed_kernel(const float* __restrict__ o, const float* __restrict__ d,
                                   const float* __restrict__ u, const float* __restrict__ bbox,
                                   const uint8_t* __restrict__ occ, int grid, float dt, int max_samples, int64_t n_rays,
                                   const int* __restrict__ n_active, int64_t capacity, int* __restrict__ total,
                                   int64_t* __restrict__ starts, int* __restrict__ counts,
                                   uint8_t* __restrict__ dropped, int64_t* __restrict__ ray_out,
                                   float* __restrict__ t_out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n_rays) return;
  starts[r] = 0;
  counts[r] = 0;
  dropped[r] = 0;
  if (r >= n_active[0]) return;
  const Ray ray = load_ray(o, d, u, r);
  int k_lo, k_hi;
  lattice_range(ray, bbox, dt, &k_lo, &k_hi);
  int n = 0;
  for (int k = k_lo; n < max_samples; ++k, ++n) {
    k = next_occupied(ray, k, k_hi, dt, occ, grid);
    if (k > k_hi) break;
  }
  if (n == 0) return;
  const int64_t base = atomicAdd(total, n);
  if (base + n > capacity) {
    dropped[r] = 1;
    return;
  }
  starts[r] = base;
  counts[r] = n;
  int k = k_lo;
  for (int s = 0; s < n; ++s, ++k) {
    k = next_occupied(ray, k, k_hi, dt, occ, grid);
    ray_out[base + s] = r;
    t_out[base + s] = (k + ray.u) * dt;
  }
}

void check_rays(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u, const at::Tensor& bbox) {
  INSTSIM_CHECK_INPUT(o);
  INSTSIM_CHECK_INPUT(d);
  INSTSIM_CHECK_INPUT(u);
  INSTSIM_CHECK_INPUT(bbox);
  TORCH_CHECK(o.scalar_type() == at::kFloat && d.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat &&
                  bbox.scalar_type() == at::kFloat,
              "march kernels take float32 rays, jitter and box");
  TORCH_CHECK(o.dim() == 2 && o.size(1) == 3 && d.sizes() == o.sizes() && u.numel() == o.size(0),
              "rays must be (R, 3) with one jitter per ray");
  TORCH_CHECK(bbox.numel() == 6, "bbox must be (2, 3)");
}

}  // namespace

std::vector<at::Tensor> march_train(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u,
                                    const at::Tensor& bbox, const at::Tensor& occ, int64_t grid, double dt,
                                    int64_t max_samples) {
  check_rays(o, d, u, bbox);
  INSTSIM_CHECK_INPUT(occ);
  TORCH_CHECK(occ.scalar_type() == at::kByte && occ.numel() == grid * grid * grid, "occ must be (G^3,) uint8");
  const c10::cuda::CUDAGuard guard(o.device());
  const int64_t n = o.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto counts = at::zeros({n}, o.options().dtype(at::kInt));
  if (n > 0) {
    march_train_kernel<false><<<blocks_for(n), kThreads, 0, stream>>>(
        o.data_ptr<float>(), d.data_ptr<float>(), u.data_ptr<float>(), bbox.data_ptr<float>(), occ.data_ptr<uint8_t>(),
        static_cast<int>(grid), static_cast<float>(dt), static_cast<int>(max_samples), n, counts.data_ptr<int>(),
        nullptr, nullptr, nullptr);
    INSTSIM_CHECK_LAUNCH();
  }
  auto counts64 = counts.to(at::kLong);
  auto starts = at::cumsum(counts64, 0) - counts64;
  const int64_t total = n > 0 ? counts64.sum().item<int64_t>() : 0;  // one sync: the packed size
  auto ray = at::empty({total}, o.options().dtype(at::kLong));
  auto t = at::empty({total}, o.options());
  if (total > 0) {
    march_train_kernel<true><<<blocks_for(n), kThreads, 0, stream>>>(
        o.data_ptr<float>(), d.data_ptr<float>(), u.data_ptr<float>(), bbox.data_ptr<float>(), occ.data_ptr<uint8_t>(),
        static_cast<int>(grid), static_cast<float>(dt), static_cast<int>(max_samples), n, nullptr,
        starts.data_ptr<int64_t>(), ray.data_ptr<int64_t>(), t.data_ptr<float>());
    INSTSIM_CHECK_LAUNCH();
  }
  return {ray, t, starts, counts};
}

void march_fixed(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u, const at::Tensor& bbox,
                 const at::Tensor& occ, int64_t grid, double dt, int64_t max_samples, const at::Tensor& n_active,
                 at::Tensor total, at::Tensor starts, at::Tensor counts, at::Tensor dropped, at::Tensor ray,
                 at::Tensor t) {
  check_rays(o, d, u, bbox);
  check_inputs("march_fixed", occ, n_active, total, starts, counts, dropped, ray, t);
  TORCH_CHECK(occ.scalar_type() == at::kByte && occ.numel() == grid * grid * grid, "occ must be (G^3,) uint8");
  TORCH_CHECK(n_active.scalar_type() == at::kInt && total.scalar_type() == at::kInt && total.numel() == 1,
              "n_active and total must be int32 scalars");
  const int64_t n = o.size(0);
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.numel() == n && counts.scalar_type() == at::kInt &&
                  counts.numel() == n && dropped.scalar_type() == at::kByte && dropped.numel() == n,
              "starts (R,) int64, counts (R,) int32 and dropped (R,) uint8");
  TORCH_CHECK(ray.scalar_type() == at::kLong && t.scalar_type() == at::kFloat && ray.numel() == t.numel(),
              "ray (M,) int64 and t (M,) float32");
  const c10::cuda::CUDAGuard guard(o.device());
  if (n == 0) return;
  march_fixed_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      o.data_ptr<float>(), d.data_ptr<float>(), u.data_ptr<float>(), bbox.data_ptr<float>(), occ.data_ptr<uint8_t>(),
      static_cast<int>(grid), static_cast<float>(dt), static_cast<int>(max_samples), n, n_active.data_ptr<int>(),
      ray.numel(), total.data_ptr<int>(), starts.data_ptr<int64_t>(), counts.data_ptr<int>(),
      dropped.data_ptr<uint8_t>(), ray.data_ptr<int64_t>(), t.data_ptr<float>());
  INSTSIM_CHECK_LAUNCH();
}

std::vector<at::Tensor> march_init(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u,
                                   const at::Tensor& bbox, double dt) {
  check_rays(o, d, u, bbox);
  const c10::cuda::CUDAGuard guard(o.device());
  const int64_t n = o.size(0);
  auto k_cur = at::empty({n}, o.options().dtype(at::kInt));
  auto k_hi = at::empty({n}, o.options().dtype(at::kInt));
  if (n > 0) {
    march_init_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        o.data_ptr<float>(), d.data_ptr<float>(), u.data_ptr<float>(), bbox.data_ptr<float>(),
        static_cast<float>(dt), n, k_cur.data_ptr<int>(), k_hi.data_ptr<int>());
    INSTSIM_CHECK_LAUNCH();
  }
  return {k_cur, k_hi};
}

at::Tensor march_step(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u, const at::Tensor& alive,
                      at::Tensor k_cur, const at::Tensor& k_hi, at::Tensor n_done, const at::Tensor& occ, int64_t grid,
                      double dt, int64_t n_step, int64_t max_samples) {
  INSTSIM_CHECK_INPUT(alive);
  INSTSIM_CHECK_INPUT(k_cur);
  INSTSIM_CHECK_INPUT(k_hi);
  INSTSIM_CHECK_INPUT(n_done);
  INSTSIM_CHECK_INPUT(occ);
  TORCH_CHECK(alive.scalar_type() == at::kLong, "alive must be int64 ray indices");
  const c10::cuda::CUDAGuard guard(o.device());
  const int64_t n_alive = alive.numel();
  auto t = at::empty({n_alive, n_step}, o.options());
  if (n_alive > 0) {
    march_step_kernel<<<blocks_for(n_alive), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        o.data_ptr<float>(), d.data_ptr<float>(), u.data_ptr<float>(), alive.data_ptr<int64_t>(), n_alive,
        k_cur.data_ptr<int>(), k_hi.data_ptr<int>(), n_done.data_ptr<int>(), occ.data_ptr<uint8_t>(),
        static_cast<int>(grid), static_cast<float>(dt), static_cast<int>(n_step), static_cast<int>(max_samples),
        t.data_ptr<float>());
    INSTSIM_CHECK_LAUNCH();
  }
  return t;
}

}  // namespace instsim
