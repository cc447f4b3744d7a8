"""``replbook prepare``: the one-time artifacts (converted models, fetched data) are built
before any notebook, so notebook cells only read caches."""
import pytest
from conftest import ROOT

from replbook import prepare


def _names(slug, preset="book"):
    return [a.name for a in prepare.artifacts(slug, preset, ROOT)]


def test_each_chapter_lists_the_models_and_data_its_book_run_reads():
    assert _names("00_model_zoo") == ["model smollm2-135m", "model gemma3-270m", "model efficientnet-lite0",
                                      "model minilm-l6"]
    assert set(_names("04_endor")) >= {"model smollm2-135m", "text shakespeare", "text moby-dick"}
    assert set(_names("03_intcoop")) >= {"data cifar10", "data fashion-tinted", "model efficientnet-lite0"}
    assert "data country-flags" in _names("06_mllm_tracing")  # read without a parameter naming it
    assert "data cifar10" in _names("09_vit_decompose")
    assert not [n for n in _names("00_model_zoo", "paper") if "-hub" in n], "hub models are never prepared"
    for slug in sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        names = _names(slug)
        assert len(names) == len(set(names))


def test_prepare_builds_once_and_a_second_run_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    first = prepare.prepare(["00"], "smoke", ROOT, progress=False)
    assert [r["artifact"] for r in first] == ["model tiny-llama", "model tiny-bert-encoder"]
    assert len(list((tmp_path / "models").glob("tiny-llama-*"))) == 1
    second = prepare.prepare(["00"], "smoke", ROOT, progress=False)
    assert all(r["seconds"] < 1.0 for r in second), second
    table = prepare.summary(second)
    assert "model tiny-llama" in table and "2 artifacts ready" in table


def test_make_test_and_make_book_prepare_before_any_notebook():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test:", "book:"):
        recipe = makefile.split(f"\n{target}", 1)[1].split("\n\n", 1)[0]
        lines = [line.strip() for line in recipe.splitlines()[1:]]
        assert lines[0] == "$(VENV)/bin/replbook prepare", (target, lines)


def test_an_unknown_chapter_is_refused():
    with pytest.raises(ValueError, match="is not valid; choose one of"):
        prepare.prepare(["99"], root=ROOT, progress=False)


def test_prepare_names_every_chapter_that_reads_an_artifact_and_sums_the_time(monkeypatch):
    """Chapters 00 and 01 both read tiny-llama at the smoke preset: its row names both, and
    the summary's total is the sum of the rows, not the longest one."""
    built = []
    monkeypatch.setattr(prepare, "_model", lambda name: prepare.Artifact(f"model {name}", lambda: built.append(name))
                        if name.startswith("tiny-") else None)
    rows = prepare.prepare(["00", "01"], "smoke", ROOT, progress=False)
    by_name = {r["artifact"]: r["chapters"] for r in rows}
    assert by_name["model tiny-llama"] == "00 01" and by_name["model tiny-bert-encoder"] == "00"
    assert built.count("tiny-llama") == 1, "one build per artifact, however many chapters read it"
    table = prepare.summary([{"artifact": "a", "chapters": "00", "seconds": 2.0},
                             {"artifact": "b", "chapters": "01", "seconds": 3.0}])
    assert "2 artifacts ready in 5 s" in table


def test_names_nested_in_a_presets_lists_are_read():
    assert list(prepare._words(["tiny-llama", ("smollm2-135m", ["gemma3-270m"])])) == [
        "tiny-llama", "smollm2-135m", "gemma3-270m"]
    assert list(prepare._words(3)) == []
