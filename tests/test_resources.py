"""Resource cards (issue #29): arithmetic from the public configs, checked against numbers
known independently, moved by the presets they describe, and shown current on the page."""
import pytest
from conftest import ROOT

from replbook import resources


def test_weights_and_kv_cache_match_well_known_sizes():
    # Llama-2-7B: 6.74 B parameters, 13.5 GB in fp16; its KV cache is 0.5 MB a token in fp16
    row = resources.weights("meta-llama/Llama-2-7b-hf", "float16")
    assert row.gigabytes == pytest.approx(13.48, abs=0.05)
    kv = resources.kv_cache("meta-llama/Llama-2-7b-hf", 4096, 1, "float16")
    assert kv.gigabytes == pytest.approx(2 * 32 * 4096 * 4096 * 2 / 1e9)
    # grouped-query attention: Llama-2-70B keeps 8 of 64 heads' keys and values
    gqa = resources.kv_cache("meta-llama/Llama-2-70b-hf", 4096, 1, "float16")
    assert gqa.gigabytes == pytest.approx(2 * 80 * 8 * 128 * 4096 * 2 / 1e9)


def test_activation_formula_is_korthikanti_eq_1():
    row = resources.activations("x", layers=2, hidden=1024, heads=16, tokens=512, batch=4, dtype="bfloat16")
    assert row.gigabytes == pytest.approx(2 * 512 * 4 * 1024 * (34 + 5 * 16 * 512 / 1024) / 1e9)
    fp32 = resources.activations("x", layers=2, hidden=1024, heads=16, tokens=512, batch=4, dtype="float32")
    assert fp32.gigabytes == pytest.approx(2 * row.gigabytes)
    state = resources.adamw_state("x", 1_000_000_000, "float32")
    assert state.gigabytes == pytest.approx(12.0)


def test_every_chapter_has_a_card_and_totals_add_their_rows():
    for slug in resources.CARDS:
        card = resources.card(slug)
        assert card.gpu and card.disk, slug
        known = [r.gigabytes for r in card.gpu if r.gigabytes is not None]
        assert card.peak_gb == pytest.approx(sum(known)), slug
        assert all(r.formula for r in card.gpu + card.host + card.disk), slug
    with pytest.raises(ValueError, match="no resource card"):
        resources.card("99_nothing")


def test_a_card_follows_its_preset(monkeypatch):
    """Change the preset and the card moves: the longest timing context sets 08's KV row,
    the number of corrupted copies and the band's width 01's rows (a card that ignored its preset passes
    the other tests)."""
    real = resources._preset

    def edited(slug, **changes):
        return lambda s: {**real(s), **changes} if s == slug else real(s)

    base = resources.card("08_loki").peak_gb
    monkeypatch.setattr(resources, "_preset", edited("08_loki", contexts=[1024, 32768]))
    longer = resources.card("08_loki").peak_gb
    kv = resources.kv_cache("meta-llama/Llama-2-13b-hf", 32768 - 16384, 1, "bfloat16").gigabytes
    assert longer - base == pytest.approx(kv)
    monkeypatch.setattr(resources, "_preset", real)
    # 01: the frozen weights once; band copies per k (4 k + 3 = 7), each the band's MLPs
    weights, copies, _, _ = resources.card("01_restor").gpu
    monkeypatch.setattr(resources, "_preset", edited("01_restor", mix_k=[0]))
    assert resources.card("01_restor").gpu[1].gigabytes == pytest.approx(copies.gigabytes * 4 / 7)
    assert resources.card("01_restor").gpu[0].gigabytes == weights.gigabytes
    monkeypatch.setattr(resources, "_preset", edited("01_restor", trainable_layers=[0, 32]))
    wide = resources.card("01_restor").gpu
    assert wide[1].gigabytes == pytest.approx(copies.gigabytes * 32 / 6)
    assert wide[2].gigabytes == pytest.approx(32 * 3 * 4096 * 14336 * (4 + 8) / 1e9)  # gradient + AdamW moments



def test_chapter_03s_prompt_count_comes_from_its_colours_and_classes():
    """The text tower's activations are sized for one prompt per colour per base class of
    the largest dataset, read from the code (a typed 11 × 5 would not follow a new colour)."""
    from replbook import cliplike, intcoop

    row = resources.card("03_intcoop").gpu[1]
    datasets = [intcoop.Dataset(name, list(classes), *[None] * 6)
                for name, classes in (("cifar10", range(10)), ("fashion-tinted", range(10)))]
    expected = len(cliplike.COLOURS) * max(len(d.base) for d in datasets)
    assert f"over {expected} prompts" in row.what


def test_the_how_to_run_page_shows_the_current_table(tmp_path):
    page = (ROOT / "book" / "how-to-run.md").read_text()
    assert f"{resources.BEGIN}\n{resources.table()}\n{resources.END}" in page, \
        "the table is stale: `replbook resources --write-page`"
    copy = tmp_path / "page.md"
    copy.write_text(f"before\n{resources.BEGIN}\nold\n{resources.END}\nafter\n")
    assert resources.update_page(copy) and not resources.update_page(copy)
    assert copy.read_text().startswith("before\n") and copy.read_text().endswith("after\n")


def test_the_cli_prints_a_card_with_its_formulas(capsys):
    from replbook import cli

    assert cli.main(["resources", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("08_loki") and "KV cache, 16384 tokens" in out and "[2 × 40 layers × 40 × 128" in out
    assert cli.main(["resources", "99"]) == 2


def test_a_70b_model_is_spread_over_fake_gpus_within_their_budgets():
    """Accelerate's device_map="auto" planned on the meta device (no GPU here): every
    weight is placed once, no GPU gets more than its budget less the reserve, and what
    does not fit goes to host memory before disk."""
    from replbook import architectures

    total = architectures.weight_bytes("meta-llama/Llama-2-70b-hf") / 1e9
    two = resources.device_plan("llama2-70b", gpus=2, gpu_gb=80)
    assert set(two) == {"cuda:0", "cuda:1"} and sum(two.values()) == pytest.approx(total, rel=1e-6)
    assert all(gb <= 80 - 2.0 for gb in two.values())
    one = resources.device_plan("llama2-70b", gpus=1, gpu_gb=80, cpu_gb=40)
    assert list(one) == ["cuda:0", "cpu", "disk"] and one["cpu"] <= 40 and sum(one.values()) == pytest.approx(total)
    with pytest.raises(ValueError, match="gpu_gb"):
        resources.device_plan("llama2-70b", gpus=1, gpu_gb=1)


# Chapters whose card does not yet come within CARD_TOLERANCE of their recorded CPU dry run,
# each with what is known of the gap (the test prints the numbers). The test below fails
# when one of them comes within (take it off) and when any other falls outside: this list
# only shrinks. The likely causes are read from the code, not yet measured apart.
CARD_OFF = {
    "00_model_zoo": "the card counts the loaded weights only; likely the next-token tables' logits over "
                    "Gemma-3's 262k-token vocabulary and the checkpoint mapped while it loads",
    "02_skill_slices": "the card counts the weights only; likely the multiple-choice scores' logits and their "
                       "log-softmax over Gemma-3's 262k-token vocabulary, a batch at a time",
    "07_drew": "the card counts the two embedders only; the watermarking and the marked image sets are not rows",
    "08_loki": "the card counts both models and the KV cache; likely the captured keys and queries of the "
               "calibration windows and the logits over the vocabulary",
    "09_vit_decompose": "the card counts the weights only; likely the decompositions it keeps for every ViT "
                        "(images × components × width, for the training and the test images)",
    "10_semantic_tokens": "Mask R-CNN and the images have no row (the card says so)",
}


@pytest.fixture(scope="module")
def baseline_bytes():
    return resources.library_baseline_bytes()


def _dry_runs():
    import json

    path = ROOT / "kernels" / "measurements" / "paper_dryrun_cpu.json"
    return json.loads(path.read_text())


# dry runs recorded before the kernel's own peak was measured (their peak_rss_bytes is
# getrusage's, which counts the launching process's memory): each waits for `replbook dryrun
# NN` to be run again. The test below fails once one is re-recorded: this set only shrinks.
AWAITING_RERECORD = {"01_restor|layers-1", "04_endor|layers-1", "05_t2i_composition|layers-1",
                     "06_mllm_tracing|layers-1"}


@pytest.mark.parametrize("key", sorted(_dry_runs()))
def test_a_card_comes_within_a_quarter_of_its_dry_runs_measured_peak(key, baseline_bytes):
    """Issue #29: the card of a recorded dry run's workload (its parameters, its depth:
    full width, one layer) against that run's peak resident memory less the libraries'
    own. A card that forgot a model the chapter holds, or a precision, fails here."""
    entry = _dry_runs()[key]
    if key in AWAITING_RERECORD:
        assert "kernel_peak_bytes" not in entry, f"{key} is re-recorded: take it off AWAITING_RERECORD"
        with pytest.raises(ValueError, match="rerun `replbook dryrun`"):
            resources.against_dry_run(entry, baseline_bytes)
        pytest.skip(f"{key}: recorded before the kernel's own peak was measured; rerun `replbook dryrun`")
    got = resources.against_dry_run(entry, baseline_bytes)
    summary = (f"{got.chapter}: card {got.card_gb:.2f} GB{' (partial)' if got.partial else ''} vs "
               f"{got.measured_gb:.2f} GB measured beyond the libraries (ratio {got.ratio:.2f})")
    if got.chapter in CARD_OFF:
        assert not got.within, f"{summary}: within {resources.CARD_TOLERANCE:.0%} now, take it off CARD_OFF"
        pytest.xfail(f"{summary}: {CARD_OFF[got.chapter]}")
    assert got.within, summary


def test_the_lists_of_cards_off_and_records_awaiting_name_real_entries():
    records = _dry_runs()
    assert AWAITING_RERECORD <= set(records)
    assert set(CARD_OFF) <= {entry["chapter"] for entry in records.values()}
    assert not set(CARD_OFF) & {key.split("|")[0] for key in AWAITING_RERECORD}, "a record awaiting is not judged yet"


def test_a_card_at_a_dry_runs_depth_sizes_its_models_at_that_depth():
    """The comparison is only as good as the card of what ran: at one layer deep the
    weights shrink to one layer plus the embeddings, an open_clip model stays whole (it
    is served at full depth), and the KV cache holds one layer."""
    from replbook import architectures

    full = resources.card("08_loki")
    shallow = resources.card("08_loki", {"contexts": [256]}, layers=1)
    assert shallow.gpu[0].gigabytes == pytest.approx(
        architectures.parameter_count("meta-llama/Llama-2-7b-hf", 1) * 2 / 1e9)
    assert shallow.gpu[0].gigabytes < full.gpu[0].gigabytes / 10
    assert shallow.gpu[-1].gigabytes == pytest.approx(2 * 1 * 40 * 128 * 256 * 2 / 1e9)
    clip = resources.card("09_vit_decompose", layers=1).gpu[-1]
    assert clip.gigabytes == resources.card("09_vit_decompose").gpu[-1].gigabytes
    assert resources.card("08_loki").gpu[0].gigabytes == full.gpu[0].gigabytes  # the depth does not stick


def test_a_card_counts_every_model_its_chapter_holds_at_once():
    """Chapters 08 and 09 load all their models before measuring any (the card said "one
    model at a time" and counted the largest)."""
    loki = resources.card("08_loki")
    assert [r.what for r in loki.gpu[:2]] == ["meta-llama/Llama-2-7b-hf weights (bfloat16)",
                                              "meta-llama/Llama-2-13b-hf weights (bfloat16)"]
    vit = resources.card("09_vit_decompose")
    assert len([r for r in vit.gpu if "weights" in r.what]) == 4  # three ViTs and CLIP


def test_the_cpu_dry_run_of_a_device_chapter_is_carded_at_the_cpus_precision():
    """Chapter 06 loads bfloat16 on a GPU and float32 on the CPU: its dry run on the CPU is
    set beside the float32 card (the bfloat16 one would be half)."""
    entry = {**_dry_runs()["06_mllm_tracing|layers-1"], "kernel_peak_bytes": 1}
    cpu = resources.against_dry_run(entry, 0)
    gpu = resources.card("06_mllm_tracing", {k: v for k, v in entry["overrides"].items()
                                              if k not in ("preset", "threads")}, layers=1)
    assert "float32" in resources.card("06_mllm_tracing", {"device": "cpu"}).gpu[0].what
    assert cpu.card_gb > sum(r.gigabytes for r in gpu.gpu + gpu.host if r.gigabytes)


def test_the_measured_side_is_the_kernels_peak_less_the_baseline():
    """Without the baseline subtracted, 03 would still pass (its card is 0.77 of the raw
    peak): this pins the arithmetic on a record of known numbers."""
    entry = {**_dry_runs()["03_intcoop|layers-1"], "kernel_peak_bytes": 5_000_000_000}
    got = resources.against_dry_run(entry, 1_000_000_000)
    assert got.measured_gb == pytest.approx(4.0)
    assert got.ratio == pytest.approx(got.card_gb / 4.0)
    assert got.within == (abs(got.card_gb - 4.0) <= 1.0)
