// Argument checks that name the op and the argument, e.g.
//   "interval_linear: weight has dtype Double but mid has dtype Float (they must match)".
// Failures raise c10::Error, a RuntimeError in Python. The macros stringify the argument; the functions
// behind them take the names explicitly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace robustkern {

inline void check_floating(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

// Same dtype and device as the reference argument.
inline void check_like(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type(), " (they must match)");
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(), " but ", ref_name, " is on ",
              ref.device(), " (they must match)");
}

inline void check_like(const char* op, const char* name, const std::optional<at::Tensor>& x,
                       const char* ref_name, const at::Tensor& ref) {
  if (x.has_value()) check_like(op, name, *x, ref_name, ref);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", x.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

inline void check_shape(const char* op, const char* name, const std::optional<at::Tensor>& x,
                        at::IntArrayRef shape) {
  if (x.has_value()) check_shape(op, name, *x, shape);
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(x.sizes() == ref.sizes(), op, ": ", name, " has shape ", x.sizes(), " but ", ref_name,
              " has shape ", ref.sizes(), " (they must match)");
}

inline void check_device_type(const char* op, const char* name, const at::Tensor& x, at::DeviceType type) {
  TORCH_CHECK(x.device().type() == type, op, ": ", name, " must be a ", type, " tensor, got one on ",
              x.device());
}

}  // namespace robustkern

#define CHECK_FLOATING(op, x) ::robustkern::check_floating(op, #x, x)
#define CHECK_LIKE(op, x, ref) ::robustkern::check_like(op, #x, x, #ref, ref)
#define CHECK_DIM(op, x, dim) ::robustkern::check_dim(op, #x, x, dim)
#define CHECK_SHAPE(op, x, ...) ::robustkern::check_shape(op, #x, x, {__VA_ARGS__})
#define CHECK_SAME_SHAPE(op, x, ref) ::robustkern::check_same_shape(op, #x, x, #ref, ref)
#define CHECK_DEVICE_TYPE(op, x, type) ::robustkern::check_device_type(op, #x, x, type)
