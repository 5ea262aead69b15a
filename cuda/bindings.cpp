// Python bindings of instsim's kernels; instsim/nerf/cuda_ops.py wraps them in autograd Functions.
#include <torch/extension.h>

#include <vector>

namespace instsim {
at::Tensor hash_encode_forward(const at::Tensor& x, const at::Tensor& table, const at::Tensor& res,
                               const at::Tensor& offsets, const at::Tensor& dense, int64_t log2_table);
std::vector<at::Tensor> hash_encode_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& table,
                                             const at::Tensor& res, const at::Tensor& offsets,
                                             const at::Tensor& dense, int64_t log2_table, bool need_table,
                                             bool need_x);
void hash_table_half2(const at::Tensor& table, at::Tensor out);
at::Tensor hash_encode_forward_h2(const at::Tensor& x, const at::Tensor& table_h2, const at::Tensor& res,
                                  const at::Tensor& offsets, const at::Tensor& dense, int64_t log2_table);
at::Tensor hash_encode_backward_f2(const at::Tensor& grad_out, const at::Tensor& x, int64_t table_size,
                                   const at::Tensor& res, const at::Tensor& offsets, const at::Tensor& dense,
                                   int64_t log2_table);
at::Tensor sh_encode_forward(const at::Tensor& d);
at::Tensor sh_encode_backward(const at::Tensor& grad_out, const at::Tensor& d);
std::vector<at::Tensor> march_train(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u,
                                    const at::Tensor& bbox, const at::Tensor& occ, int64_t grid, double dt,
                                    int64_t max_samples);
std::vector<at::Tensor> march_init(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u,
                                   const at::Tensor& bbox, double dt);
void march_fixed(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u, const at::Tensor& bbox,
                 const at::Tensor& occ, int64_t grid, double dt, int64_t max_samples, const at::Tensor& n_active,
                 at::Tensor total, at::Tensor starts, at::Tensor counts, at::Tensor dropped, at::Tensor ray,
                 at::Tensor t);
void compact_samples(const at::Tensor& sigma, const at::Tensor& t_in, const at::Tensor& starts_in,
                     const at::Tensor& counts_in, double dt, double min_transmittance, at::Tensor total,
                     at::Tensor starts, at::Tensor counts, at::Tensor dropped, at::Tensor ray, at::Tensor t);
at::Tensor march_step(const at::Tensor& o, const at::Tensor& d, const at::Tensor& u, const at::Tensor& alive,
                      at::Tensor k_cur, const at::Tensor& k_hi, at::Tensor n_done, const at::Tensor& occ, int64_t grid,
                      double dt, int64_t n_step, int64_t max_samples);
std::vector<at::Tensor> composite_forward(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& t,
                                          const at::Tensor& starts, const at::Tensor& counts, double dt,
                                          double min_transmittance);
std::vector<at::Tensor> composite_backward(const at::Tensor& grad_rgb, const at::Tensor& grad_opacity,
                                           const at::Tensor& grad_depth, const at::Tensor& sigma, const at::Tensor& rgb,
                                           const at::Tensor& t, const at::Tensor& starts, const at::Tensor& n_used,
                                           const at::Tensor& out_rgb, const at::Tensor& out_opacity,
                                           const at::Tensor& out_depth, double dt);
at::Tensor composite_step(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& t, const at::Tensor& alive,
                          double dt, double min_transmittance, const at::Tensor& k_cur, const at::Tensor& k_hi,
                          at::Tensor acc_rgb, at::Tensor acc_opacity, at::Tensor acc_depth, at::Tensor trans);
}  // namespace instsim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "instsim CUDA kernels: hash grid, spherical harmonics, ray marching, compositing";
  m.def("hash_encode_forward", &instsim::hash_encode_forward);
  m.def("hash_encode_backward", &instsim::hash_encode_backward);
  m.def("hash_table_half2", &instsim::hash_table_half2);
  m.def("hash_encode_forward_h2", &instsim::hash_encode_forward_h2);
  m.def("hash_encode_backward_f2", &instsim::hash_encode_backward_f2);
  m.def("sh_encode_forward", &instsim::sh_encode_forward);
  m.def("sh_encode_backward", &instsim::sh_encode_backward);
  m.def("march_train", &instsim::march_train);
  m.def("march_init", &instsim::march_init);
  m.def("march_step", &instsim::march_step);
  m.def("march_fixed", &instsim::march_fixed);
  m.def("compact_samples", &instsim::compact_samples);
  m.def("composite_forward", &instsim::composite_forward);
  m.def("composite_backward", &instsim::composite_backward);
  m.def("composite_step", &instsim::composite_step);
}
