// See include/npid/shared_negatives.h. Per chunk of the m noise rows: one gather, one GEMM for
// the chunk x B scores, the loss terms and their derivatives with elementwise ops on that tile,
// and one GEMM of the derivatives with the same rows for grad_x (the rows stay converted and in
// cache between the two). State between chunks is O(B * d). The tile is rows x samples: MKL forms
// rows (chunk x d) @ x^T (d x B) 1.7x faster than x (B x d) @ rows^T on the 2-core dev CPU (16 vs
// 28 ms at B = 64, m = 65,536, d = 128), and the second GEMM reads the tile transposed for free.
#ifdef NPID_EMULATE_CUDA
#include "emu/cuda_emu.h"  // before philox.h: the emulated build takes its device intrinsics' path
#endif
#include "npid/shared_negatives.h"

#include <limits>
#include <vector>

#include "npid/bank_scan.h"
#include "npid/checks.h"
#include "npid/loss_terms.h"
#include "npid/philox.h"

namespace npid {

int64_t shared_replacement_row(int64_t b, int64_t j, int64_t m, int64_t positive, uint64_t seed,
                               uint64_t offset, int64_t n_data) {
  const uint64_t e = static_cast<uint64_t>(b) * static_cast<uint64_t>(m) + static_cast<uint64_t>(j);
  return philox_negative_index(e, seed, offset | (uint64_t(1) << 63), n_data, positive,
                               /*exclude_positive=*/true);
}

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The m noise rows: the caller's (checked) or drawn in-kernel as sample 0 of a B = 1 draw.
at::Tensor noise_rows_of(const at::Tensor& x, const at::Tensor& y,
                         const c10::optional<at::Tensor>& rows,
                         const c10::optional<at::Tensor>& rng_state, int64_t num_negatives,
                         int64_t n, SampleNegativesFn sample) {
  if (rows.has_value()) {
    const at::Tensor& r = *rows;
    TORCH_CHECK(r.dim() == 1, "rows must be 1-D (m,), got shape ", r.sizes());
    TORCH_CHECK(r.scalar_type() == at::kLong, "rows must be int64, got ", r.scalar_type());
    TORCH_CHECK(r.device() == x.device(), "rows is on ", r.device(), " but x is on ", x.device());
    TORCH_CHECK(r.numel() >= 1, "rows must hold at least one noise row");
    TORCH_CHECK(num_negatives < 0 || r.numel() == num_negatives, "rows has ", r.numel(),
                " entries but num_negatives = ", num_negatives);
    return r.contiguous();
  }
  TORCH_CHECK(rng_state.has_value(), "pass either rows or rng_state (for in-kernel sampling)");
  check_rng_state(*rng_state, x);
  TORCH_CHECK(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  TORCH_CHECK(n < (int64_t(1) << 31), "in-kernel sampling needs n_data < 2^31");
  const at::Tensor first = at::zeros({1}, y.options());
  return sample(first, *rng_state, n, num_negatives, /*exclude_positive=*/false)
      .select(0, 0)
      .narrow(0, 1, num_negatives)
      .contiguous();
}

// exclude_positive: the (sample, replacement row) of every noise column equal to its sample's
// positive. The few pairs go through the host (on CUDA one sync per step, only in this mode).
std::pair<at::Tensor, at::Tensor> replacements(const std::vector<at::Tensor>& pairs,
                                               const at::Tensor& y, const at::Tensor& rng_state,
                                               int64_t m, int64_t n) {
  const at::Tensor all = at::cat(pairs, 0).cpu();
  const int64_t count = all.size(0);
  at::Tensor samples = at::empty({count}, all.options()), rows = at::empty({count}, all.options());
  if (count > 0) {
    const at::Tensor yh = y.cpu().contiguous(), state = rng_state.cpu();
    const uint64_t seed = static_cast<uint64_t>(state[0].item<int64_t>());
    const uint64_t offset = static_cast<uint64_t>(state[1].item<int64_t>());
    const auto p = all.accessor<int64_t, 2>();
    const int64_t* yp = yh.const_data_ptr<int64_t>();
    int64_t* sp = samples.data_ptr<int64_t>();
    int64_t* rp = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
      sp[i] = p[i][0];
      rp[i] = shared_replacement_row(p[i][0], p[i][1], m, yp[p[i][0]], seed, offset, n);
    }
  }
  return {samples.to(y.device()), rows.to(y.device())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_negatives_loss(
    const at::Tensor& x_in, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& rows_in, const c10::optional<at::Tensor>& rng_state,
    const c10::optional<at::Tensor>& z, int64_t num_negatives, const SharedNegativesArgs& args,
    SampleNegativesFn sample, int64_t default_chunk) {
  const bool nce = args.loss == SharedLoss::kNce;
  check_features(x_in, "x", /*allow_bf16=*/x_in.is_cuda());
  check_bank(bank, x_in);
  check_index_vector(y, x_in, "y");
  check_temperature(args.temperature);
  check_proximal(args.proximal);
  const ScanPrecision precision = parse_precision(args.precision);
  if (nce) {
    TORCH_CHECK(z.has_value(), "the NCE loss needs z");
    check_z(*z, x_in);
  }
  TORCH_CHECK(args.chunk_rows == -1 || args.chunk_rows >= 1,
              "chunk_rows must be >= 1 (or -1: the default), got ", args.chunk_rows);
  const int64_t n = bank.size(0), B = x_in.size(0);
  int64_t n_noise = n;
  if (args.n_data != -1) {
    TORCH_CHECK(args.n_data >= 1, "n_data must be >= 1 (or -1: the bank's rows), got ", args.n_data);
    TORCH_CHECK(rows_in.has_value(),
                "n_data needs explicit rows: in-kernel sampling draws from the bank's own rows");
    TORCH_CHECK(!args.exclude_positive,
                "exclude_positive draws replacement rows from the bank's own rows; it cannot be "
                "combined with n_data");
    n_noise = args.n_data;
  }
  const at::Tensor rows = noise_rows_of(x_in, y, rows_in, rng_state, num_negatives, n, sample);
  const int64_t m = rows.numel();
  if (args.exclude_positive) {
    TORCH_CHECK(rng_state.has_value(),
                "exclude_positive draws the replacement rows from rng_state: pass it (also with "
                "explicit rows)");
    check_rng_state(*rng_state, x_in);
    TORCH_CHECK(n >= 2, "exclude_positive needs a bank of at least 2 rows, got ", n);
  }
  const bool host_checks = args.rows_checked;
  if (host_checks) {
    check_rows_in_bank(y, n, "y");
    if (rows_in.has_value()) check_rows_in_bank(rows, n, "rows");
    if (nce) {
      const double zv = z->item<double>();
      TORCH_CHECK(zv > 0 && std::isfinite(zv),
                  "z must be set (positive) before the NCE loss; estimate it first, got ", zv);
    }
  }
  const auto acc_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_opts = x_in.options().dtype(acc_type);
  if (B == 0) {
    return {at::empty({0}, x_in.options()), at::empty_like(x_in, at::MemoryFormat::Contiguous),
            at::empty({0}, x_in.options().dtype(at::kDouble)), at::empty({0}, acc_opts)};
  }
  const double inv_t = 1.0 / args.temperature;
  const at::Tensor xa = x_in.to(acc_type).contiguous();
  const at::Tensor y_safe = host_checks ? y.contiguous() : y.clamp(0, n - 1);
  const at::Tensor rows_safe = host_checks ? rows : rows.clamp(0, n - 1);

  // fp32 folds 1/T into x (one pass less over each tile); the rounded modes scale the scores,
  // since x / T is not representable in TF32 / bf16 (as in bank_scan.cpp).
  const bool fold_scale = precision == ScanPrecision::kFP32;
  const at::Tensor x_op = scan_operand(fold_scale ? xa * inv_t : xa, acc_type, precision);
  const at::Tensor x_rounded = round_to_precision(xa, precision);
  // The positive's row as stored (for the proximal term) and as the products see it.
  const at::Tensor w_stored = bank.index_select(0, y_safe).to(acc_type);
  const at::Tensor w_pos = round_to_precision(w_stored, precision);
  const at::Tensor s_pos = (x_rounded * w_pos).sum(1).mul_(inv_t);

  // NCE: c = m / n (m draws from Pn = 1/n), 1/Z as a device scalar (NaN when Z is unset).
  const NceTensorTerms nce_terms{static_cast<double>(m) / static_cast<double>(n_noise)};
  at::Tensor inv_z, loss_neg, exp_sum, grad_sum;
  // softmax-CE: online logsumexp over [s_pos, s_1..s_m], started from the positive.
  at::Tensor run_max, run_sum, run_acc;
  if (nce) {
    const at::Tensor zd = z->reshape({}).to(at::kDouble);
    inv_z = at::where(zd.gt(0).logical_and_(zd.isfinite()), zd.reciprocal(), kNaN).to(acc_type);
    loss_neg = at::zeros({B}, xa.options().dtype(at::kDouble));
    exp_sum = at::zeros({B}, xa.options().dtype(at::kDouble));
    grad_sum = at::zeros_like(xa);
  } else {
    run_max = s_pos.clone();
    run_sum = at::ones({B}, acc_opts);
    run_acc = w_pos.clone();
  }

  const int64_t chunk = std::max<int64_t>(1, args.chunk_rows > 0 ? args.chunk_rows : default_chunk);
  std::vector<at::Tensor> collisions;
  for (int64_t start = 0; start < m; start += chunk) {
    const int64_t rows_here = std::min(chunk, m - start);
    const at::Tensor r = rows_safe.narrow(0, start, rows_here);
    const at::Tensor w = scan_operand(bank.index_select(0, r), acc_type, precision);  // (chunk, d)
    at::Tensor s = scan_mm(w, x_op.t(), precision);                                   // (chunk, B)
    if (!fold_scale) s.mul_(inv_t);
    at::Tensor own;  // (chunk, B): noise row equal to the sample's positive
    if (args.exclude_positive) {
      own = r.unsqueeze(1).eq(y.unsqueeze(0));
      at::Tensor pairs = own.nonzero().flip(1);  // (sample, row in the chunk)
      pairs.select(1, 1).add_(start);
      collisions.push_back(pairs);
    }
    if (nce) {
      at::Tensor p = s.exp_();  // s is not needed again
      if (own.defined()) p.masked_fill_(own, 0);
      exp_sum.add_(p.sum(0, /*keepdim=*/false, at::kDouble));
      p.mul_(inv_z);
      at::Tensor terms = nce_terms.negative_loss(p);
      if (own.defined()) terms.masked_fill_(own, 0);
      loss_neg.add_(terms.sum(0, /*keepdim=*/false, at::kDouble));
      const at::Tensor dl_ds = nce_terms.negative_dloss_ds_(p);  // 0 where P was masked
      grad_sum.add_(scan_mm(scan_operand(dl_ds.t(), acc_type, precision), w, precision));
    } else {
      if (own.defined()) s.masked_fill_(own, -std::numeric_limits<double>::infinity());
      const at::Tensor max_new = at::maximum(run_max, std::get<0>(s.max(0)));
      const at::Tensor scale = (run_max - max_new).exp_();
      const at::Tensor p = s.sub_(max_new.unsqueeze(0)).exp_();
      run_sum.mul_(scale).add_(p.sum(0));
      run_acc.mul_(scale.unsqueeze(1))
          .add_(scan_mm(scan_operand(p.t(), acc_type, precision), w, precision));
      run_max = max_new;
    }
  }

  if (!collisions.empty()) {
    at::Tensor who, replacement;
    std::tie(who, replacement) = replacements(collisions, y, *rng_state, m, n);
    if (who.numel() > 0) {
      const at::Tensor w_r = round_to_precision(bank.index_select(0, replacement).to(acc_type), precision);
      const at::Tensor s_r = (x_rounded.index_select(0, who) * w_r).sum(1).mul_(inv_t);
      if (nce) {
        const at::Tensor e = s_r.exp();
        exp_sum.index_add_(0, who, e.to(at::kDouble));
        at::Tensor p = e * inv_z;
        loss_neg.index_add_(0, who, nce_terms.negative_loss(p).to(at::kDouble));
        grad_sum.index_add_(0, who, nce_terms.negative_dloss_ds_(p).unsqueeze(1) * w_r);
      } else {
        const at::Tensor max_new = run_max.scatter_reduce(0, who, s_r, "amax", /*include_self=*/true);
        const at::Tensor scale = (run_max - max_new).exp_();
        run_sum.mul_(scale);
        run_acc.mul_(scale.unsqueeze(1));
        const at::Tensor e = (s_r - max_new.index_select(0, who)).exp_();
        run_sum.index_add_(0, who, e);
        run_acc.index_add_(0, who, e.unsqueeze(1) * w_r);
        run_max = max_new;
      }
    }
  }

  at::Tensor loss, grad_x;
  if (nce) {
    const at::Tensor p0 = s_pos.exp() * inv_z;
    loss = nce_terms.positive_loss(p0).to(at::kDouble).add_(loss_neg);
    const at::Tensor dl_ds0 = nce_terms.positive_dloss_ds(p0);
    grad_x = grad_sum.add_(dl_ds0.unsqueeze(1) * w_pos).mul_(inv_t);
  } else {
    loss = run_max + run_sum.log() - s_pos;
    grad_x = run_acc.div_(run_sum.unsqueeze(1)).sub_(w_pos).mul_(inv_t);
  }
  // The proximal term (schemas.h) from the unrounded row, whatever the precision of the products.
  const at::Tensor diff = xa - w_stored;
  at::Tensor sq_dist = (diff * diff).sum(1);
  if (args.proximal != 0) {
    loss = loss + sq_dist * args.proximal;
    grad_x = grad_x + diff * (2.0 * args.proximal);
  }
  if (!host_checks) {  // rows outside the bank give NaN instead of a host sync
    const at::Tensor y_valid = y.ge(0).logical_and_(y.lt(n));
    const at::Tensor rows_valid = rows.ge(0).logical_and_(rows.lt(n)).all();
    const at::Tensor valid = y_valid.logical_and(rows_valid);
    loss = at::where(valid, loss, kNaN);
    grad_x = at::where(valid.unsqueeze(1), grad_x, kNaN);
    if (nce) exp_sum = at::where(valid, exp_sum, kNaN);
    sq_dist = at::where(y_valid, sq_dist, kNaN);  // the positive's own row decides it
  }
  return {loss.to(x_in.scalar_type()), grad_x.to(x_in.scalar_type()).contiguous(),
          nce ? exp_sum : at::Tensor(), sq_dist};
}

}  // namespace npid
