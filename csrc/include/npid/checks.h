// Argument validation shared by the CPU and CUDA implementations. Every message
// names the argument and says what was expected.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <cmath>
#include <cstdint>

namespace npid {

inline void check_features(const at::Tensor& x, const char* name, bool allow_bf16 = false) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (batch, dim), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || (allow_bf16 && dt == at::kBFloat16), name,
              " must be float32 or float64", allow_bf16 ? " or bfloat16" : "", ", got ", dt);
}

inline void check_bank(const at::Tensor& bank, const at::Tensor& x, const char* x_name = "x") {
  TORCH_CHECK(bank.dim() == 2, "bank must be 2-D (n_data, dim), got shape ", bank.sizes());
  TORCH_CHECK(bank.device() == x.device(), "bank is on ", bank.device(), " but ", x_name,
              " is on ", x.device());
  const auto dt = bank.scalar_type();
  TORCH_CHECK(dt == x.scalar_type() || dt == at::kBFloat16 || dt == at::kHalf,
              "bank dtype must be ", x_name, "'s dtype (", x.scalar_type(),
              ") or bfloat16/float16, got ", dt);
  TORCH_CHECK(bank.size(1) == x.size(1), "bank rows have dim ", bank.size(1), " but ", x_name,
              " has dim ", x.size(1));
  TORCH_CHECK(bank.size(0) > 0, "bank must have at least one row");
}

inline void check_index_vector(const at::Tensor& y, const at::Tensor& x, const char* name) {
  TORCH_CHECK(y.dim() == 1, name, " must be 1-D (batch,), got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kLong, name, " must be int64, got ", y.scalar_type());
  TORCH_CHECK(y.device() == x.device(), name, " is on ", y.device(), " but x is on ", x.device());
  TORCH_CHECK(y.size(0) == x.size(0), name, " has ", y.size(0), " entries but x has batch ",
              x.size(0));
}

inline void check_idx_matrix(const at::Tensor& idx, const at::Tensor& x) {
  TORCH_CHECK(idx.dim() == 2, "idx must be 2-D (batch, K+1), got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), "idx is on ", idx.device(), " but x is on ", x.device());
  TORCH_CHECK(idx.size(0) == x.size(0), "idx has ", idx.size(0), " rows but x has batch ",
              x.size(0));
  TORCH_CHECK(idx.size(1) >= 1, "idx needs at least the positive column");
}

inline void check_rng_state(const at::Tensor& rng_state, const at::Tensor& x) {
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.numel() == 2,
              "rng_state must be a (2,) tensor [seed, offset], got shape ", rng_state.sizes());
  TORCH_CHECK(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ",
              rng_state.scalar_type());
  TORCH_CHECK(rng_state.device() == x.device(), "rng_state is on ", rng_state.device(),
              " but x is on ", x.device());
}

inline void check_z(const at::Tensor& z, const at::Tensor& x) {
  TORCH_CHECK(z.numel() == 1, "z must hold one element, got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "z must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.device() == x.device(), "z is on ", z.device(), " but x is on ", x.device());
}

// The message of a row index outside the bank, the same from every op and device.
inline void fail_row_outside_bank(const char* name, int64_t row, int64_t n) {
  TORCH_CHECK(false, name, " holds row ", row, ", outside the bank [0, ", n, ")");
}

// Raises (naming the smallest row when one is negative, else the largest) if `rows` holds an
// index outside [0, n). Reads two values on the host: the CPU ops, and the CUDA ops only on
// their synchronous debug path (host_common.h).
inline void check_rows_in_bank(const at::Tensor& rows, int64_t n, const char* name) {
  if (rows.numel() == 0) return;
  const int64_t lo = rows.min().item<int64_t>(), hi = rows.max().item<int64_t>();
  if (lo < 0 || hi >= n) fail_row_outside_bank(name, lo < 0 ? lo : hi, n);
}

inline void check_temperature(double t) {
  TORCH_CHECK(t > 0 && std::isfinite(t), "temperature must be positive and finite, got ", t);
}

// The proximal weight lambda of the loss ops (schemas.h): a finite number >= 0 (NaN fails too).
inline void check_proximal(double proximal) {
  TORCH_CHECK(proximal >= 0 && std::isfinite(proximal),
              "proximal must be a finite number >= 0 (the weight of the proximal term), got ",
              proximal);
}

// The dtype sums run in for features x: float64 for double x, float32 otherwise (the dtype of
// positive_sq_dist).
inline at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Either an explicit (B, K+1) idx, or in-kernel sampling from rng_state with K
// negatives (exclude_positive: none equal to the sample's positive); returns K + 1.
inline int64_t check_rows_source(const at::Tensor& x, const at::Tensor& bank,
                                 const c10::optional<at::Tensor>& idx,
                                 const c10::optional<at::Tensor>& rng_state,
                                 int64_t num_negatives, bool exclude_positive = false) {
  TORCH_CHECK(!(exclude_positive && idx.has_value()),
              "exclude_positive applies to in-kernel sampling; an explicit idx is used as given");
  if (idx.has_value()) {
    check_idx_matrix(*idx, x);
    TORCH_CHECK(num_negatives < 0 || idx->size(1) == num_negatives + 1, "idx has ", idx->size(1),
                " columns but num_negatives + 1 = ", num_negatives + 1);
    return idx->size(1);
  }
  TORCH_CHECK(rng_state.has_value(), "pass either idx or rng_state (for in-kernel sampling)");
  check_rng_state(*rng_state, x);
  TORCH_CHECK(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  TORCH_CHECK(bank.size(0) < (int64_t(1) << 31), "in-kernel sampling needs n_data < 2^31");
  TORCH_CHECK(!exclude_positive || bank.size(0) >= 2,
              "exclude_positive needs a bank of at least 2 rows, got ", bank.size(0));
  return num_negatives + 1;
}

// n of NCE's noise distribution Pn = 1/n (c = K / n, Z = mean score * n): the bank's rows, or
// n_data when the bank passed holds only some rows of an n_data-row bank (a shard's fetched
// rows, addressed by an explicit idx). -1: the bank's rows.
inline int64_t noise_rows(int64_t n_data, const at::Tensor& bank,
                          const c10::optional<at::Tensor>& idx) {
  if (n_data == -1) return bank.size(0);
  TORCH_CHECK(n_data >= 1, "n_data must be >= 1 (or -1: the bank's rows), got ", n_data);
  TORCH_CHECK(idx.has_value(),
              "n_data needs an explicit idx: in-kernel sampling draws from the bank's own rows");
  return n_data;
}

}  // namespace npid
