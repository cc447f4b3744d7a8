"""Chapter 04's format (replbook.endor) and its decompression kernel."""
import pytest
import torch

from replbook import endor
from replbook_kernels import bitmap_decode, bitmap_decode_reference


def sparse(rows, cols, sparsity, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                                                     b.view(torch.int16 if b.element_size() == 2 else torch.int32))


CASES = {
    "odd shape": sparse(37, 1003, 0.5),
    "one column": sparse(9, 1, 0.5),
    "empty rows": sparse(20, 64, 0.5).index_fill_(0, torch.tensor([0, 7, 19]), 0),
    "all zero": torch.zeros(5, 13, dtype=torch.float16),
    "all dense": torch.randn(6, 17).half() + 10,
    "no rows": torch.zeros(0, 8, dtype=torch.float16),
    "bf16": sparse(11, 70, 0.7, torch.bfloat16),
    "fp32": sparse(11, 70, 0.3, torch.float32),
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_bit_exact_in_memory_and_through_a_file(name, tmp_path):
    dense = CASES[name]
    packed = endor.encode(dense)
    assert same_bits(endor.decode(packed), dense)
    nbytes = endor.save(tmp_path / "w.endor", packed)
    assert nbytes == (tmp_path / "w.endor").stat().st_size
    assert same_bits(endor.decode(endor.load(tmp_path / "w.endor")), dense)


@pytest.mark.parametrize("name", [n for n in CASES if n != "no rows"])
def test_kernel_decodes_like_the_reference(name):
    packed = endor.encode(CASES[name])
    args = (packed.bitmap, packed.values, packed.row_offsets, packed.shape[1])
    assert same_bits(bitmap_decode(*args, block=64), bitmap_decode_reference(*args))
    assert same_bits(bitmap_decode(*args, block=64), CASES[name])


def test_negative_zero_is_kept():
    dense = torch.tensor([[0.0, -0.0, 1.0]], dtype=torch.float16)
    packed = endor.encode(dense)
    assert packed.nnz == 2 and same_bits(endor.decode(packed), dense)


def test_size_follows_one_plus_b_times_one_minus_s():
    for sparsity in (0.3, 0.5, 0.7, 0.9):
        dense = sparse(256, 1024, sparsity, seed=3)
        measured_s = 1 - endor.encode(dense).nnz / dense.numel()
        bits = 8 * endor.encode(dense).nbytes / dense.numel()
        # the row offsets add 64 bits for each of the rows + 1 entries
        assert bits == pytest.approx(endor.theoretical_bits_per_element(measured_s, 16) + 64 * 257 / dense.numel(),
                                     rel=1e-9)
    sizes = endor.array_bytes(sparse(256, 1024, 0.5))
    # at 50% sparsity CSR with 16-bit indices is no smaller than dense fp16; the bitmap is
    assert sizes["bitmap"] < sizes["dense"] < sizes["csr_int16"] < sizes["csr_int32"] < sizes["coo"]


def test_bad_files_fail_clearly(tmp_path):
    blob = endor.to_bytes(endor.encode(sparse(8, 40, 0.5)))
    with pytest.raises(endor.EndorFormatError, match="truncated"):
        endor.from_bytes(blob[:-3])
    with pytest.raises(endor.EndorFormatError, match="shorter than the"):
        endor.from_bytes(blob[:10])
    with pytest.raises(endor.EndorFormatError, match="not an Endor file"):
        endor.from_bytes(b"NOTENDOR" + blob[8:])
    corrupt = bytearray(blob)
    corrupt[-1] ^= 0xFF
    with pytest.raises(endor.EndorFormatError, match="corrupt"):
        endor.from_bytes(bytes(corrupt))
    unknown = bytearray(blob)
    unknown[8] = 99
    with pytest.raises(endor.EndorFormatError, match="unknown dtype code 99"):
        endor.from_bytes(bytes(unknown))
    (tmp_path / "cut.endor").write_bytes(blob[:-1])
    with pytest.raises(endor.EndorFormatError, match="cut.endor"):
        endor.load(tmp_path / "cut.endor")


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="2-D weights"):
        endor.encode(torch.zeros(4))
    with pytest.raises(TypeError, match="not supported"):
        endor.encode(torch.zeros(2, 2, dtype=torch.float64))
    packed = endor.encode(sparse(4, 20, 0.5))
    with pytest.raises(ValueError, match="row_offsets must have"):
        bitmap_decode(packed.bitmap, packed.values, packed.row_offsets[:-1], 20)
    with pytest.raises(ValueError, match="bitmap must be uint8"):
        bitmap_decode(packed.bitmap, packed.values, packed.row_offsets, 50)


def test_prune_zeroes_the_fraction_with_the_lowest_scores_in_every_row():
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5], [3.0, 1.0, -1.0, 2.0]])
    pruned = endor.prune(w, 0.5, "magnitude")
    assert pruned.tolist() == [[0.0, -4.0, 2.0, 0.0], [3.0, 0.0, 0.0, 2.0]]
    norms = torch.tensor([10.0, 0.1, 1.0, 1.0])  # feature 0 is loud, feature 1 is nearly silent
    wanda = endor.prune(w, 0.5, "wanda", norms)
    assert wanda.tolist() == [[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 2.0]]
    assert (endor.prune(torch.randn(7, 100), 0.3) == 0).sum(1).tolist() == [30] * 7


def test_prune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="choose one of: magnitude, wanda"):
        endor.prune(torch.ones(2, 2), 0.5, "random")
    with pytest.raises(ValueError, match="wanda needs input_norms"):
        endor.prune(torch.ones(2, 2), 0.5, "wanda")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        endor.prune(torch.ones(2, 2), 1.0)


def test_model_pruning_and_wanda_norms_on_the_tiny_llama():
    from replbook import models

    lm = models.load("tiny-llama", preset="smoke")
    linears = endor.prunable_linears(lm.model)
    config = lm.model.config
    assert len(linears) == 7 * config.num_hidden_layers  # q, k, v, o, gate, up, down per block
    ids = lm.tokenizer("some calibration text for the norms", return_tensors="pt").input_ids[0]
    norms = endor.input_norms(lm.model, [ids])
    assert set(norms) == set(linears)
    assert all(norms[n].shape == (m.in_features,) and (norms[n] >= 0).all() for n, m in linears.items())
    embeddings = lm.model.model.embed_tokens.weight.clone()
    pruned = endor.prune_model(lm.model, 0.5, "wanda", norms)
    for name, weight in pruned.items():
        zeros = (weight == 0).sum(1)
        assert (zeros >= round(0.5 * weight.shape[1])).all(), name
    assert torch.equal(lm.model.model.embed_tokens.weight, embeddings), "embeddings must stay untouched"


def test_files_on_disk_match_the_array_accounting(tmp_path):
    dense = sparse(64, 200, 0.5)
    on_disk = endor.write_formats(dense, tmp_path, "w")
    in_arrays = endor.array_bytes(dense)
    assert set(on_disk) == set(in_arrays)
    for fmt in on_disk:  # files add only a header (npy/npz/zip, or Endor's 40 bytes)
        assert 0 <= on_disk[fmt] - in_arrays[fmt] < 2048, fmt
    assert on_disk["bitmap"] - in_arrays["bitmap"] == endor._HEADER.size
    blob, seconds = endor.timed_read(tmp_path / "w.endor", cold=True)
    assert seconds > 0 and endor.decode(endor.from_bytes(blob)).equal(dense)
