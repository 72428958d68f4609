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

}  // namespace robustkern
