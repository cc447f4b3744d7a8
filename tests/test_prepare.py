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


# ---------------------------------------------------------------- CIFAR-10 from the book's copy

def _damaged_copy(tmp_path, change):
    """A root whose data/cifar10-test.zip is the book's copy with ``change(members)`` applied."""
    import zipfile

    (tmp_path / "data").mkdir(parents=True)
    with zipfile.ZipFile(ROOT / prepare.KEPT_CIFAR10) as kept:
        members = {info.filename: kept.read(info) for info in kept.infolist()}
    change(members)
    with zipfile.ZipFile(tmp_path / prepare.KEPT_CIFAR10, "w") as copy:
        for name, payload in members.items():
            copy.writestr(name, payload)
    return tmp_path


def test_cifar10_comes_from_the_books_copy_without_the_registry(tmp_path, monkeypatch):
    """bigbench==1.0.0 left PyPI (2026-12): prepare writes the cache entry from data/cifar10-test.zip,
    and data.cifar10_test() then reads exactly the arrays bigbench's archive decoded to, no fetch."""
    import numpy as np

    from replbook import data

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))

    def no_registry(*args, **kwargs):
        raise AssertionError("the registry was asked")

    monkeypatch.setattr(data, "_fetch", no_registry)
    images, labels = prepare.cifar10(ROOT)
    assert prepare.arrays_sha256(images, labels) == prepare.CIFAR10_ARRAYS_SHA256
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels[:3].tolist() == [0, 0, 0] and (np.bincount(labels) == 1000).all()  # bigbench's order: by class
    again = data.cifar10_test()
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
    assert (tmp_path / "data" / "cifar10-test" / "sha256").read_text() == data.CIFAR10_SOURCE["sha256"]
    assert [r["artifact"] for r in prepare.prepare(["09"], "smoke", ROOT, progress=False)].count("data cifar10") == 1


def test_a_damaged_or_other_copy_of_cifar10_is_refused(tmp_path, monkeypatch):
    """A flipped byte fails the file's sha256; a copy with one image swapped for another (its file
    hash recorded as if it were the book's) fails the arrays' sha256; a missing copy says where."""
    import zipfile

    from replbook.paths import sha256_file

    with zipfile.ZipFile(ROOT / prepare.KEPT_CIFAR10) as kept:
        first = sorted(kept.namelist())[:2]

    def flip(members):
        name = first[0]
        members[name] = members[name][:-1] + bytes([members[name][-1] ^ 1])

    with pytest.raises(RuntimeError, match="does not match its recorded sha256"):
        prepare.kept_cifar10(_damaged_copy(tmp_path / "a", flip))

    def swap(members):
        members[first[0]] = members[first[1]]

    root = _damaged_copy(tmp_path / "b", swap)
    monkeypatch.setattr(prepare, "KEPT_CIFAR10_SHA256", sha256_file(root / prepare.KEPT_CIFAR10))
    with pytest.raises(RuntimeError, match="decodes to other images than bigbench==1.0.0 did"):
        prepare.kept_cifar10(root)
    with pytest.raises(FileNotFoundError, match="no registry source left"):
        prepare.kept_cifar10(tmp_path)


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
    assert list(prepare._words(["tiny-llama", ("smollm2-135m", ["gemma3-270m"])], )) == [
        "tiny-llama", "smollm2-135m", "gemma3-270m"]
    assert list(prepare._words(3)) == []


def test_a_cached_cifar10_under_another_archives_stamp_is_written_again(tmp_path, monkeypatch):
    """The cache entry's stamp names the archive its arrays are identical to; an entry stamped
    with another hash (an older source, or another set) is not served as the test set."""
    import numpy as np

    from replbook import data

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "cifar10-test"
    folder.mkdir(parents=True)
    np.savez(folder / "cifar10_test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    (folder / "sha256").write_text("0" * 64)
    images, labels = prepare.cifar10(ROOT)
    assert images.shape == (10000, 32, 32, 3) and prepare.arrays_sha256(images, labels) == prepare.CIFAR10_ARRAYS_SHA256
    assert (folder / "sha256").read_text() == data.CIFAR10_SOURCE["sha256"]
