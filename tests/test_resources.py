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
