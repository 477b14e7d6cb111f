// Every npid operator schema, in one place: define_schemas() declares them in the `npid`
// library (npid_ops.cpp) and in the emulated-CUDA test library `npid_emu` (csrc/emu/).
//
// Conventions shared by all ops:
//  * x / query: (B, d) features, float32 or float64 (CUDA also bfloat16).
//  * bank: (n, d) memory bank, float32/float64 matching x, or bfloat16/float16.
//  * y: (B,) int64 instance indices (the positives), idx: (B, K+1) int64 rows
//    with column 0 the positive (lemniscate overwrites it with y; we read it as given).
//  * rng_state: int64 (2,) tensor [seed, offset] on the device of x. When idx is
//    None the kernels draw uniform negatives in-kernel from Philox4x32-10 keyed
//    by it, exactly as sample_negatives() would (see include/npid/philox.h).
//  * Loss ops return (per-sample loss (B,), grad_x (B, d) = d loss_b / d x_b):
//    one pass over the gathered rows; backward only scales grad_x. nce_loss adds a third,
//    non-differentiable output (the noise columns' exp-score sums, for the Z estimate).
//  * Proximal regularisation (the paper's eq. 10): every loss op takes `proximal` = lambda >= 0
//    (last argument) and returns, last, positive_sq_dist (B,) = sum_i (x_b,i - v_i)^2 with
//    v = bank[y_b] (column 0 of an explicit idx) converted to the accumulation dtype (float32,
//    float64 for double x), never rounded by a precision mode. It is computed from the positive
//    row the pass reads anyway, whatever lambda (a statistic of how far the bank lags the
//    features), and is not differentiable. lambda > 0 adds lambda * positive_sq_dist_b to
//    loss_b and 2 lambda (x_b - v) to grad_x; lambda = 0 leaves both bit for bit as without it.
#pragma once
#include <torch/library.h>

namespace npid {

inline void define_schemas(torch::Library& m) {
  // 7. Uniform negatives: (B, K+1) int64, column 0 = y, columns 1..K uniform in [0, n_data).
  //    exclude_positive: columns 1..K uniform over the n_data - 1 rows other than y[b] (philox.h).
  //    The fused losses take the same flag (in-kernel sampling only).
  m.def("sample_negatives(Tensor y, Tensor rng_state, int n_data, int num_negatives, bool exclude_positive=False) -> Tensor");
  // 1. lemniscate's NCEAverage, unnormalised: exp(bank[idx[b,k]] . x[b] / T), (B, K+1).
  m.def("nce_scores(Tensor x, Tensor bank, Tensor idx, float temperature) -> Tensor");
  //    d/dx of sum(grad_out * out): sum_k grad_out[b,k] * out[b,k] * bank[idx[b,k]] / T.
  //    Re-gathers the rows instead of saving a (B, K+1, d) tensor.
  m.def("nce_scores_backward(Tensor grad_out, Tensor out, Tensor x, Tensor bank, Tensor idx, float temperature) -> Tensor");
  // 7. Z = mean(scores) * n_data where z is not set yet (z <= 0); no host sync.
  m.def("nce_init_z_(Tensor(a!) z, Tensor scores, int n_data) -> ()");
  //    Same from the rows themselves (fused path): one extra pass on the first step only.
  //    n_data (here and in nce_loss): the n of Pn = 1/n when `bank` holds only some rows of
  //    the real bank (sharded training passes the fetched rows with an explicit idx); -1: bank rows.
  m.def("nce_estimate_z_(Tensor(a!) z, Tensor x, Tensor bank, Tensor y, Tensor? idx, Tensor? rng_state, int num_negatives, float temperature, int n_data=-1, bool exclude_positive=False) -> ()");
  // 2. Fused NCE loss (lemniscate NCECriterion on NCEAverage's output), eps = 1e-7.
  //    Third output noise_exp_sum (B,) float64: sum over the K noise columns k >= 1 of
  //    exp(s_k) (s_k = bank[row_k] . x_b / T, the positive column 0 excluded), computed in the
  //    same pass; n * mean(noise_exp_sum) / K estimates Z = sum_j exp(s_j) (the "ema" Z mode).
  //    Not differentiable.
  m.def("nce_loss(Tensor x, Tensor bank, Tensor y, Tensor? idx, Tensor? rng_state, Tensor z, int num_negatives, float temperature, int n_data=-1, bool exclude_positive=False, float proximal=0.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // 3. Fused softmax cross-entropy (InfoNCE) over the same rows, positive at column 0.
  m.def("softmax_ce_loss(Tensor x, Tensor bank, Tensor y, Tensor? idx, Tensor? rng_state, int num_negatives, float temperature, bool exclude_positive=False, float proximal=0.0) -> (Tensor, Tensor, Tensor)");
  // 8. Shared negatives: one set of m = num_negatives noise rows for the whole batch, scored
  //    against every sample by a GEMM, chunk_rows rows at a time (never a B x m tensor beyond
  //    one chunk); each sample's positive is its own row y[b]. rows: an explicit (m,) int64
  //    set, or None to draw it in-kernel from rng_state: element j of the stream of
  //    sample_negatives(B=1) (rows[j] = sample_negatives(y0, rng_state, n, m)[0, 1 + j]).
  //    A sample whose own row is among the noise: kept as a negative by default (lemniscate keeps
  //    such collisions); exclude_positive=True replaces each such column, for that sample only,
  //    by a row uniform over the other n - 1 (Philox, the stream [seed, offset | 2^63], element b).
  //    precision of the products as in full_softmax_loss. Outputs as nce_loss / softmax_ce_loss
  //    with K = m: NCE's c = m / n and noise_exp_sum over the m noise columns.
  m.def("shared_nce_loss(Tensor x, Tensor bank, Tensor y, Tensor? rows, Tensor? rng_state, Tensor z, int num_negatives, float temperature, bool exclude_positive=False, int n_data=-1, str precision=\"fp32\", int chunk_rows=-1, float proximal=0.0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("shared_softmax_ce_loss(Tensor x, Tensor bank, Tensor y, Tensor? rows, Tensor? rng_state, int num_negatives, float temperature, bool exclude_positive=False, str precision=\"fp32\", int chunk_rows=-1, float proximal=0.0) -> (Tensor, Tensor, Tensor)");
  // 4. bank[y[b]] <- normalise(momentum * bank[y[b]] + (1 - momentum) * x[b]), in place.
  //    Duplicates in y: the LAST occurrence wins, computed from the row as it was before
  //    the call (what lemniscate's sequential index_copy_ does on the CPU).
  m.def("momentum_update_(Tensor(a!) bank, Tensor x, Tensor y, float momentum) -> ()");
  // 5. Exact non-parametric softmax: cross_entropy(x @ bank.T / T, y) per sample and its
  //    grad_x, streaming the bank in chunks with a running logsumexp (no B x n logits).
  //    precision of the products: "fp32" (exact), "tf32" or "bf16" (operands rounded to that
  //    format, tensor cores on CUDA); accumulation in fp32 (fp64 for double x) always.
  //    compute_grad=False (x needs no gradient): grad_x is zeros, one GEMM per chunk, not two.
  m.def("full_softmax_loss(Tensor x, Tensor bank, Tensor y, float temperature, str precision=\"fp32\", bool compute_grad=True, float proximal=0.0) -> (Tensor, Tensor, Tensor)");
  // 6. k largest dot products query . bank[j], sorted descending: (similarities, indices),
  //    streaming the bank in chunks with a running top-k (no Q x n matrix); precision as above.
  m.def("knn_topk(Tensor query, Tensor bank, int k, str precision=\"fp32\") -> (Tensor, Tensor)");
}

}  // namespace npid
