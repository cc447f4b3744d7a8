"""Each triton kernel against its torch reference: interpreted on the CPU
(TRITON_INTERPRET=1, set in conftest), compiled when a GPU is present."""
import pytest
import torch

from replbook_kernels import gathered_scores, gathered_scores_reference, triton_available

# the CPU runs the kernels interpreted; where a GPU is present they run compiled there instead
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, seq_len, head_dim, selected", [(1, 8, 16, 1), (3, 100, 32, 37), (4, 256, 64, 128)])
def test_kernel_matches_reference(device, heads, seq_len, head_dim, selected):
    assert triton_available(device), "the kernel must actually run (TRITON_INTERPRET=1 on the CPU)"
    g = torch.Generator().manual_seed(heads * seq_len)
    q = torch.randn(heads, head_dim, generator=g).to(device)
    keys = torch.randn(heads, seq_len, head_dim, generator=g).to(device)
    index = torch.randint(0, seq_len, (heads, selected), generator=g).to(device)
    expected = gathered_scores_reference(q, keys, index)
    got = gathered_scores(q, keys, index, block_k=32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_is_the_definition():
    q = torch.tensor([[1.0, 2.0]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    index = torch.tensor([[2, 0]])
    assert gathered_scores_reference(q, keys, index).tolist() == [[3.0, 1.0]]


def test_half_precision_inputs_accumulate_in_fp32():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, generator=g).half()
    keys = torch.randn(2, 64, 64, generator=g).half()
    index = torch.randint(0, 64, (2, 64), generator=g)
    out = gathered_scores(q, keys, index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, gathered_scores_reference(q, keys, index), rtol=1e-3, atol=1e-3)


def test_non_power_of_two_head_dim_falls_back_to_reference():
    q, keys, index = torch.randn(1, 24), torch.randn(1, 10, 24), torch.tensor([[0, 9]])
    torch.testing.assert_close(gathered_scores(q, keys, index), gathered_scores_reference(q, keys, index))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(IndexError, match=r"index must lie in \[0, 10\)"):
        gathered_scores(torch.randn(1, 16), torch.randn(1, 10, 16), torch.tensor([[10]]))
    with pytest.raises(ValueError, match="expected q"):
        gathered_scores(torch.randn(16), torch.randn(1, 10, 16), torch.tensor([[1]]))


def test_recorded_gpu_measurements_are_correct_and_complete(repo_root):
    """The GPU reports kept in kernels/measurements must record a passing correctness check."""
    import json

    # paper_dryrun_*.json are dry-run records of whole chapters (tests/test_dryrun.py checks them)
    reports = sorted(p for p in (repo_root / "kernels" / "measurements").glob("*.json")
                     if not p.name.startswith("paper_dryrun_"))
    assert reports, "no GPU measurement recorded"
    for path in reports:
        report = json.loads(path.read_text())
        assert report["device"] and report["triton"], path.name
        if path.name.startswith("endor"):  # decode throughput rows, each checked bit-exact
            assert report["rows"] and all(r["bit_exact"] for r in report["rows"]), path.name
        else:
            assert report["speed"] and all(c["ok"] for c in report["correctness"]), path.name


# ----------------------------------------------------------------------------- Loki (chapter 08)
from replbook_kernels import (approx_scores, approx_scores_reference, loki_decode, topk_attention,
                              topk_attention_reference)


def _loki_inputs(device, heads=8, kv_heads=2, seq=256, dim=64, selected=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, dim, generator=g).to(device)
    keys = torch.randn(kv_heads, seq, dim, generator=g).to(device)
    values = torch.randn(kv_heads, seq, dim, generator=g).to(device)
    index = torch.randint(0, seq, (heads, selected), generator=g).to(device)
    return q, keys, values, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, kv_heads, seq, dim, d", [(4, 4, 64, 16, 4), (8, 2, 300, 64, 16), (2, 1, 128, 32, 32)])
def test_approx_scores_kernel_matches_reference(device, heads, kv_heads, seq, dim, d):
    q, keys, _, _ = _loki_inputs(device, heads, kv_heads, seq, dim)
    torch.testing.assert_close(approx_scores(q, keys, d), approx_scores_reference(q, keys, d), rtol=1e-5, atol=1e-5)


def test_approx_scores_with_all_dimensions_are_the_exact_scores():
    q, keys, _, _ = _loki_inputs("cpu", 4, 2, 64, 32)
    exact = torch.einsum("hsd,hd->hs", keys.repeat_interleave(2, 0), q)
    torch.testing.assert_close(approx_scores(q, keys, 32), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads, kv_heads, seq, dim, selected", [(4, 4, 64, 16, 1), (8, 2, 300, 64, 100), (2, 1, 128, 32, 70)])
def test_topk_attention_kernel_matches_reference(device, heads, kv_heads, seq, dim, selected):
    q, keys, values, index = _loki_inputs(device, heads, kv_heads, seq, dim, selected)
    torch.testing.assert_close(topk_attention(q, keys, values, index, dim ** -0.5),
                               topk_attention_reference(q, keys, values, index, dim ** -0.5), rtol=1e-5, atol=1e-5)


def test_loki_step_with_k_equal_S_and_d_equal_D_is_dense_attention():
    q, keys, values, _ = _loki_inputs("cpu", 8, 2, 128, 32)
    dense = torch.nn.functional.scaled_dot_product_attention(q[None, :, None], keys[None], values[None],
                                                             enable_gqa=True)[0, :, 0]
    torch.testing.assert_close(loki_decode(q, keys, values, 128, 32, 32 ** -0.5), dense, rtol=1e-5, atol=1e-5)


def test_loki_kernels_reject_bad_shapes():
    q, keys, values, index = _loki_inputs("cpu", 6, 4, 32, 16, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        approx_scores(q, keys, 4)
    q, keys, values, index = _loki_inputs("cpu", 4, 2, 32, 16, 8)
    with pytest.raises(ValueError, match="values must match keys"):
        topk_attention(q, keys, values[:, :5], index, 0.25)


def test_topk_attention_split_into_chunks_equals_one_pass():
    from replbook_kernels.loki import topk_attention as attend

    q, keys, values, index = _loki_inputs("cpu", 4, 2, 300, 32, 200)
    one = attend(q, keys, values, index, 0.2, block_k=32, chunk=256)
    many = attend(q, keys, values, index, 0.2, block_k=32, chunk=32)  # 7 chunks, the last one partial
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
