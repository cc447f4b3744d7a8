"""Chapter 08's method (replbook.loki) on small inputs and the tiny random Llama."""
import math

import numpy as np
import pytest
import torch

from replbook import lm, loki


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
    selected = loki.select_topk(q, k, allowed, 0.25, None, 1.0)
    counts = selected.sum(-1)[0, 0]
    assert counts.tolist() == [math.ceil(0.25 * (i + 1)) for i in range(10)]
    assert not (selected & ~allowed).any(), "a masked (future) key was selected"


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


def test_the_paper_preset_code_path_runs_on_a_tiny_locally_saved_llama(run_paper_preset_on_tiny_llama):
    """The paper preset (hub-style from_pretrained, device_map="auto", bf16, no random-init
    control) end to end, on a tiny Llama saved with save_pretrained and synthetic text."""
    saved = run_paper_preset_on_tiny_llama(
        "08_loki", model_lists=("model_names",), calibration_text="synthetic", evaluation_text="synthetic", window=64,
        calibration_windows=1, evaluation_windows=1, contexts=[256], timing_repeats=2)
    assert saved["preset"] == "paper" and saved["config"]["device"] == "auto"
    assert saved["config"]["random_init_control"] is False
    assert {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}
