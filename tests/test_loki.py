"""Chapter 08's method (replbook.loki) on small inputs and the tiny random Llama."""
import math

import numpy as np
import pytest
import torch

from replbook import lm, loki
from test_lm import Letters  # the book's one fake tokenizer: a letter's id is its place in the alphabet + 2, BOS 1


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def ids(tiny):
    return tiny.tokenizer("the quick brown fox jumps over the lazy dog " * 4, return_tensors="pt").input_ids[0, :64]


def test_running_covariance_matches_numpy():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7) + 3
    acc = loki.RunningCovariance(6)
    acc.add(x[:200])
    acc.add(x[200:])
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(x.numpy().T, bias=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acc.second_moment().numpy(), (x.T @ x / 500).numpy(), rtol=1e-5)


def test_rank_at_counts_components_for_the_variance():
    assert loki.rank_at(torch.diag(torch.tensor([9.0, 0.5, 0.5]).double())) == 1  # 90% in one
    assert loki.rank_at(torch.diag(torch.tensor([5.0, 4.0, 1.0]).double())) == 2
    assert loki.rank_at(torch.eye(10).double()) == 9 == loki.isotropic_rank(10)


def test_pca_basis_is_orthogonal_and_sorted_by_variance():
    cov = torch.diag(torch.tensor([1.0, 5.0, 3.0]).double())
    basis = loki.pca_basis(cov)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-6, rtol=0)
    variances = torch.diagonal(basis.double().T @ cov @ basis.double())
    assert variances.tolist() == sorted(variances.tolist(), reverse=True)
    rand = loki.random_orthogonal(8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(rand.T @ rand, torch.eye(8), atol=1e-5, rtol=0)


def test_select_topk_keeps_ceil_kf_n_of_the_visible_keys():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    selected = loki.select_topk(q, k, allowed, 0.25, None, 1.0, rule="position")
    counts = selected.sum(-1)[0, 0]
    assert counts.tolist() == [math.ceil(0.25 * (i + 1)) for i in range(10)]
    assert not (selected & ~allowed).any(), "a masked (future) key was selected"


def test_the_official_window_rule_keeps_int_kf_s_keys_for_every_query_that_sees_that_many():
    """hpcgroup/loki keeps int(k_f·S) keys of an S-token window for every query; a query
    that sees fewer keeps all it sees (the rest of its top-k are masked)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    selected = loki.select_topk(q, k, allowed, 0.35, None, 1.0)  # the default is the paper's rule
    assert selected.sum(-1)[0, 0].tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]  # int(0.35 * 10) = 3
    assert not (selected & ~allowed).any()
    with pytest.raises(ValueError, match="rule='greedy'; choose one of: window, position"):
        loki.select_topk(q, k, allowed, 0.35, None, 1.0, rule="greedy")


def test_one_selection_per_kv_head_is_the_top_k_of_its_query_heads_summed_scores():
    """scope="kv_head": every query head of a group keeps the same keys, the top int(k_f·S) of
    (Σ_g q_g P_d)(K P_d)ᵀ (float64 reference, group sizes 1, 3 and 4); per query head they differ."""
    g = torch.Generator().manual_seed(5)
    for n_q, n_kv in [(2, 2), (6, 2), (4, 1)]:
        dim, d, seq = 8, 3, 12
        q, k = torch.randn(1, n_q, seq, dim, generator=g), torch.randn(1, n_kv, seq, dim, generator=g)
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        basis = torch.stack([loki.random_orthogonal(dim, g) for _ in range(n_kv)])
        shared = loki.select_topk(q, k, allowed, 0.25, basis, d / dim, scope="kv_head")
        group = n_q // n_kv
        for h in range(n_q):
            kv = h // group
            members = range(kv * group, (kv + 1) * group)
            p = basis[kv, :, :d].double()
            summed = sum(q[0, m].double() @ p for m in members) @ (k[0, kv].double() @ p).T  # [seq, seq]
            summed = summed.masked_fill(~allowed[0, 0], float("-inf"))
            for i in range(seq):
                keep = min(i + 1, int(0.25 * seq))
                expected = set(summed[i].topk(keep).indices.tolist())
                assert set(shared[0, h, i].nonzero().flatten().tolist()) == expected, (n_q, n_kv, h, i)
        own = loki.select_topk(q, k, allowed, 0.25, basis, d / dim)
        if group == 1:
            assert torch.equal(shared, own)
        else:
            assert not torch.equal(shared, own)
    with pytest.raises(ValueError, match="scope='layer'; choose one of: query_head, kv_head"):
        loki.select_topk(q, k, allowed, 0.25, basis, d / dim, scope="layer")


def test_full_basis_ranks_like_the_exact_scores():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    basis = torch.stack([loki.random_orthogonal(8, g) for _ in range(2)])
    assert torch.equal(loki.select_topk(q, k, allowed, 0.5, basis, 1.0), loki.select_topk(q, k, allowed, 0.5, None, 1.0))


def test_using_restores_attention_and_rejects_bad_selectors(tiny):
    before = tiny.model.config._attn_implementation
    with loki.using(tiny.model, "dense"):
        assert tiny.model.config._attn_implementation == loki.ATTENTION_NAME
    assert tiny.model.config._attn_implementation == before
    with pytest.raises(ValueError, match="choose one of: dense, pca, random, oracle"):
        with loki.using(tiny.model, "magic"):
            pass
    with pytest.raises(ValueError, match="needs bases"):
        with loki.using(tiny.model, "pca"):
            pass


@torch.no_grad()
def test_loki_with_every_key_and_dimension_is_full_attention(tiny, ids):
    stats = loki.capture(tiny.model, [ids])
    reference = tiny.model(ids[None]).logits
    for selector in ("pca", "random", "oracle"):
        bases = stats.bases() if selector != "random" else loki.random_bases(stats.bases(), 0)
        with loki.using(tiny.model, selector, k_f=1.0, d_f=1.0, bases=bases):
            torch.testing.assert_close(tiny.model(ids[None]).logits, reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_fewer_keys_change_the_output_and_pca_at_full_d_is_the_oracle(tiny, ids):
    stats = loki.capture(tiny.model, [ids])
    reference = tiny.model(ids[None]).logits
    with loki.using(tiny.model, "oracle", k_f=0.25):
        oracle = tiny.model(ids[None]).logits
    with loki.using(tiny.model, "pca", k_f=0.25, d_f=1.0, bases=stats.bases()):
        pca_full_d = tiny.model(ids[None]).logits
    assert not torch.allclose(oracle, reference, atol=1e-4)
    torch.testing.assert_close(pca_full_d, oracle, rtol=1e-4, atol=1e-4)


def test_capture_gathers_every_kind_for_every_layer_and_head(tiny, ids):
    stats = loki.capture(tiny.model, [ids, ids])
    config = tiny.model.config
    assert stats.layers() == list(range(config.num_hidden_layers)) and stats.tokens == 2 * len(ids)
    assert stats.heads("key_pre", 0) == stats.heads("key_post", 0) == list(range(config.num_key_value_heads))
    assert stats.heads("query_post", 0) == list(range(config.num_attention_heads))
    table = loki.rank_table(stats, stats.head_dim)
    assert set(table) == {"key_pre", "key_post", "query_pre", "query_post", "value", "random_projection"}
    assert all(0 < v <= 1 for values in table.values() for v in values)
    assert stats.bases().shape == (config.num_hidden_layers, config.num_key_value_heads, stats.head_dim, stats.head_dim)


def test_decode_step_with_all_keys_is_dense_and_cost_model():
    g = torch.Generator().manual_seed(0)
    q, keys, values = torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)
    basis = torch.stack([loki.random_orthogonal(16, g) for _ in range(2)])
    torch.testing.assert_close(loki.loki_decode_step(q, keys @ basis[None], values, basis, 50, 16),
                               loki.dense_decode_step(q, keys, values), rtol=1e-5, atol=1e-5)
    assert loki.cost_model_speedup(0.25, 0.25) == pytest.approx(8 / 3)
    rows = loki.decode_step_seconds(6, 2, 16, [64], 0.25, 0.25, repeats=2)
    assert rows[0]["context"] == 64 and rows[0]["dense_ms"] > 0 and rows[0]["loki_ms"] > 0


def test_token_windows_and_perplexity(tiny):
    text = "abc " * 200
    windows = lm.token_windows(tiny.tokenizer, text, 32, 3)
    assert [len(w) for w in windows] == [32, 32, 32]
    with pytest.raises(ValueError, match="text too short"):
        lm.token_windows(tiny.tokenizer, "short", 32, 3)
    ppl = lm.perplexity(tiny.model, windows[:1])
    assert 1 < ppl < 10 * len(tiny.tokenizer)


def test_model_windows_start_every_window_with_bos_where_the_tokenizer_has_one():
    """Issue #28: Gemma's windows after the first lacked BOS (dense perplexity 76 vs 52)."""
    text = "abcdefghij" * 40
    with_bos = lm.model_windows(Letters(bos=1), text, 16, 3)
    assert [w[0].item() for w in with_bos] == [1, 1, 1] and all(len(w) == 16 for w in with_bos)
    assert (torch.cat([w[1:] for w in with_bos]) != 1).all(), "BOS only at the start of a window"
    without = lm.model_windows(Letters(bos=None), text, 16, 3)
    assert all(torch.equal(a, b) for a, b in zip(without, lm.token_windows(Letters(bos=None), text, 16, 3)))


def test_the_paper_preset_code_path_runs_on_a_tiny_locally_saved_llama(run_paper_preset_on_tiny_llama):
    """The paper preset (hub-style from_pretrained, device_map="auto", bf16, no random-init
    control) end to end, on a tiny Llama saved with save_pretrained and synthetic text."""
    saved = run_paper_preset_on_tiny_llama(
        "08_loki", model_lists=("model_names",), calibration_text="synthetic", evaluation_text="synthetic", window=64,
        calibration_windows=1, evaluation_windows=1, contexts=[256], timing_repeats=2)
    assert saved["preset"] == "paper" and saved["config"]["device"] == "auto"
    assert saved["config"]["random_init_control"] is False
    assert {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}


# ----------------------------------------------------------------------------- against a float64 reference
# Issue #28: with every key kept (k = S) a transposed projection, a wrong query-head -> kv-head
# basis, or a step that keeps the *lowest* scores all give full attention, so these tests keep
# fewer keys than there are, use a different basis per kv head, and compare with a plain float64
# loop over heads and positions written from the paper's definition (Loki, Alg. 1).

def _bases(n_kv: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([loki.random_orthogonal(dim, g) for _ in range(n_kv)])


def _reference_attention(q, k, v, basis, k_f, d_f, rule="position"):
    """Chapter 08's quality path, one query head and position at a time in float64: query i
    sees keys 0..i and keeps, of those, the ones with the largest scores in the first d_f D
    directions of its kv head's basis: ceil(k_f (i+1)) of them by the "position" rule,
    int(k_f S) (or all i+1 if fewer) by the official "window" rule; then it attends exactly
    over those."""
    q, k, v, basis = (t.double() for t in (q, k, v, basis))
    _, n_q, seq, dim = q.shape
    n_kv = k.shape[1]
    group, d = n_q // n_kv, max(1, round(d_f * dim))
    out = torch.zeros_like(q)
    for h in range(n_q):
        kv = h // group  # transformers' repeat_kv: query heads come in consecutive groups
        proj = basis[kv][:, :d]
        for i in range(seq):
            approx = (q[0, h, i] @ proj) @ (k[0, kv, :i + 1] @ proj).T
            count = math.ceil(k_f * (i + 1)) if rule == "position" else min(i + 1, int(k_f * seq))
            keep = approx.topk(max(1, count)).indices
            scores = k[0, kv, keep] @ q[0, h, i] / math.sqrt(dim)
            out[0, h, i] = scores.softmax(-1) @ v[0, kv, keep]
    return out


class _Attention(torch.nn.Module):
    """What loki_attention reads from the attention module: its layer and head size."""
    def __init__(self, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = 0, head_dim


@pytest.mark.parametrize("rule", loki.RULES)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_loki_attention_with_fewer_keys_matches_a_float64_reference(group, rule):
    n_kv, seq, dim = 2, 24, 8
    g = torch.Generator().manual_seed(group)
    q = torch.randn(1, n_kv * group, seq, dim, generator=g)
    k, v = torch.randn(1, n_kv, seq, dim, generator=g), torch.randn(1, n_kv, seq, dim, generator=g)
    bases = _bases(n_kv, dim, seed=10 + group)
    loki.SETTINGS.__init__(selector="pca", k_f=0.25, d_f=0.5, bases=bases[None], rule=rule)
    try:
        out, _ = loki.loki_attention(_Attention(dim), q, k, v, attention_mask=None)
    finally:
        loki.SETTINGS.__init__()
    expected = _reference_attention(q, k, v, bases, 0.25, 0.5, rule).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    # the reference is sharp enough to tell the plausible bugs apart
    wrong = _reference_attention(q, k, v, bases.transpose(-1, -2), 0.25, 0.5, rule).transpose(1, 2)
    assert not torch.allclose(wrong, expected, atol=1e-3), "a transposed basis would pass"
    if group > 1:
        swapped = _reference_attention(q, k, v, bases.flip(0), 0.25, 0.5, rule).transpose(1, 2)
        assert not torch.allclose(swapped, expected, atol=1e-3), "a wrong head -> basis mapping would pass"


def test_loki_attention_applies_the_model_s_logit_softcap_and_scaling():
    # Gemma 2 caps attention logits (tanh(s / cap) · cap); with every key kept, Loki must be the
    # model's own capped attention, or its perplexity ratio would compare two different models
    n_kv, group, seq, dim, cap, scaling = 1, 2, 6, 8, 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(1, n_kv * group, seq, dim, generator=g)
    k, v = 3 * torch.randn(1, n_kv, seq, dim, generator=g), torch.randn(1, n_kv, seq, dim, generator=g)
    loki.SETTINGS.__init__(selector="oracle", k_f=1.0, d_f=1.0)
    try:
        out, _ = loki.loki_attention(_Attention(dim), q, k, v, attention_mask=None, scaling=scaling, softcap=cap)
    finally:
        loki.SETTINGS.__init__()
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    expected = (scores.softmax(-1) @ v.double().repeat_interleave(group, 1)).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_the_timed_decode_step_with_fewer_keys_matches_a_float64_reference(group):
    n_kv, seq, dim, keep, d = 2, 40, 16, 7, 4
    g = torch.Generator().manual_seed(100 + group)
    q = torch.randn(1, n_kv * group, 1, dim, generator=g)
    keys, values = torch.randn(1, n_kv, seq, dim, generator=g), torch.randn(1, n_kv, seq, dim, generator=g)
    basis = _bases(n_kv, dim, seed=200 + group)
    got = loki.loki_decode_step(q, keys @ basis[None], values, basis, keep, d)
    # the last position sees every key: the reference's k_f that keeps exactly `keep` of `seq`
    full_q = torch.cat([torch.zeros(1, n_kv * group, seq - 1, dim), q], dim=2)
    expected = _reference_attention(full_q, keys, values, basis, keep / seq, d / dim)[:, :, -1:]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_a_planted_top_k_is_what_loki_selects_and_the_lowest_scores_are_not():
    """Keys planted along the query's direction in the basis's first d dimensions must be the
    selected ones; the rest point away."""
    dim, seq, d = 8, 16, 2
    basis = _bases(1, dim, seed=7)
    planted = [3, 9, 12, 14]
    q = torch.zeros(1, 1, seq, dim)
    q[0, 0, -1] = basis[0][:, 0] * 3  # the last query points along the first basis direction
    coords = -torch.rand(seq, dim, generator=torch.Generator().manual_seed(8))  # every key points away
    coords[planted, 0] = torch.tensor([5.0, 4.0, 6.0, 4.5])  # ... except the planted ones
    k = (coords @ basis[0].T)[None, None]  # keys expressed back in the model's coordinates
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    selected = loki.select_topk(q, k, allowed, len(planted) / seq, basis, d / dim, rule="position")
    assert torch.nonzero(selected[0, 0, -1]).flatten().tolist() == planted


def test_the_basis_of_keys_in_a_known_subspace_spans_it_and_finds_the_exact_top_k():
    """A known basis: keys that live in a 2-D subspace have the second-moment PCA basis
    (the chapter's) with that subspace first, so Loki at d = 2 ranks keys exactly."""
    g = torch.Generator().manual_seed(3)
    dim, seq = 8, 64
    subspace = torch.linalg.qr(torch.randn(dim, 2, generator=g)).Q  # [D, 2]
    keys = torch.randn(seq, 2, generator=g) * torch.tensor([3.0, 1.0]) @ subspace.T
    acc = loki.RunningCovariance(dim)
    acc.add(keys)
    basis = loki.pca_basis(acc.second_moment())
    top2 = basis[:, :2].double()
    torch.testing.assert_close(top2 @ top2.T, (subspace @ subspace.T).double(), atol=1e-5, rtol=0)
    q = torch.randn(1, 1, seq, dim, generator=g)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    k = keys[None, None]
    assert torch.equal(loki.select_topk(q, k, allowed, 0.25, basis[None], 2 / dim),
                       loki.select_topk(q, k, allowed, 0.25, None, 1.0))
    assert not torch.equal(loki.select_topk(q, k, allowed, 0.25, basis.flip(-1)[None], 2 / dim),
                           loki.select_topk(q, k, allowed, 0.25, None, 1.0)), "the last directions would pass"


@torch.no_grad()
def test_the_key_basis_is_built_from_post_rotary_keys(tiny, ids):
    """Loki's basis is the PCA of the keys attention scores are made from: after RoPE. The
    captured "key_post" second moments must equal those of k_proj's output rotated here by
    the model's own rotary embedding, and differ from the pre-rotary ones."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, config = tiny.model, tiny.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    pre = {}
    hooks = [a.k_proj.register_forward_hook(lambda m, i, o, l=a.layer_idx: pre.__setitem__(l, o))
             for a in loki._attention_modules(model)]
    try:
        stats = loki.capture(model, [ids])
    finally:
        for h in hooks:
            h.remove()
    positions = torch.arange(len(ids))[None]
    for layer, out in pre.items():
        keys = out.reshape(1, len(ids), -1, head_dim).transpose(1, 2)  # [1, Hkv, S, D]
        cos, sin = model.model.rotary_emb(keys, positions)
        _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
        for h in range(config.num_key_value_heads):
            x = rotated[0, h].double()
            captured = stats.covariances[("key_post", layer, h)].second_moment().double()
            torch.testing.assert_close(captured, x.T @ x / len(ids), rtol=1e-4, atol=1e-5)
            unrotated = keys[0, h].double()
            assert not torch.allclose(captured, unrotated.T @ unrotated / len(ids), rtol=1e-3, atol=1e-4)
    assert torch.equal(stats.bases(), stats.bases("key_post")), "the chapter's default basis must be post-rotary"
