// Dispatch over (feature dtype, bank dtype) pairs. The bank is either stored in the
// features' dtype or in a 16-bit type (half the bytes); arithmetic runs in acc_t,
// which is double for double features and float otherwise.
#pragma once
#include <ATen/ATen.h>
#include <type_traits>

namespace npid {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t, typename Fn>
void dispatch_bank(at::ScalarType bank_type, const char* op, Fn&& fn) {
  if (bank_type == c10::CppTypeToScalarType<scalar_t>::value) {
    fn(scalar_t{}, scalar_t{});
  } else if (bank_type == at::kBFloat16) {
    fn(scalar_t{}, at::BFloat16{});
  } else if (bank_type == at::kHalf) {
    fn(scalar_t{}, at::Half{});
  } else {
    TORCH_CHECK(false, op, ": unsupported bank dtype ", bank_type);
  }
}

// fn(scalar_t{}, bank_t{}) with scalar_t the features' type.
template <typename Fn>
void dispatch_features_bank(at::ScalarType x_type, at::ScalarType bank_type, const char* op,
                            Fn&& fn) {
  switch (x_type) {
    case at::kFloat: dispatch_bank<float>(bank_type, op, fn); break;
    case at::kDouble: dispatch_bank<double>(bank_type, op, fn); break;
    case at::kBFloat16: dispatch_bank<at::BFloat16>(bank_type, op, fn); break;
    default: TORCH_CHECK(false, op, ": unsupported feature dtype ", x_type);
  }
}

}  // namespace npid
