"""Pure-PyTorch reference for every npid op: the ground truth for the tests and the
"torch" provider in the benchmarks. Written for clarity, not speed: it materialises the
(B, K+1, d) gathered rows, as a straightforward PyTorch implementation would.

Arithmetic follows lemniscate.pytorch's NCEAverage, NCECriterion and LinearAverage; tests run it in
float64. Every loss takes `proximal` = lambda, the paper's proximal term (eq. 10):
lambda * positive_sq_dist(x, bank, positives) added per sample.
"""
from __future__ import annotations

import torch

NCE_EPS = 1e-7  # lemniscate's NCECriterion eps

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a < 2^32 and uint32 values b held in int64,
    without overflowing int64: split b into 16-bit halves."""
    t_lo = a * (b & 0xFFFF)
    t_hi = a * (b >> 16)
    u = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (u >> 32), u & _MASK32


def philox4x32_10(counter: torch.Tensor, offset: int, seed: int):
    """Philox4x32-10 on int64 tensors of counters; returns the four uint32 output words."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.full_like(counter, offset & _MASK32)
    c3 = torch.full_like(counter, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def sample_negatives(y: torch.Tensor, rng_state: torch.Tensor, n_data: int, num_negatives: int,
                     exclude_positive: bool = False) -> torch.Tensor:
    """(B, K+1) rows: column 0 = y, columns 1..K uniform in [0, n_data) from Philox (philox.h);
    exclude_positive: uniform over the n_data - 1 rows other than y[b] (a draw in [0, n - 1)
    moved one up from the positive on)."""
    seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in rng_state.tolist())
    B, K = y.shape[0], num_negatives
    e = torch.arange(B * K, dtype=torch.int64, device=y.device)
    words = torch.stack(philox4x32_10(e >> 1, offset, seed))  # (4, B*K)
    w = (e & 1) * 2
    lo = words.gather(0, w.unsqueeze(0)).squeeze(0)
    hi = words.gather(0, (w + 1).unsqueeze(0)).squeeze(0)
    n = n_data - 1 if exclude_positive else n_data
    # floor((hi * 2^32 + lo) * n / 2^64) in int64: hi * n and lo * n stay below 2^63 for n < 2^31.
    rows = ((hi * n + ((lo * n) >> 32)) >> 32).view(B, K)
    if exclude_positive:
        rows = rows + (rows >= y.view(B, 1)).long()
    return torch.cat([y.view(B, 1), rows], dim=1)


def shared_noise_rows(rng_state: torch.Tensor, n_data: int, num_negatives: int) -> torch.Tensor:
    """The (m,) shared noise rows drawn from rng_state: sample 0 of a one-sample draw."""
    return sample_negatives(torch.zeros(1, dtype=torch.int64), rng_state, n_data, num_negatives)[0, 1:]


def shared_negatives_idx(y: torch.Tensor, rows: torch.Tensor, rng_state=None, n_data: int = 0,
                         exclude_positive: bool = False) -> torch.Tensor:
    """The shared-negative losses as per-sample ones: (B, m+1) idx whose row b is [y_b, rows...].
    exclude_positive: a column equal to y_b holds instead the row per-sample exclude sampling draws
    at (b, 1 + j) from the stream [seed, offset | 2^63]."""
    B, m = y.shape[0], rows.shape[0]
    noise = rows.view(1, m).expand(B, m)
    if exclude_positive:
        seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in rng_state.tolist())
        flipped = offset | (1 << 63)
        state = torch.tensor([seed - (1 << 64) if seed >= 1 << 63 else seed, flipped - (1 << 64)])
        redrawn = sample_negatives(y, state, n_data, m, exclude_positive=True)[:, 1:]
        noise = torch.where(noise == y.view(B, 1), redrawn, noise)
    return torch.cat([y.view(B, 1), noise], dim=1)


def gathered_scores(x: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """s[b, k] = bank[idx[b, k]] . x[b] / T, in x's dtype."""
    weight = bank.index_select(0, idx.reshape(-1)).view(*idx.shape, bank.shape[1]).to(x.dtype)
    return torch.einsum("bkd,bd->bk", weight, x) / temperature


def nce_scores(x, bank, idx, temperature):
    """lemniscate's NCEAverage output before dividing by Z: exp(s)."""
    return gathered_scores(x, bank, idx, temperature).exp()


def estimate_z(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """lemniscate: Z = mean(exp scores of the first batch) * n."""
    return scores.mean() * n_data


def noise_exp_sum(x, bank, idx, temperature) -> torch.Tensor:
    """nce_loss's third output: per sample, sum over the noise columns k >= 1 of exp(s_k)."""
    return nce_scores(x, bank, idx, temperature)[:, 1:].sum(1)


def z_ema(z, noise_sums: torch.Tensor, num_noise: int, n_data: int, alpha: float):
    """The "ema" Z update: alpha * Z + (1 - alpha) * n * (sum of the noise exp-scores) / their count."""
    return alpha * z + (1 - alpha) * n_data * noise_sums.sum() / num_noise


def true_z(x: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample, the exact normaliser Z_b = sum_j exp(bank_j . x_b / T) over the whole bank,
    which lemniscate's one constant Z stands in for (n * mean exp(s) estimates it)."""
    return (x @ bank.to(x.dtype).t() / temperature).exp().sum(1)


def nce_criterion(probs: torch.Tensor, n_data: int) -> torch.Tensor:
    """lemniscate's NCECriterion on NCEAverage's output P (B, K+1): per-sample losses.
    log1p forms of -log(P0 / (P0 + c + eps)) and -log(c / (Pk + c + eps))."""
    K = probs.shape[1] - 1
    c = K / n_data
    positive = torch.log1p((c + NCE_EPS) / probs[:, 0])
    negatives = torch.log1p((probs[:, 1:] + NCE_EPS) / c).sum(1)
    return positive + negatives


def positive_sq_dist(x, bank, positives) -> torch.Tensor:
    """||x_b - bank[positives_b]||^2 per sample, the row in x's dtype (a 16-bit bank exactly),
    never rounded to a scan precision; differentiable w.r.t. x (its gradient is 2 (x_b - v))."""
    v = bank.index_select(0, positives).to(x.dtype)
    return (x - v).pow(2).sum(1)


def with_proximal(loss, x, bank, positives, proximal: float) -> torch.Tensor:
    """loss + proximal * positive_sq_dist (the paper's eq. 10); the loss itself when proximal is 0."""
    return loss + proximal * positive_sq_dist(x, bank, positives) if proximal else loss


def nce_loss(x, bank, y, idx, z, temperature, n_data=None, proximal=0.0):
    """Per-sample fused NCE loss (autograd gives grad_x); z is the normalisation constant, n_data
    the n of Pn = 1/n (default: the bank's rows). The positive is idx[:, 0]."""
    probs = nce_scores(x, bank, idx, temperature) / z
    loss = nce_criterion(probs, bank.shape[0] if n_data is None else n_data)
    return with_proximal(loss, x, bank, idx[:, 0], proximal)


def shared_scores(x, bank, y, rows, temperature):
    """(B, 1 + m) scores [own row, the m shared noise rows] with one GEMM, as a PyTorch user writes
    shared negatives (MoCo): the pure-PyTorch provider of the shared-negative benchmarks.
    (Collisions are kept; shared_negatives_idx + the per-sample functions cover exclude_positive.)"""
    positive = (bank.index_select(0, y).to(x.dtype) * x).sum(1, keepdim=True)
    noise = x @ bank.index_select(0, rows).to(x.dtype).t()
    return torch.cat([positive, noise], dim=1) / temperature


def shared_nce_loss(x, bank, y, rows, z, temperature, n_data=None, proximal=0.0):
    probs = shared_scores(x, bank, y, rows, temperature).exp() / z
    loss = nce_criterion(probs, bank.shape[0] if n_data is None else n_data)
    return with_proximal(loss, x, bank, y, proximal)


def shared_softmax_ce_loss(x, bank, y, rows, temperature, proximal=0.0):
    s = shared_scores(x, bank, y, rows, temperature)
    return with_proximal(torch.logsumexp(s, dim=1) - s[:, 0], x, bank, y, proximal)


def softmax_ce_loss(x, bank, y, idx, temperature, proximal=0.0):
    """Per-sample -log softmax(s)[0] over the K+1 gathered rows (InfoNCE, positive at column 0)."""
    s = gathered_scores(x, bank, idx, temperature)
    return with_proximal(torch.logsumexp(s, dim=1) - s[:, 0], x, bank, idx[:, 0], proximal)


def round_to_precision(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t rounded (to nearest even) to the format whose products a "tf32"/"bf16" scan forms,
    kept in t's dtype; "fp32" leaves t unchanged. Differentiable as the identity (the kernels'
    grad_x is the gradient with respect to the rounded operand)."""
    if precision == "fp32":
        return t
    if precision not in ("tf32", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'tf32' or 'bf16', got {precision!r}")
    v = t.detach()
    f = v.float()  # float64 goes through float32 first, as in the kernels
    if precision == "bf16":
        rounded = f.to(torch.bfloat16).to(t.dtype)
    else:
        bits = torch.where(f.isnan(), 0.0, f).view(torch.int32)
        bits = (bits + ((bits >> 13) & 1) + 0x0FFF) & ~0x1FFF  # drop 13 of 23 mantissa bits
        rounded = torch.where(f.isnan(), f, bits.view(torch.float32)).to(t.dtype)
    return t + (rounded - v) if t.requires_grad else rounded


def full_softmax_loss(x, bank, y, temperature, precision: str = "fp32", proximal=0.0):
    """Per-sample exact non-parametric softmax: cross_entropy(x @ bank.T / T, y), the
    products formed from operands rounded to `precision` (the math of a tensor-core GEMM);
    the proximal term from the unrounded x and rows."""
    logits = round_to_precision(x, precision) @ round_to_precision(bank.to(x.dtype), precision).t() / temperature
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return with_proximal(loss, x, bank, y, proximal)


def momentum_update(bank: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float) -> torch.Tensor:
    """A new bank: rows y <- normalise(momentum * bank[y] + (1 - momentum) * x), computed from the
    old rows; for duplicates in y the last occurrence wins (sequential index_copy_)."""
    old = bank.index_select(0, y).to(x.dtype)
    mixed = old * momentum + x.detach() * (1 - momentum)
    # Divided by max|w_j| first, so a finite row far from unit length normalises without its
    # squared norm over- or underflowing (what the kernels do when that happens).
    mixed = mixed / mixed.abs().amax(1, keepdim=True)
    updated = mixed / mixed.pow(2).sum(1, keepdim=True).sqrt()
    out = bank.clone()
    for b in range(y.shape[0]):  # sequential: the last duplicate wins, on every device
        out[y[b]] = updated[b].to(bank.dtype)
    return out


def knn_topk(query: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32"):
    """The k largest query . bank[j], sorted descending, from the full similarity matrix."""
    sims = round_to_precision(query, precision) @ round_to_precision(bank.to(query.dtype), precision).t()
    return sims.topk(k, dim=1, largest=True, sorted=True)


def knn_vote(sims, indices, bank_labels, num_classes: int, temperature: float) -> torch.Tensor:
    """lemniscate's weighted kNN vote: class score = sum over neighbours of exp(s / T)."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, bank_labels[indices], weights)


def knn_predict(query, bank, bank_labels, num_classes: int, k: int = 200, temperature: float = 0.07):
    sims, indices = knn_topk(query, bank, k)
    return knn_vote(sims, indices, bank_labels, num_classes, temperature)


def nce_step(x, bank, y, idx, z, temperature, momentum):
    """The pure-PyTorch training step the benchmarks time: NCE loss (mean over the batch),
    backward to x, and lemniscate's in-place momentum update of the bank (index_copy_)."""
    loss = nce_loss(x, bank, y, idx, z, temperature).mean()
    loss.backward()
    with torch.no_grad():
        mixed = bank.index_select(0, y).to(x.dtype) * momentum + x.detach() * (1 - momentum)
        bank.index_copy_(0, y, (mixed / mixed.norm(dim=1, keepdim=True)).to(bank.dtype))
    return loss
