"""Chapter 08 — Loki: low-rank keys for efficient sparse attention
(Singhania et al., NeurIPS 2024, arXiv 2406.02542).

Three pieces, each plugged into a transformers model through its own
attention-function mechanism (``AttentionInterface``), never by copying model code:

1. **Capture** (:class:`Statistics`, :func:`capture`): running covariances of the
   keys (before and after the rotary embedding), queries, values, and of the hidden
   states that feed the key projection, per layer and per key/value head.
   From them: the rank that explains 90% of the variance (the paper's Fig. 1
   statistic) and the PCA basis of the post-rotary keys.
2. **Loki attention** (:func:`loki_attention`): for every query, approximate
   scores in the first ``d = d_f·D`` PCA dimensions,

       s̃ = (q P_d)(K P_d)ᵀ,                        (paper, Alg. 1)

   keep the top ``k`` keys, and attend exactly to those only. How many: the
   official code's rule (``"window"``, the paper's protocol) keeps ``int(k_f·S)``
   keys for every query of an S-token window, so early queries keep all they see;
   the decode-realistic ``"position"`` rule keeps ``ceil(k_f·n)`` of the ``n`` keys
   query n sees. The basis is the official code's too: sklearn's (centred) PCA of
   the post-rotary keys, applied without subtracting the mean. Variants for the
   references: ``oracle`` (top-k by the exact scores) and ``random`` (the same
   budget in a random orthogonal basis).
3. **Decoding-step timing** (:func:`decode_step_seconds`): dense attention vs
   Loki for one new token against a KV cache of S tokens, beside the matmul cost
   model ``dense / loki = 2 / (d_f + 2 k_f)``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .lm import model_windows, perplexity, token_windows  # noqa: F401  (the chapter calls them as loki.*)

PRESETS = {
    "smoke": {
        "model_names": ["tiny-llama"], "calibration_text": "synthetic", "evaluation_text": "synthetic",
        "window": 64, "calibration_windows": 2, "evaluation_windows": 1,
        "k_fractions": [0.25, 0.5], "d_fractions": [0.25, 0.5],
        "contexts": [256, 512], "timing_repeats": 3, "random_init_control": True, "device": "cpu",
        "seed": 0, "threads": 2,
    },
    "book": {
        "model_names": ["smollm2-135m", "gemma3-270m"], "calibration_text": "shakespeare", "evaluation_text": "moby-dick",
        "window": 512, "calibration_windows": 2, "evaluation_windows": 2,
        "k_fractions": [0.125, 0.25, 0.5], "d_fractions": [0.125, 0.25, 0.5],
        "contexts": [1024, 2048, 4096, 8192, 16384], "timing_repeats": 20, "random_init_control": True,
        "device": "cpu", "seed": 0, "threads": 2,
    },
    "paper": {
        "model_names": ["llama2-7b", "llama2-13b"], "calibration_text": "wikitext-2-train",
        "evaluation_text": "wikitext-2-test",
        "window": 4096, "calibration_windows": 4, "evaluation_windows": 16,
        "k_fractions": [0.125, 0.25, 0.5], "d_fractions": [0.125, 0.25, 0.5],
        "contexts": [1024, 2048, 4096, 8192, 16384], "timing_repeats": 50,
        "random_init_control": False,  # a random 7B model on the CPU would need 28 GB
        "device": "auto", "seed": 0, "threads": 2,
    },
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from .config import flag, integer, items, model, number, one_of, text_name

    return {
        "model_names": items(model("causal-lm")),
        "calibration_text": text_name(),
        "evaluation_text": text_name(),
        "window": integer(8),
        "calibration_windows": integer(1),
        "evaluation_windows": integer(1),
        "k_fractions": items(number(above=0, maximum=1), increasing=True),
        "d_fractions": items(number(above=0, maximum=1), increasing=True),
        "contexts": items(integer(1), increasing=True),
        "timing_repeats": integer(1),
        "random_init_control": flag(),
        "device": one_of("cpu", "cuda", "auto"),
        "seed": integer(0),
        "threads": integer(1),
    }
# the paper's operating point, where C2 and C3 are judged
K_F, D_F = 0.25, 0.25
# how many keys a query keeps (select_topk). "window" is the official implementation's
# (hpcgroup/loki, methods/pca_topk: topk = int(top_k * S) over the masked scores of the
# window); "position" is what decoding token by token would do, a harsher test
RULES = ("window", "position")
PAPER_RULE = "window"
# which heads share one selection under grouped-query attention: each query head its own
# (the chapter's protocol; the paper's Llama-2 models have one query head per key/value head,
# where the two coincide), or one per key/value head, chosen by the sum of its query heads'
# approximate scores, (Σ_g q_g P_d)(K P_d)ᵀ, so a kernel reads each selected key once (a finding)
SCOPES = ("query_head", "kv_head")
PAPER_SCOPE = "query_head"

ATTENTION_NAME = "loki"
SELECTORS = ("dense", "pca", "random", "oracle")
KINDS = ("key_pre", "key_post", "query_pre", "query_post", "value", "hidden")


# ----------------------------------------------------------------------------- statistics

class RunningCovariance:
    """Mean and covariance of vectors seen in batches (float64 sums)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def covariance(self) -> torch.Tensor:
        mean = self.sum / self.n
        return self.outer / self.n - torch.outer(mean, mean)

    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ], not centred: its eigenvectors are the directions of the vectors' energy,
        which is what a dot product q·k sees (the mean direction included)."""
        return self.outer / self.n


def rank_at(covariance: torch.Tensor, fraction: float = 0.9) -> int:
    """Number of principal components that explain ``fraction`` of the variance."""
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0).clamp(min=0)
    explained = eigenvalues.cumsum(0) / eigenvalues.sum()
    return int((explained < fraction - 1e-12).sum().item()) + 1


def pca_basis(covariance: torch.Tensor) -> torch.Tensor:
    """Columns = principal directions, by decreasing variance (an orthogonal D×D matrix)."""
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    return vectors.flip(1).float()


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@dataclass
class Statistics:
    """Covariances per (kind, layer, head) gathered by :func:`capture`."""

    head_dim: int
    covariances: dict[tuple[str, int, int], RunningCovariance] = field(default_factory=dict)
    tokens: int = 0

    def add(self, kind: str, layer: int, x: torch.Tensor) -> None:
        """``x``: [batch, heads, seq, dim] (or [batch, seq, dim] for one 'head')."""
        if x.dim() == 3:
            x = x[:, None]
        for head in range(x.shape[1]):
            key = (kind, layer, head)
            if key not in self.covariances:
                self.covariances[key] = RunningCovariance(x.shape[-1])
            self.covariances[key].add(x[:, head].detach().float().cpu())

    def layers(self) -> list[int]:
        return sorted({layer for _, layer, _ in self.covariances})

    def heads(self, kind: str, layer: int) -> list[int]:
        return sorted(h for k, l, h in self.covariances if k == kind and l == layer)

    def ranks(self, kind: str, fraction: float = 0.9) -> np.ndarray:
        """[layers, heads] rank at ``fraction`` of the variance."""
        return np.array([[rank_at(self.covariances[(kind, layer, h)].covariance(), fraction)
                          for h in self.heads(kind, layer)] for layer in self.layers()])

    def projected_ranks(self, head_dim: int, seed: int = 0, fraction: float = 0.9) -> np.ndarray:
        """Reference: the same hidden states through a *random* key projection
        (Gaussian, head_dim outputs) — the rank the keys would have if W_k were not trained."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for layer in self.layers():
            cov = self.covariances[("hidden", layer, 0)].covariance()
            row = []
            for _ in self.heads("key_pre", layer):
                w = torch.randn(head_dim, cov.shape[0], generator=g, dtype=torch.float64)
                row.append(rank_at(w @ cov @ w.T, fraction))
            out.append(row)
        return np.array(out)

    def bases(self, kind: str = "key_post", centred: bool = True) -> torch.Tensor:
        """[layers, kv_heads, D, D] principal directions of ``kind``: of the centred
        covariance by default (textbook PCA, as the official code fits with sklearn), or
        of the second moment E[k kᵀ] (the keys' energy) if not ``centred``."""
        def matrix(acc: RunningCovariance) -> torch.Tensor:
            return acc.covariance() if centred else acc.second_moment()

        return torch.stack([torch.stack([pca_basis(matrix(self.covariances[(kind, layer, h)]))
                                         for h in self.heads(kind, layer)]) for layer in self.layers()])


def random_init_copy(model, seed: int):
    """The same architecture with freshly initialised weights (the random-init control)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()


def rank_table(stats: Statistics, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-layer median rank at 90% of the variance, as a fraction of the head dimension,
    for every captured kind and the random-projection reference."""
    table = {kind: np.median(stats.ranks(kind), axis=1) / head_dim
             for kind in ("key_pre", "key_post", "query_pre", "query_post", "value")}
    table["random_projection"] = np.median(stats.projected_ranks(head_dim, seed), axis=1) / head_dim
    return table


def isotropic_rank(head_dim: int, fraction: float = 0.9) -> int:
    """Reference: the rank at ``fraction`` for isotropic keys (all directions equal)."""
    return math.ceil(fraction * head_dim)


# ----------------------------------------------------------------------------- the attention function

@dataclass
class LokiSettings:
    """What the registered attention function does on the next forward pass."""

    selector: str = "dense"  # dense | pca | random | oracle | capture
    k_f: float = 1.0
    rule: str = PAPER_RULE  # how many keys a query keeps: RULES
    scope: str = PAPER_SCOPE  # which heads share a selection: SCOPES
    d_f: float = 1.0
    bases: torch.Tensor | None = None  # [layers, kv_heads, D, D]
    statistics: Statistics | None = None


SETTINGS = LokiSettings()


def _kv_index(n_q: int, n_kv: int) -> torch.Tensor:
    return torch.arange(n_q) // (n_q // n_kv)


def select_topk(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, k_f: float,
                basis: torch.Tensor | None, d_f: float, rule: str = PAPER_RULE,
                scope: str = PAPER_SCOPE) -> torch.Tensor:
    """The keys each query attends to, ranked by scores in the first ``d_f·D`` dimensions
    of ``basis`` (per kv head), or by the exact scores when ``basis`` is None: with
    ``rule="window"`` the top ``int(k_f · S)`` of the S keys (all it may see if fewer),
    with ``rule="position"`` the top ``ceil(k_f · n)`` of the ``n`` keys it may see
    (``allowed``). At least one key either way. ``scope="kv_head"``: the query heads of one
    key/value head share the keys their summed approximate scores rank highest.

    query [B, Hq, Sq, D], key [B, Hkv, Sk, D], allowed [B, 1 or Hq, Sq, Sk] (bool).
    Returns a bool mask [B, Hq, Sq, Sk].
    """
    n_q, n_kv, dim = query.shape[1], key.shape[1], query.shape[-1]
    key = repeat_kv(key, n_q // n_kv)
    if basis is None:
        approx = query @ key.transpose(-1, -2)
    else:
        d = max(1, round(d_f * dim))
        proj = basis[_kv_index(n_q, n_kv)][..., :d].to(query.dtype)  # [Hq, D, d]
        approx = (query @ proj) @ (key @ proj).transpose(-1, -2)  # s̃ = (q P_d)(K P_d)ᵀ
    if scope == "kv_head":  # one ranking per key/value head: the sum over its query heads
        b, _, sq, sk = approx.shape
        approx = approx.view(b, n_kv, n_q // n_kv, sq, sk).sum(2, keepdim=True).expand(
            b, n_kv, n_q // n_kv, sq, sk).reshape(b, n_q, sq, sk)
    elif scope != "query_head":
        raise ValueError(f"scope={scope!r}; choose one of: {', '.join(SCOPES)}")
    approx = approx.masked_fill(~allowed, float("-inf"))
    n_allowed = allowed.sum(-1, keepdim=True).expand(approx.shape[:-1] + (1,))
    if rule == "window":
        k = torch.clamp(n_allowed, max=int(k_f * key.shape[-2]))
    elif rule == "position":
        k = torch.ceil(k_f * n_allowed)
    else:
        raise ValueError(f"rule={rule!r}; choose one of: {', '.join(RULES)}")
    k = torch.clamp(k, min=1).long()
    largest = approx.topk(int(k.max()), dim=-1).values  # sorted, descending
    threshold = largest.gather(-1, k - 1)  # the k-th largest approximate score of each row
    return (approx >= threshold) & allowed


def loki_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers attention function (registered as ``"loki"``): dense, capture, or top-k."""
    s = SETTINGS
    layer = module.layer_idx
    if s.selector == "capture":
        s.statistics.add("key_post", layer, key)
        s.statistics.add("query_post", layer, query)
    if s.selector in ("dense", "capture"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap, **kwargs)
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is None:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)[None, None]
    else:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    basis = None if s.selector == "oracle" else s.bases[layer].to(query.device)
    selected = select_topk(query, key, allowed, s.k_f, basis, s.d_f, s.rule, s.scope)
    n_rep = query.shape[1] // key.shape[1]
    scores = (query @ repeat_kv(key, n_rep).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = scores.masked_fill(~selected, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
    out = weights @ repeat_kv(value, n_rep)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION_NAME, loki_attention)
# boolean causal (and sliding-window) masks, built by transformers for this implementation
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def using(model, selector: str = "dense", k_f: float = 1.0, d_f: float = 1.0, bases: torch.Tensor | None = None,
          statistics: Statistics | None = None, rule: str = PAPER_RULE, scope: str = PAPER_SCOPE) -> Iterator[None]:
    """Run ``model`` with Loki attention (or capture) inside the ``with`` block."""
    if selector not in (*SELECTORS, "capture"):
        raise ValueError(f"selector={selector!r}; choose one of: {', '.join(SELECTORS)}, capture")
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; choose one of: {', '.join(RULES)}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of: {', '.join(SCOPES)}")
    if selector in ("pca", "random") and bases is None:
        raise ValueError(f"selector={selector!r} needs bases")
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    SETTINGS.__init__(selector=selector, k_f=k_f, rule=rule, scope=scope, d_f=d_f, bases=bases, statistics=statistics)
    try:
        yield
    finally:
        SETTINGS.__init__()
        model.set_attn_implementation(previous)


# ----------------------------------------------------------------------------- capture

def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")]


@torch.no_grad()
def capture(model, token_windows: list[torch.Tensor], desc: str = "capture") -> Statistics:
    """Run the windows through the model and gather the covariances of keys (pre- and
    post-rotary), queries, values and the key projection's input, per layer and head.

    Pre-rotary keys/queries are the outputs of ``k_norm``/``q_norm`` where a model has
    them (Gemma-3), else of ``k_proj``/``q_proj``: the tensors RoPE is applied to."""
    attentions = _attention_modules(model)
    head_dim = attentions[0].head_dim
    stats = Statistics(head_dim)
    hooks = []

    def per_head(x: torch.Tensor) -> torch.Tensor:
        # projections give [B, S, H*D]; q_norm/k_norm (Gemma-3) act on the [B, H, S, D] view
        if x.dim() == 4:
            return x
        return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)

    for attn in attentions:
        layer = attn.layer_idx
        k_src = getattr(attn, "k_norm", None) or attn.k_proj
        q_src = getattr(attn, "q_norm", None) or attn.q_proj
        hooks += [
            k_src.register_forward_hook(lambda m, i, o, l=layer: stats.add("key_pre", l, per_head(o))),
            q_src.register_forward_hook(lambda m, i, o, l=layer: stats.add("query_pre", l, per_head(o))),
            attn.v_proj.register_forward_hook(lambda m, i, o, l=layer: stats.add("value", l, per_head(o))),
            attn.k_proj.register_forward_hook(lambda m, i, o, l=layer: stats.add("hidden", l, i[0])),
        ]
    try:
        with using(model, "capture", statistics=stats):
            for ids in tqdm(token_windows, desc=desc):
                model(ids[None].to(model.device))
                stats.tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return stats


# ----------------------------------------------------------------------------- evaluation

def random_bases(like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layers, heads, dim, _ = like.shape
    return torch.stack([torch.stack([random_orthogonal(dim, g) for _ in range(heads)]) for _ in range(layers)])


def quality_grid(model, windows, bases: torch.Tensor, k_fs, d_fs, seed: int = 0,
                 random_at: tuple[float, ...] = (0.25,), desc: str = "", rule: str = PAPER_RULE) -> list[dict]:
    """Perplexity for dense attention, exact top-k (oracle) per k_f, Loki-PCA over the
    k_f × d_f grid, and a random orthogonal basis at k_f in ``random_at`` for every d_f,
    all keeping keys by ``rule``."""
    runs = [("dense", 1.0, 1.0)] + [("oracle", k, 1.0) for k in k_fs]
    runs += [("pca", k, d) for k in k_fs for d in d_fs]
    runs += [("random", k, d) for k in random_at for d in d_fs]
    rand = random_bases(bases, seed)
    rows = []
    for selector, k_f, d_f in tqdm(runs, desc=desc or "perplexity grid"):
        chosen = rand if selector == "random" else bases
        with using(model, selector, k_f=k_f, d_f=d_f, bases=chosen, rule=rule):
            rows.append({"selector": selector, "k_f": k_f, "d_f": d_f, "perplexity": perplexity(model, windows)})
    return rows


# ----------------------------------------------------------------------------- speed

def cost_model_speedup(k_f: float, d_f: float) -> float:
    """Matmul work of dense attention over Loki for one decoding step:
    dense = 2·S·D (q·Kᵀ and p·V), Loki = S·d + 2·k·D  ⇒  2 / (d_f + 2 k_f)."""
    return 2.0 / (d_f + 2.0 * k_f)


def dense_decode_step(q, keys, values):
    """One new token: q [1, Hq, 1, D] against the cache keys/values [1, Hkv, S, D]."""
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def loki_decode_step(q, keys_pca, values, basis, k: int, d: int):
    """Loki for one new token (the torch implementation timed in C3). The cache holds keys
    already rotated into the PCA basis (``keys_pca = K P``, as Loki stores them), so the
    exact scores need only q P (P is orthogonal): approximate scores on the first d
    dimensions, top-k, exact attention over the k selected keys and values.

    q [1, Hq, 1, D]; keys_pca, values [1, Hkv, S, D]; basis [Hkv, D, D]."""
    n_q, n_kv, seq, dim = q.shape[1], keys_pca.shape[1], keys_pca.shape[2], q.shape[-1]
    group = n_q // n_kv
    q_pca = q.view(n_kv, group, dim) @ basis  # [Hkv, group, D]
    approx = q_pca[..., :d] @ keys_pca[0, :, :, :d].transpose(-1, -2)  # s̃: [Hkv, group, S]
    index = approx.topk(k, dim=-1, sorted=False).indices  # [Hkv, group, k]
    # one index_select over the flattened cache (much faster on a CPU than gather)
    rows = (index + torch.arange(n_kv)[:, None, None] * seq).reshape(-1)
    k_sel = keys_pca[0].reshape(-1, dim).index_select(0, rows).view(n_kv, group, k, dim)
    v_sel = values[0].reshape(-1, dim).index_select(0, rows).view(n_kv, group, k, dim)
    scores = (k_sel @ q_pca[..., None]).squeeze(-1) / math.sqrt(dim)  # [Hkv, group, k]
    out = (scores.softmax(-1)[..., None, :] @ v_sel).squeeze(-2)  # [Hkv, group, D]
    return out.reshape(1, n_q, 1, dim)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@torch.no_grad()
def decode_step_seconds(n_q_heads: int, n_kv_heads: int, head_dim: int, contexts, k_f: float, d_f: float,
                        repeats: int = 20, seed: int = 0, desc: str = "") -> list[dict]:
    """Median time of one attention call per decoding step, dense vs Loki, per context length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in tqdm(contexts, desc=desc or "decode-step timing"):
        q = torch.randn(1, n_q_heads, 1, head_dim, generator=g)
        keys = torch.randn(1, n_kv_heads, s, head_dim, generator=g)
        values = torch.randn(1, n_kv_heads, s, head_dim, generator=g)
        basis = torch.stack([random_orthogonal(head_dim, g) for _ in range(n_kv_heads)])
        keys_pca = keys @ basis[None]
        k, d = max(1, round(k_f * s)), max(1, round(d_f * head_dim))
        dense = _median_seconds(lambda: dense_decode_step(q, keys, values), repeats)
        loki = _median_seconds(lambda: loki_decode_step(q, keys_pca, values, basis, k, d), repeats)
        rows.append({"context": s, "dense_ms": dense * 1e3, "loki_ms": loki * 1e3, "speedup": dense / loki})
    return rows
