"""Chapter 04's format (replbook.endor) and its decompression kernel."""
import pytest
import torch

from replbook import endor
from replbook_kernels import (bitmap_decode, bitmap_decode_blocks, bitmap_decode_grouped,
                              bitmap_decode_grouped_reference, bitmap_decode_reference, bitmap_group)

# the two kernels: one program a row, and one program a block of columns (blocks of 64
# here, so the odd shapes span several, end mid-block and meet empty blocks)
KERNELS = {"row": bitmap_decode, "blocks": bitmap_decode_blocks}


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", [n for n in CASES if n != "no rows"])
def test_kernel_decodes_like_the_reference(name, kernel):
    packed = endor.encode(CASES[name])
    args = (packed.bitmap, packed.values, packed.row_offsets, packed.shape[1])
    assert same_bits(KERNELS[kernel](*args, block=64), bitmap_decode_reference(*args))
    assert same_bits(KERNELS[kernel](*args, block=64), CASES[name])


def test_the_file_is_byte_for_byte_the_written_format():
    """The format as the module docstring writes it, assembled here by hand (not by encode):
    header, then int64 row offsets, then the bitmap (each row padded to whole bytes, the
    first column in the most significant bit), then the values' bit patterns in row-major
    order. An encoder and decoder that agree on another bit order, or swap two sections,
    round-trip fine and fail here."""
    import struct
    import zlib

    dense = torch.zeros(2, 10, dtype=torch.float16)
    dense[0, 0], dense[0, 9], dense[1, 3] = 1.0, -2.0, 0.5  # columns 0 and 9 of row 0, column 3 of row 1
    offsets = struct.pack("<3q", 0, 2, 3)
    bitmap = bytes([0b1000_0000, 0b0100_0000,   # row 0: column 0 -> bit 7 of byte 0, column 9 -> bit 6 of byte 1
                    0b0001_0000, 0b0000_0000])  # row 1: column 3 -> bit 4 of byte 0
    values = struct.pack("<3e", 1.0, -2.0, 0.5)
    body = offsets + bitmap + values
    header = struct.pack("<8sB3xQQQI", b"ENDOR01\0", 1, 2, 10, 3, zlib.crc32(body))
    assert endor.to_bytes(endor.encode(dense)) == header + body
    assert same_bits(endor.decode(endor.from_bytes(header + body)), dense)


@pytest.mark.parametrize("decoder", ["reference", *KERNELS])
def test_rows_decode_from_their_stored_offsets(decoder):
    """Each row's values start where ``row_offsets`` says, as the format's spec and the
    kernel have it: with a junk value before every row's values and the offsets moved to
    match, the weight decodes unchanged; a decoder that counted set bits from the start
    (or from the first offset only) would read the junk."""
    dense = CASES["empty rows"]
    packed = endor.encode(dense)
    junk = torch.full((1,), 7.0, dtype=dense.dtype)
    starts, pieces = [], []
    for r in range(dense.shape[0]):
        row = packed.values[packed.row_offsets[r]:packed.row_offsets[r + 1]]
        starts.append(sum(len(p) for p in pieces) + 1)
        pieces += [junk, row]
    offsets = torch.tensor(starts + [sum(len(p) for p in pieces)], dtype=torch.int64)
    args = (packed.bitmap, torch.cat(pieces), offsets, packed.shape[1])
    decoded = bitmap_decode_reference(*args) if decoder == "reference" else KERNELS[decoder](*args, block=64)
    assert same_bits(decoded, dense)


def _as_matrix(packed):
    return packed.bitmap, packed.values, packed.row_offsets, packed.shape[1]


# a block's worth of matrices of unlike shapes: the widths differ at every boundary (a row read
# with a neighbour's width or bitmap stride decodes wrong), one matrix has no rows (it starts
# and ends at the same row) and one has no values
GROUP = ["odd shape", "one column", "no rows", "empty rows", "all zero", "all dense"]


@pytest.mark.parametrize("decoder", ["kernel", "reference"])
def test_a_group_of_matrices_decodes_each_one_exactly(decoder):
    group = bitmap_group([_as_matrix(endor.encode(CASES[name])) for name in GROUP])
    decoded = bitmap_decode_grouped(group, block=64) if decoder == "kernel" else bitmap_decode_grouped_reference(group)
    assert len(decoded) == len(GROUP)
    for name, weight in zip(GROUP, decoded):
        assert same_bits(weight, CASES[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_group_keeps_the_bit_patterns_of_other_dtypes(dtype):
    weights = [sparse(7, 45, 0.6, dtype, seed=1), sparse(12, 8, 0.4, dtype, seed=2)]
    group = bitmap_group([_as_matrix(endor.encode(w)) for w in weights])
    for weight, decoded in zip(weights, bitmap_decode_grouped(group, block=32)):
        assert same_bits(decoded, weight)


def test_a_group_is_decoded_in_one_launch(monkeypatch):
    """The point of the grouped decoder: one kernel launch for the whole block, not one a
    matrix (a loop over bitmap_decode would decode as exactly and be as launch-bound)."""
    from replbook_kernels import endor as kernels
    from test_kernels import count_launches

    launches = count_launches(monkeypatch, kernels, "bitmap_decode_grouped_kernel")
    monkeypatch.setattr(kernels, "bitmap_decode_kernel", None)
    monkeypatch.setattr(kernels, "bitmap_decode_blocks_kernel", None)
    group = bitmap_group([_as_matrix(endor.encode(CASES[name])) for name in GROUP])
    decoded = bitmap_decode_grouped(group, block=64)
    assert launches == [(sum(CASES[name].shape[0] for name in GROUP),)]  # one program a row of the block
    assert all(same_bits(weight, CASES[name]) for name, weight in zip(GROUP, decoded))


def test_a_group_reads_each_row_from_its_stored_offset():
    """Each matrix's values may sit anywhere in its own buffer (junk before every row here):
    the group moves each matrix's row offsets by where its values begin in the group, and
    the kernel starts every row there; counting set bits from the group's start would not."""
    matrices, weights = [], [CASES["empty rows"], CASES["odd shape"], CASES["bf16"].half()]
    junk = torch.full((1,), 7.0, dtype=torch.float16)
    for weight in weights:
        packed = endor.encode(weight)
        starts, pieces = [], []
        for r in range(weight.shape[0]):
            starts.append(sum(len(p) for p in pieces) + 1)
            pieces += [junk, packed.values[packed.row_offsets[r]:packed.row_offsets[r + 1]]]
        offsets = torch.tensor(starts + [sum(len(p) for p in pieces)], dtype=torch.int64)
        matrices.append((packed.bitmap, torch.cat(pieces), offsets, packed.shape[1]))
    group = bitmap_group(matrices)
    for decoded in (bitmap_decode_grouped(group, block=64), bitmap_decode_grouped_reference(group)):
        assert all(same_bits(d, w) for d, w in zip(decoded, weights))


def test_a_group_refuses_mixed_dtypes_and_no_matrices():
    with pytest.raises(ValueError, match="a group holds one"):
        bitmap_group([_as_matrix(endor.encode(CASES["fp32"])), _as_matrix(endor.encode(CASES["odd shape"]))])
    with pytest.raises(ValueError, match=r"matrices=\[\]"):
        bitmap_group([])
    packed = endor.encode(CASES["odd shape"])
    with pytest.raises(ValueError, match="row_offsets must have"):
        bitmap_group([(packed.bitmap, packed.values, packed.row_offsets[:-1], packed.shape[1])])


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
    assert sizes["bitmap"] < sizes["dense"] < sizes["csr_uint16"] < sizes["csr_int32"] < sizes["coo"]


def test_bad_files_fail_clearly(tmp_path):
    blob = endor.to_bytes(endor.encode(sparse(8, 40, 0.5)))
    with pytest.raises(endor.EndorFormatError, match="truncated"):
        endor.from_bytes(blob[:-3])
    # trailing bytes are as wrong as missing ones (two files concatenated, a partial overwrite);
    # unverified reads, which skip the CRC, must still refuse them
    with pytest.raises(endor.EndorFormatError, match="padded"):
        endor.from_bytes(blob + b"\0\0", verify=False)
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
    original = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    embeddings = lm.model.model.embed_tokens.weight.clone()
    pruned = endor.pruned_weights(original, 0.5, "wanda", norms)
    for name, weight in pruned.items():
        assert weight.dtype == torch.float16
        zeros = (weight == 0).sum(1)
        assert (zeros >= round(0.5 * weight.shape[1])).all(), name
    with endor.weights_swapped(lm.model, pruned):
        assert all(torch.equal(linears[n].weight, pruned[n].float()) for n in pruned)
    assert all(torch.equal(linears[n].weight, original[n]) for n in original), "originals must come back"
    assert torch.equal(lm.model.model.embed_tokens.weight, embeddings), "embeddings must stay untouched"


def test_weights_swapped_neither_writes_into_nor_copies_the_models_own_weights():
    """Chapter 04 prunes every set from the model's own tensors (endor.linear_weights, not
    copies) while other sets are swapped in and out. A swap that wrote into them (copy_) would
    make every later pruning start from a pruned model; one that put back a copy would have
    held a second model's worth of memory at the paper preset. An error inside the swap
    still puts the model's own weights back."""
    from replbook import models

    lm = models.load("tiny-llama", preset="smoke")
    own = endor.linear_weights(lm.model)
    linears = endor.prunable_linears(lm.model)
    assert all(own[n].data_ptr() == linears[n].weight.data_ptr() for n in own), "linear_weights must not copy"
    values = {n: w.clone() for n, w in own.items()}
    pruned = endor.pruned_weights(own, 0.5, "magnitude")
    with endor.weights_swapped(lm.model, pruned):
        assert all(torch.equal(own[n], values[n]) for n in own), "the model's own weights were written into"
        live = endor.linear_weights(lm.model)
        assert all(torch.equal(live[n], pruned[n].float()) and live[n].dtype == torch.float32 for n in pruned)
    back = endor.linear_weights(lm.model)
    assert all(back[n].data_ptr() == own[n].data_ptr() and torch.equal(back[n], values[n]) for n in own), \
        "the model's own tensors must come back, not copies"
    with pytest.raises(RuntimeError, match="inside"):
        with endor.weights_swapped(lm.model, pruned):
            raise RuntimeError("inside the swap")
    assert all(endor.linear_weights(lm.model)[n].data_ptr() == own[n].data_ptr() for n in own)


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


def test_csr_with_16_bit_indices_holds_opt_66b_widths(tmp_path):
    """OPT-66B's fc2 has 36,864 columns: its 16-bit CSR column indices must be unsigned
    (issue #28: int16 overflowed). Past 65,536 columns no 16-bit index fits."""
    import numpy as np

    dense = sparse(2, 36864, 0.5, seed=4)
    sizes = endor.write_formats(dense, tmp_path, "fc2")
    saved = np.load(tmp_path / "fc2.csr16.npz")
    assert saved["indices"].dtype == np.uint16 and sizes["csr_uint16"] < sizes["csr_int32"]
    rebuilt = torch.zeros(2, 36864, dtype=dense.dtype)
    for r in range(2):
        span = slice(saved["indptr"][r], saved["indptr"][r + 1])
        rebuilt[r, torch.from_numpy(saved["indices"][span].astype(np.int64))] = torch.from_numpy(saved["data"][span])
    assert same_bits(rebuilt, dense), "a column index past 32,767 came back wrong"
    with pytest.raises(ValueError, match="65537 columns do not fit 16-bit CSR indices"):
        endor.write_formats(torch.zeros(1, 65537, dtype=torch.float16), tmp_path, "too-wide")


def test_format_bytes_sums_every_weight_and_leaves_no_files(tmp_path):
    weights = {"a": sparse(16, 40, 0.5, seed=1), "b": sparse(8, 24, 0.7, seed=2)}
    totals = endor.format_bytes(weights, tmp_path)
    one_by_one = [endor.write_formats(w, tmp_path / n, n) for n, w in weights.items()]
    assert totals == {fmt: sum(sizes[fmt] for sizes in one_by_one) for fmt in totals}
    assert not list(tmp_path.glob("*.*")), "format_bytes must delete what it measured"


def test_round_trip_check_can_fail(monkeypatch):
    weights = {"w": sparse(8, 40, 0.5)}
    assert endor.round_trip_exact(weights)
    monkeypatch.setattr(endor, "decode", lambda packed: torch.zeros(packed.shape, dtype=packed.dtype))
    assert not endor.round_trip_exact(weights)


def test_offloaded_inference_matches_the_pruned_model_in_both_layouts(tmp_path):
    """Accelerate's disk offloading and the Endor weight map, on the tiny Llama: same
    logits as the pruned in-memory model, same tokens, and Endor reads fewer bytes."""
    from replbook import models

    lm = models.load("tiny-llama", preset="smoke")
    endor.round_to_storage(lm.model)
    original = {n: m.weight.detach().clone() for n, m in endor.prunable_linears(lm.model).items()}
    pruned = endor.pruned_weights(original, 0.5, "magnitude")
    prompt = lm.tokenizer("offloaded inference", return_tensors="pt").input_ids[0]
    with endor.weights_swapped(lm.model, pruned), torch.no_grad():
        reference = lm.model(prompt[None]).logits[0]
        sizes = {fmt: endor.write_offload(lm.model, tmp_path / fmt, fmt) for fmt in endor.OFFLOAD_FORMATS}
    assert sizes["accelerate"]["compressed"] == 0 and sizes["endor"]["compressed"] > 0
    assert len(list((tmp_path / "endor").glob("*.endor"))) == len(pruned)
    runs = {}
    for fmt in endor.OFFLOAD_FORMATS:
        loader = endor.OffloadedWeights(tmp_path / fmt)
        model = endor.offloaded_model(lm.model.config, loader)
        assert all(p.device.type == "meta" for p in model.parameters()), "an offloaded model holds no weights"
        runs[fmt] = endor.offloaded_generation(model, loader, prompt, 3)
        assert torch.equal(runs[fmt]["first_logits"], reference), fmt
        assert len(runs[fmt]["steps"]) == 3 and all(s["read"] > 0 for s in runs[fmt]["steps"])
    assert runs["accelerate"]["tokens"] == runs["endor"]["tokens"]
    assert runs["endor"]["steps"][1]["bytes"] < runs["accelerate"]["steps"][1]["bytes"]
    assert all(s["decode"] == 0 for s in runs["accelerate"]["steps"])
    summary = endor.per_token_summary(runs["endor"])
    assert summary["decode"] > 0 and summary["other"] >= 0
    assert endor.read_bandwidth(tmp_path / "endor") > 0
    assert endor.decode_throughput(pruned, repeats=1) > 0
    with pytest.raises(ValueError, match="choose one of: accelerate, endor"):
        endor.write_offload(lm.model, tmp_path / "x", "csr")


def test_bandwidth_model():
    # dense baseline: bytes over each hop in turn, plus compute
    assert endor.token_seconds(10e9, [5, 10], other_seconds=1) == pytest.approx(2 + 1 + 1)
    # compressed: fewer bytes on the wire, plus decoding the dense bytes
    t = endor.token_seconds(10e9, [5], compressible=0.5, ratio=2.0, decode_gbps=100)
    assert t == pytest.approx((5e9 + 2.5e9) / 5e9 + 5e9 / 100e9)
    # a known setting generates the paper-style numbers; the fit recovers it
    truth = endor.PaperSetting(overhead=0.05, ssd_share=0.7)
    shares = {"a": 0.99, "b": 0.98}
    reported = {m: truth.speedups(1.78, f) for m, f in shares.items()}
    fitted = endor.PaperSetting.fit(reported, 1.78, shares)
    assert fitted.overhead == pytest.approx(0.05, abs=2e-3) and fitted.ssd_share == pytest.approx(0.7, abs=2e-3)
    # with no overhead the host-path speedup is the compression bound 1 / w
    assert endor.PaperSetting(0.0, 1.0).speedups(2.0, 1.0)["host"] == pytest.approx(2.0)


def test_paper_models_compressible_share_matches_the_published_size():
    llama = endor.PAPER_MODELS["meta-llama/Llama-2-70b-hf"]
    h = llama["hidden"]
    linears = llama["layers"] * (2 * h * h + 2 * h * llama["kv_dim"] + 3 * h * llama["mlp"])
    embeddings = 2 * llama["vocab"] * h
    norms = (2 * llama["layers"] + 1) * h
    assert linears + embeddings + norms == 68_976_648_192  # Llama-2-70B's parameter count
    assert endor.compressible_share(llama) == pytest.approx(linears / (linears + embeddings))
    assert endor.parameter_count(llama) == linears + embeddings  # the norms (0.001%) left out
    assert 0.99 < endor.compressible_share(endor.PAPER_MODELS["facebook/opt-66b"]) < 1
    assert endor.parameter_count(endor.PAPER_MODELS["facebook/opt-66b"]) / 1e9 == pytest.approx(65.7, abs=0.1)


def test_the_paper_preset_code_path_runs_on_a_tiny_locally_saved_llama(run_paper_preset_on_tiny_llama, tmp_path):
    """The paper preset (hub-style from_pretrained, fp16 models, offload_dir given) end to
    end on a tiny Llama, synthetic text, and the CPU."""
    saved = run_paper_preset_on_tiny_llama(
        "04_endor", model_lists=("model_names", "offload_model_names"), calibration_text="synthetic",
        evaluation_text="synthetic", window=32, calibration_windows=1, evaluation_windows=1, sparsities=[0.5, 0.9],
        new_tokens=2, device="cpu", threads=2, offload_dir=str(tmp_path / "ssd"))
    assert saved["preset"] == "paper" and saved["config"]["load_dtype"] == "float16"
    assert {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}
    assert (tmp_path / "ssd").is_dir() and not list((tmp_path / "ssd").iterdir()), "offload files are removed"


# ----------------------------------------------------------------------------- C3 on a GPU (the recorded run)

def test_offload_speed_run_times_both_layouts_of_a_model_built_from_its_config(tmp_path, monkeypatch):
    """The GPU run's pipeline on the CPU, with a tiny config in place of the paper model's:
    both layouts written and timed, the pruned layers compressed about 1.78-fold, the same
    tokens from both, and the speedup and the ceiling computed from the record's own parts."""
    import transformers

    from replbook import architectures

    tiny = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    monkeypatch.setattr(architectures, "config_of", lambda name, layers=None: transformers.LlamaConfig(
        **{**tiny.to_dict(), "num_hidden_layers": layers}))
    record = endor.offload_speed_on_gpu("meta-llama/Llama-2-70b-hf", 2, tmp_path, new_tokens=3, device="cpu")
    assert record["layers"] == 2 and record["vocab_cut_to"] == endor.OFFLOAD_VOCAB
    assert record["tokens_identical"] and record["first_logits_identical"]
    per_token = record["per_token"]
    assert record["speedup"] == pytest.approx(per_token["accelerate"]["seconds"] / per_token["endor"]["seconds"])
    assert record["seconds_per_token_per_layer"]["endor"] == pytest.approx(per_token["endor"]["seconds"] / 2)
    assert 1.6 < record["ratio_r"] < 1.8  # 64-wide rows: the offsets cost more than at paper width
    assert record["ceiling"] == pytest.approx(1 / endor.wire_fraction(record["share_compressible_f"], record["ratio_r"]))
    # the Endor layout reads fewer bytes per token than Accelerate's
    assert per_token["endor"]["bytes"] < 0.7 * per_token["accelerate"]["bytes"]


def test_c3_gpu_rule_is_eighty_percent_of_the_ceiling():
    record = {"device": "GPU", "models": [{"model": "a", "layers": 2, "ceiling": 1.75, "speedup": 1.41},
                                          {"model": "b", "layers": 2, "ceiling": 1.75, "speedup": 1.39}]}
    assert list(endor.c3_gpu_checks(record).values()) == [True, False]


def test_the_recorded_gpu_offload_run_is_complete_and_its_checks_follow_the_rule(repo_root):
    import json

    records = sorted((repo_root / "kernels" / "measurements").glob("endor_offload_*.json"))
    for path in records:
        record = json.loads(path.read_text())
        assert {m["model"] for m in record["models"]} == set(endor.PAPER_MODELS), path.name
        for m in record["models"]:
            assert m["tokens_identical"] and m["first_logits_identical"], (path.name, m["model"])
            assert m["speedup"] == pytest.approx(m["per_token"]["accelerate"]["seconds"] / m["per_token"]["endor"]["seconds"])
        assert record["checks"] == endor.c3_gpu_checks(record), path.name  # not edited by hand


def test_at_the_break_even_bandwidth_compression_neither_gains_nor_loses():
    # B* = D (1 − w) / f is where the transfer saved equals the decode time: one token over a
    # link of B* takes as long compressed as dense, and compression pays only below it
    for decode_gbps, share, ratio in ((10.0, 0.8, 2.0), (40.0, 0.5, 1.6), (5.0, 1.0, 3.0)):
        link = endor.break_even_gbps(decode_gbps, share, ratio)
        dense = endor.token_seconds(1e9, [link])
        compressed = endor.token_seconds(1e9, [link], compressible=share, ratio=ratio, decode_gbps=decode_gbps)
        assert compressed == pytest.approx(dense, rel=1e-12)
        slower = [link / 2]
        assert endor.token_seconds(1e9, slower, compressible=share, ratio=ratio,
                                   decode_gbps=decode_gbps) < endor.token_seconds(1e9, slower)
    assert endor.wire_fraction(0.8, 2.0) == pytest.approx(0.6)  # (1 − f) + f / r
