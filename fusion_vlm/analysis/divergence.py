"""Branch-divergence estimate of paper Section 3 (formulas reconstructed in DESIGN.md section 7).

Two sequences share a prefix (system prompt + question) and differ in the
answer (``chosen`` vs ``rejected`` of a DPO-style pair set). Every answer token
is mapped to the LLM's last hidden state (no LM head); over the answer part,
truncated to the shorter answer, d_i = h_i(A) - h_i(B), shape (n, H).

ALL RECONSTRUCTED FORMULAS LIVE IN THE FIRST SECTION BELOW (pure functions on
tensors); everything after it only runs the model and averages. Conventions
chosen where the paper's text is silent:

* w = (1, ..., 1) / sqrt(H) (all-equal unit vector), D(n) = |w^T sum_{i<=n} d_i|.
* phi(n) = mean over ordered pairs i != j <= n of cos(d_i, d_j); a zero d_i has
  cosine 0 with everything. d_i below the model dtype's rounding noise (answers
  that start with the same tokens) is set to exactly 0 first. phi(1) has no
  pair: it is set to ``phi_one`` (default 1.0 = cos(d_1, d_1)); the bound at
  n = 1 is delta whatever phi(1) is.
* Averages over pairs: at each n over the pairs whose (truncated) answer reaches n.
* Bound(n) = delta * sqrt(Y(n)), Y(n) = n + n(n-1) phi(n), clipped at 0.
* delta: ``"envelope"`` (default) = smallest delta with Bound(n) >= mean D(n) at
  every n, i.e. max_n D(n) / sqrt(Y(n)); ``"lsq"`` = argmin sum_n (delta
  sqrt(Y(n)) - D(n))^2 = sum D sqrt(Y) / sum Y (the bound may then dip below).
* Threshold 1 (DESIGN.md: ratio of the first to the second term under the root):
  r(n) = n / (n(n-1) phi(n)) = 1 / ((n-1) phi(n)), inf where the second term is
  <= 0; threshold = smallest n with r(n) < R (equivalently second/first > 1/R).
  Default R = 1: where the quadratic term starts to dominate.
* Threshold 2: smallest n >= 2 with |phi(n+1) - phi(n)| < epsilon (phi(1) is a
  convention, so n = 1 is not tested).

Prompt: with a chat template, messages [system (if non-empty), user=question]
rendered with ``add_generation_prompt=True`` (system merged into the user turn
if the template rejects a system role); without one, plain concatenation
``system + "\\n\\n" + question + "\\n\\n"`` with the tokenizer's special tokens. The answer
is tokenised separately (no special tokens) and appended: both branches share the prefix ids.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------- formulas (reconstructed)


def branch_differences(h_a: torch.Tensor, h_b: torch.Tensor, rel_tol: float = 0.0) -> torch.Tensor:
    """d_i = h_i(A) - h_i(B) over the common length: (n_a, H), (n_b, H) -> (min(n_a, n_b), H) float64.

    Rows with |d_i| <= rel_tol * max(|h_i(A)|, |h_i(B)|) are set to exactly 0: where both answers
    still agree (same leading tokens) d_i is 0 in exact arithmetic, and its rounding noise would
    otherwise give phi random cosines.
    """
    n = min(h_a.shape[0], h_b.shape[0])
    a, b = h_a[:n].double(), h_b[:n].double()
    d = a - b
    if rel_tol > 0:
        scale = torch.maximum(a.norm(dim=1), b.norm(dim=1))
        d[d.norm(dim=1) <= rel_tol * scale] = 0.0
    return d


def distance_curve(d: torch.Tensor) -> torch.Tensor:
    """D(n) = |w^T sum_{i<=n} d_i| with w = 1/sqrt(H) * ones: (n, H) -> (n,) for n = 1..len(d)."""
    w = torch.full((d.shape[1],), 1.0 / math.sqrt(d.shape[1]), dtype=d.dtype, device=d.device)
    return (torch.cumsum(d, dim=0) @ w).abs()


def phi_curve(d: torch.Tensor, phi_one: float = 1.0) -> torch.Tensor:
    """phi(n) = mean_{i != j <= n} cos(d_i, d_j): (n, H) -> (n,); phi(1) = ``phi_one``.

    Uses sum_{i != j} cos = |sum_i u_i|^2 - sum_i |u_i|^2 with u_i = d_i / |d_i|
    (u_i = 0 for a zero d_i), so it is O(n H).
    """
    norms = d.norm(dim=1, keepdim=True)
    u = torch.where(norms > 0, d / norms.clamp_min(1e-300), torch.zeros_like(d))
    total = torch.cumsum(u, dim=0).pow(2).sum(dim=1)
    diag = torch.cumsum(u.pow(2).sum(dim=1), dim=0)
    n = torch.arange(1, d.shape[0] + 1, dtype=d.dtype, device=d.device)
    phi = (total - diag) / (n * (n - 1)).clamp_min(1.0)
    phi[0] = phi_one
    return phi


def upsilon(phi: torch.Tensor) -> torch.Tensor:
    """Y(n) = n + n(n-1) phi(n), clipped at 0: (n,) -> (n,), n = 1..len(phi)."""
    n = torch.arange(1, phi.shape[0] + 1, dtype=phi.dtype)
    return (n + n * (n - 1) * phi).clamp_min(0.0)


def fit_delta(mean_distance: torch.Tensor, phi: torch.Tensor, method: str = "envelope") -> float:
    """delta for Bound(n) = delta sqrt(Y(n)) from mean D(n) and phi(n), both (n,).

    ``method``: "envelope" (smallest delta with Bound >= D everywhere) or "lsq" (least squares).
    """
    root = upsilon(phi).sqrt()
    ok = root > 0
    if not bool(ok.any()):
        raise ValueError("Y(n) is 0 at every n: the bound is identically 0")
    if method == "envelope":
        return float((mean_distance[ok] / root[ok]).max())
    if method == "lsq":
        return float((mean_distance[ok] * root[ok]).sum() / root[ok].pow(2).sum())
    raise ValueError(f"delta method {method!r}: expected 'envelope' or 'lsq'")


def term_ratio(phi: torch.Tensor) -> torch.Tensor:
    """r(n) = n / (n(n-1) phi(n)) (first over second term under the root): (n,) -> (n,), inf where <= 0."""
    n = torch.arange(1, phi.shape[0] + 1, dtype=phi.dtype)
    second = n * (n - 1) * phi
    return torch.where(second > 0, n / second.clamp_min(1e-300), torch.full_like(phi, math.inf))


def ratio_threshold(ratio: torch.Tensor, value: float) -> int | None:
    """Threshold 1: smallest n (1-based) with r(n) < ``value``, or None if never."""
    hit = torch.nonzero(ratio < value).flatten()
    return int(hit[0]) + 1 if hit.numel() else None


def phi_threshold(phi: torch.Tensor, epsilon: float, start: int = 2) -> int | None:
    """Threshold 2: smallest n >= ``start`` with |phi(n+1) - phi(n)| < ``epsilon``, or None."""
    step = (phi[1:] - phi[:-1]).abs()  # step[n-1] = |phi(n+1) - phi(n)|
    hit = torch.nonzero(step[start - 1:] < epsilon).flatten()
    return int(hit[0]) + start if hit.numel() else None


# ---------------------------------------------------------------- data, prompts, model


def load_pairs(path, max_pairs: int | None = None) -> list[dict]:
    """Load a paired set (JSON / JSONL / parquet) with fields ``question``, ``chosen``, ``rejected``
    and optional ``system``. Returns a list of dicts with those four string fields."""
    from datasets import load_dataset

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such pairs file")
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = load_dataset(kind, data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 - any parse error is a user error naming the file
        raise ValueError(f"{path}: cannot read as {kind}: {str(err).splitlines()[0]}") from None
    missing = [c for c in ("question", "chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)} (need system?, question, chosen, rejected)")
    if max_pairs is not None:
        ds = ds.select(range(min(int(max_pairs), len(ds))))
    return [{"system": str(r.get("system") or ""), "question": str(r["question"]),
             "chosen": str(r["chosen"]), "rejected": str(r["rejected"])} for r in ds]


def prefix_ids(tokenizer, system: str, question: str) -> list[int]:
    """Token ids of the shared prefix (chat template if the tokenizer has one, else plain text)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates without a system role raise
            merged = [{"role": "user", "content": f"{system}\n\n{question}" if system else question}]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = f"{system}\n\n{question}\n\n" if system else f"{question}\n\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def load_model(path, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from a local directory; AutoModelForCausalLM, falling back to AutoModel."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    kw = dict(trust_remote_code=trust_remote_code, local_files_only=True,
              dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except ValueError:
        model = AutoModel.from_pretrained(path, **kw)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    return model.to(device).eval(), tok


def answer_differences(model, tokenizer, pairs: list[dict], max_answer_tokens: int = 512,
                       rel_tol: float | None = None) -> list[torch.Tensor]:
    """One batch: d (n_k, H) per pair (last hidden state, answers truncated to the shorter one).

    ``rel_tol``: see :func:`branch_differences`; default 10 x the machine epsilon of the model's dtype.
    """
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs, spans = [], []
    for p in pairs:
        pre = prefix_ids(tokenizer, p["system"], p["question"])
        a = tokenizer(p["chosen"], add_special_tokens=False)["input_ids"]
        b = tokenizer(p["rejected"], add_special_tokens=False)["input_ids"]
        n = min(len(a), len(b), max_answer_tokens)
        seqs += [pre + list(a[:n]), pre + list(b[:n])]
        spans.append((len(pre), n))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):  # right padding: positions of real tokens are unaffected
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    with torch.inference_mode():
        out = base(input_ids=ids.to(device), attention_mask=mask.to(device))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if rel_tol is None:
        rel_tol = 10 * torch.finfo(hidden.dtype).eps
    hidden = hidden.float().cpu()
    return [branch_differences(hidden[2 * k, s:s + n], hidden[2 * k + 1, s:s + n], rel_tol)
            for k, (s, n) in enumerate(spans)]


# ---------------------------------------------------------------- estimation and analysis


@dataclass
class DivergenceCurves:
    """Pair-averaged curves for n = 1..len: ``mean_distance``/``std_distance`` of D(n) (hidden-state
    units), ``phi`` (mean cosine, unitless), ``counts`` (pairs reaching n); ``n_pairs`` used."""

    mean_distance: np.ndarray
    std_distance: np.ndarray
    phi: np.ndarray
    counts: np.ndarray
    n_pairs: int


def average_curves(per_pair: list[tuple[torch.Tensor, torch.Tensor]]) -> DivergenceCurves:
    """Average per-pair (D(n), phi(n)) curves at each n over the pairs that reach n."""
    per_pair = [(dd, pp) for dd, pp in per_pair if dd.numel()]
    if not per_pair:
        raise ValueError("no pair has a non-empty answer to compare")
    length = max(dd.numel() for dd, _ in per_pair)
    dist = np.full((len(per_pair), length), np.nan)
    phi = np.full((len(per_pair), length), np.nan)
    for k, (dd, pp) in enumerate(per_pair):
        dist[k, :dd.numel()], phi[k, :pp.numel()] = dd.numpy(), pp.numpy()
    return DivergenceCurves(mean_distance=np.nanmean(dist, 0), std_distance=np.nanstd(dist, 0),
                            phi=np.nanmean(phi, 0), counts=np.sum(~np.isnan(dist), 0), n_pairs=len(per_pair))


def estimate_divergence(model, tokenizer, pairs: list[dict], batch_size: int = 4, max_answer_tokens: int = 512,
                        phi_one: float = 1.0, rel_tol: float | None = None, progress: bool = True) -> DivergenceCurves:
    """Run both branches of every pair (batched, tqdm bar) and average D(n), phi(n) over pairs.

    ``pairs``: dicts with system, question, chosen, rejected; ``rel_tol``: see :func:`answer_differences`.
    """
    from tqdm.auto import tqdm

    per_pair = []
    with tqdm(total=len(pairs), desc="pairs", unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            for d in answer_differences(model, tokenizer, chunk, max_answer_tokens, rel_tol):
                if d.shape[0]:
                    per_pair.append((distance_curve(d), phi_curve(d, phi_one)))
            bar.update(len(chunk))
    return average_curves(per_pair)


def analyse(curves: DivergenceCurves, ratio_value: float = 1.0, phi_epsilon: float = 1e-3,
            delta_method: str = "envelope", min_pairs: int = 1) -> dict:
    """Bound, delta, ratio and both thresholds from averaged curves (cut at n with >= ``min_pairs`` pairs).

    Returns a JSON-ready dict of lists (index i is n = i + 1) and scalars.
    """
    keep = int(np.sum(curves.counts >= min_pairs))  # counts never increase with n
    if keep == 0:
        raise ValueError(f"no n is reached by {min_pairs} pairs (pairs used: {curves.n_pairs})")
    dist, phi = torch.as_tensor(curves.mean_distance[:keep]), torch.as_tensor(curves.phi[:keep])
    delta = fit_delta(dist, phi, delta_method)
    ratio = term_ratio(phi)
    return {"n": list(range(1, keep + 1)), "mean_distance": dist.tolist(),
            "std_distance": curves.std_distance[:keep].tolist(), "phi": phi.tolist(),
            "counts": curves.counts[:keep].tolist(), "bound": (delta * upsilon(phi).sqrt()).tolist(),
            "ratio": [r if math.isfinite(r) else None for r in ratio.tolist()],
            "delta": delta, "delta_method": delta_method, "ratio_value": ratio_value,
            "ratio_threshold": ratio_threshold(ratio, ratio_value), "phi_epsilon": phi_epsilon,
            "phi_threshold": phi_threshold(phi, phi_epsilon), "n_pairs": curves.n_pairs}


def fit_phi_scaling(phi_curves):
    """Section 5.1 / eq. 23: one power law phi(n) = (a / n)^b through the positive phi(n), n >= 2,
    of one or more curves (list of (n,) arrays). Returns a ``scaling.ScalingFit``."""
    from fusion_vlm.analysis.scaling import fit_scaling_law

    ns, vals = [], []
    for curve in phi_curves:
        curve = np.asarray(curve, dtype=float)
        for i in range(1, curve.size):
            if curve[i] > 0:
                ns.append(i + 1)
                vals.append(curve[i])
    return fit_scaling_law(ns, vals)
