// Runtime flags -> template parameters (host code; no torch headers, usable from .cu files).
//
//   bool_switch(sound, [&](auto kSound) { kernel<T, decltype(kSound)::value>(...); });
//
// lets the compiler drop the branches of a flag from the inner loop of each instantiation.
#pragma once

#include <type_traits>

namespace robustkern {

template <typename F>
inline void bool_switch(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The flags of an interval epilogue (BoxEpilogue in interval_math.h) as template parameters:
//   epilogue_switch(p, [&](auto sound, auto gemm, auto add_bias, auto affine, auto relu) { ... });
// calls the body with std::bool_constant arguments for every combination that occurs: after a GEMM (gemm,
// with or without a bias term) or as interval_affine (no GEMM, no bias; affine or ReLU, never neither).
// The CPU and CUDA files share it so that their instantiations cannot drift apart.
template <typename P, typename F>
inline void epilogue_switch(const P& p, F&& f) {
  bool_switch(p.sound, [&](auto sound) {
    bool_switch(p.affine, [&](auto affine) {
      bool_switch(p.relu, [&](auto relu) {
        if (p.gemm) {
          bool_switch(p.add_bias, [&](auto add_bias) { f(sound, std::true_type{}, add_bias, affine, relu); });
        } else if constexpr (std::decay_t<decltype(affine)>::value || std::decay_t<decltype(relu)>::value) {
          f(sound, std::false_type{}, std::false_type{}, affine, relu);
        }
      });
    });
  });
}

}  // namespace robustkern
