"""Numerics families (replbook.numerics): which committed numbers a rerun on this machine is
held to, and the records that say so."""
import json
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import find_metadata_tags

from conftest import ROOT, expect_this_familys_outputs
from replbook import numerics, results, runner

SLUGS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
INTEL = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n"
AMD = "vendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC 7B12\n"


def references() -> list[Path]:
    return sorted(numerics.reference_dir(ROOT).glob("*/*.json"))


def test_the_family_is_the_architecture_the_vendor_and_the_pins():
    assert numerics.family(numerics.PINS, "x86_64", INTEL) == "x86_64-intel"
    assert numerics.family(numerics.PINS, "x86_64", AMD) == "x86_64-amd"
    for name in numerics.PINS:  # a reader's override of any one pin is another family
        overridden = {**numerics.PINS, name: "avx512"}
        assert numerics.family(overridden, "x86_64", AMD) == "x86_64-amd-unpinned"
        assert numerics.family({k: v for k, v in numerics.PINS.items() if k != name}, "x86_64", AMD).endswith("-unpinned")
    assert numerics.family({}, "aarch64", "") == "aarch64"
    assert numerics.cpu_vendor("vendor_id : HygonGenuine\n") == "hygongenuine"
    assert numerics.cpu_model(AMD) == "AMD EPYC 7B12 (family 23, model 49)"
    assert runner.CPU_PINS is numerics.PINS  # what the kernel gets is what the family checks


def test_every_chapter_says_which_family_made_its_published_results():
    families = numerics.published_families(ROOT)
    assert sorted(families) == SLUGS
    for slug, name in families.items():
        assert name.startswith("x86_64-") and not name.endswith("-unpinned"), (slug, name)


@pytest.mark.parametrize("path", references(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_reference_is_another_familys_rerun_of_the_committed_code(path):
    """A reference is current (the chapter's code and committed results are what it was made
    against), comes from a family other than the published one, lines up cell by cell with
    the committed notebook, and declares the committed tolerances."""
    reference = json.loads(path.read_text())
    slug, family = path.stem, path.parent.name
    assert reference["slug"] == slug and reference["family"] == family
    assert family != numerics.published_family(slug, ROOT)
    if reference.get("pending"):
        return _assert_current_pending_record(reference, slug)
    committed = json.loads((ROOT / "results" / f"{slug}.json").read_text())
    assert reference["code_version"] == committed["code_version"] == results.code_version(slug, ROOT), (
        f"{path.relative_to(ROOT)} is stale: rerun `replbook reference {slug[:2]}` on a {family} machine")
    assert reference["results"]["tolerances"] == committed["tolerances"]
    assert reference["results"]["preset"] == committed["preset"] == "book"
    expected = numerics.Expected(slug, family, ROOT, variant="")  # this record, whatever this machine's CPU model
    outputs = expected.cell_outputs(nbformat.read(ROOT / "notebooks" / f"{slug}.ipynb", as_version=4))
    assert outputs is not None and expected.results == reference["results"]
    assert not any(o.get("data", {}).keys() & set(numerics.IMAGE_TYPES) for cell in outputs for o in cell)


@pytest.mark.parametrize("slug", SLUGS)
def test_a_chapter_whose_numbers_depend_on_the_family_has_them_for_every_known_family(slug):
    """Whichever family CI's machine is, the guard has its numbers: a code change to such a
    chapter lands only with a current reference for the other family too."""
    missing = numerics.missing_families(slug, ROOT)
    assert not missing, (f"{slug}'s numbers depend on the CPU family and none are recorded for {missing} under its "
                         f"current code: run `replbook reference {slug[:2]}` on such a machine")
    for name, since in numerics.pending_families(slug, ROOT).items():  # allowed, and said: the guard is looser there
        warnings.warn(f"{slug}: {name} is pending since {since} (verdicts and widened bands only): run "
                      f"`replbook reference {slug[:2]}` on a {name} machine", stacklevel=1)


def test_the_family_dependent_chapters_are_those_a_reference_showed_to_differ():
    for path in references():
        reference = json.loads(path.read_text())
        if reference.get("pending"):
            continue  # no numbers of its own yet
        moved = results.compare(reference["results"], json.loads((ROOT / "results" / f"{path.stem}.json").read_text()))
        assert moved and path.stem in numerics.family_dependent(ROOT), (
            f"{path.relative_to(ROOT)} gives the published numbers: the chapter does not depend on the family, "
            "delete the reference")


def test_missing_families_names_a_family_with_no_current_numbers(tmp_path):
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    assert numerics.missing_families(slug, root) == []  # not marked: any family is held to the published numbers
    numerics.mark_family_dependent(slug, root)
    assert numerics.missing_families(slug, root) == ["x86_64-intel"]
    committed = json.loads((root / "results" / f"{slug}.json").read_text())
    notebook = nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4)
    numerics.write_reference(slug, "x86_64-intel", dict(committed, code_version="0" * 16), notebook, root)
    assert numerics.missing_families(slug, root) == ["x86_64-intel"]  # stale: made with other code
    numerics.write_reference(slug, "x86_64-intel", committed, notebook, root)
    assert numerics.missing_families(slug, root) == []


def test_a_rerun_is_held_to_its_own_familys_numbers(tmp_path):
    """On the published family: the committed results and notebook. On a family with a
    reference: the reference's numbers and outputs, not the published ones. On a family with
    none: the published numbers, and the message says how to record that family's."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    other = json.loads(json.dumps(committed))
    other["metrics"]["scores"]["vit|object"][14] += 0.5  # another family's sums
    numerics.write_reference(slug, "x86_64-intel", other, _with_output(notebook, "other family's table"), root)

    home = numerics.Expected(slug, "x86_64-amd", root)
    assert home.results == committed and home.cell_outputs(notebook) is None
    assert home.compare(other) and not home.compare(committed)
    away = numerics.Expected(slug, "x86_64-intel", root)
    assert away.results == other and not away.compare(other) and away.compare(committed)
    assert "other family's table" in json.dumps(away.cell_outputs(notebook))
    unknown = numerics.Expected(slug, "aarch64", root)
    assert unknown.results == committed and "not family-dependent" in unknown.source
    numerics.mark_family_dependent(slug, root)
    assert "replbook reference 09" in numerics.Expected(slug, "aarch64", root).source

    stale = json.loads(numerics.reference_path(slug, "x86_64-intel", root).read_text())
    stale["code_version"] = "0" * 16
    numerics.reference_path(slug, "x86_64-intel", root).write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="replbook reference 09"):
        numerics.Expected(slug, "x86_64-intel", root)


def test_a_reference_recorded_from_other_cells_is_refused(tmp_path):
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    notebook = nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4)
    numerics.write_reference(slug, "x86_64-intel", json.loads((root / "results" / f"{slug}.json").read_text()),
                             notebook, root)
    changed = json.loads(json.dumps(notebook))
    code = [c for c in changed["cells"] if c["cell_type"] == "code"]
    code[3]["source"] += "\nprint('one more line')"
    with pytest.raises(ValueError, match="other cells"):
        numerics.Expected(slug, "x86_64-intel", root).cell_outputs(nbformat.from_dict(changed))


def test_nbval_expects_the_reference_outputs_of_each_cell_on_that_family(tmp_path, monkeypatch):
    """The swap nbval relies on: every code cell gets its own cell's reference outputs (not a
    neighbour's), and only on the family the reference is for."""
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    path = root / "notebooks" / f"{slug}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    marked = json.loads(json.dumps(notebook))
    for k, cell in enumerate(c for c in marked["cells"] if c["cell_type"] == "code"):
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": f"reference of code cell {k}\n"}]
    numerics.write_reference(slug, "x86_64-intel", json.loads((root / "results" / f"{slug}.json").read_text()),
                             nbformat.from_dict(marked), root)
    monkeypatch.setattr("conftest.ROOT", root)
    items = _nbval_items(path, notebook)
    away = items()
    held_to = expect_this_familys_outputs(away, "x86_64-intel")
    assert "results/reference/x86_64-intel" in held_to[slug]
    assert [i.cell.outputs[0]["text"] for i in away] == [f"reference of code cell {k}\n" for k in range(len(away))]
    assert all(i.cell.source == c.source for i, c in zip(away, (c for c in notebook.cells if c.cell_type == "code")))
    home = items()
    expect_this_familys_outputs(home, "x86_64-amd")
    assert all(i.cell is c for i, c in zip(home, (c for c in notebook.cells if c.cell_type == "code")))


def test_publishing_from_another_family_keeps_the_old_numbers_as_that_familys_reference(tmp_path):
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    old = json.loads((root / "results" / f"{slug}.json").read_text())
    notebook = nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4)
    new = dict(old, date="2099-01-01")
    numerics.mark_family_dependent(slug, root)
    numerics.write_reference(slug, "x86_64-intel", new, notebook, root)  # the intel reference, now published
    numerics.record_publication(slug, "x86_64-intel", new, old, notebook, root)
    assert numerics.published_family(slug, root) == "x86_64-intel"
    assert not numerics.reference_path(slug, "x86_64-intel", root).exists()
    kept = json.loads(numerics.reference_path(slug, "x86_64-amd", root).read_text())
    assert kept["results"] == old
    # under changed code the old numbers guard nothing: no reference is kept for them, and the
    # family that published before waits for its own numbers (pending)
    waiting = numerics.record_publication(slug, "x86_64-amd", dict(new, code_version="f" * 16), new, notebook, root)
    assert not numerics.reference_path(slug, "x86_64-amd", root).exists()
    assert waiting == [numerics.reference_path(slug, "x86_64-intel", root)]
    assert json.loads(waiting[0].read_text())["pending"] is True
    numerics.write_reference(slug, "x86_64-intel", new, notebook, root)  # made under the old code
    assert numerics.record_publication(slug, "x86_64-amd", dict(new, code_version="f" * 16), None, None, root) == [
        numerics.reference_path(slug, "x86_64-intel", root)]


def test_a_family_independent_chapter_keeps_no_reference_when_another_family_publishes_it(tmp_path):
    """Its families agree, so the old family's numbers guard nothing the new ones do not; kept,
    they would go stale at the next code change and be refused on that family's machine."""
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    old = json.loads((root / "results" / f"{slug}.json").read_text())
    notebook = nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4)
    assert slug not in numerics.family_dependent(root)
    assert numerics.record_publication(slug, "x86_64-intel", dict(old, date="2099-01-01"), old, notebook, root) == []
    assert numerics.published_family(slug, root) == "x86_64-intel"
    assert list((root / "results" / "reference").glob(f"*/{slug}.json")) == []


def test_a_reference_is_refused_on_the_published_family_and_for_stale_results(tmp_path, monkeypatch):
    root = _book_copy(tmp_path, "09_vit_decompose")
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-amd")
    with pytest.raises(ValueError, match="x86_64-amd, the family results/09_vit_decompose.json was made on"):
        runner.record_reference("09", root=root)
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-intel")
    stale = json.loads((root / "results" / "09_vit_decompose.json").read_text())
    stale["code_version"] = "0" * 16
    (root / "results" / "09_vit_decompose.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="republish it"):
        runner.record_reference("09", root=root)


def _chapter_09(tmp_path: Path):
    """Chapter 09 in a scratch book: its root, slug, committed results and notebook."""
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    return (root, slug, json.loads((root / "results" / f"{slug}.json").read_text()),
            nbformat.read(root / "notebooks" / f"{slug}.ipynb", as_version=4))


def _book_copy(tmp_path: Path, slug: str) -> Path:
    """A root with one chapter's notebook, results and the package's sources (code_version reads them)."""
    root = tmp_path / "book"
    (root / "notebooks").mkdir(parents=True)
    (root / "results").mkdir()
    shutil.copy(ROOT / "notebooks" / f"{slug}.ipynb", root / "notebooks")
    shutil.copy(ROOT / "results" / f"{slug}.json", root / "results")
    (root / "results" / "reference").mkdir()
    (root / "results" / "reference" / "published.json").write_text(json.dumps({slug: "x86_64-amd"}))
    return root


def _with_output(notebook, text: str):
    changed = json.loads(json.dumps(notebook))
    next(c for c in changed["cells"] if c["cell_type"] == "code")["outputs"] = [
        {"output_type": "stream", "name": "stdout", "text": text}]
    return nbformat.from_dict(changed)


# ----------------------------------------------------------------------------- pending families


def _assert_current_pending_record(record: dict, slug: str) -> None:
    committed = json.loads((ROOT / "results" / f"{slug}.json").read_text())
    assert record["code_version"] == committed["code_version"] == results.code_version(slug, ROOT), (
        f"the pending record of {record['family']} for {slug} is stale: rerun `replbook reference {slug[:2]}` there")
    assert record["published_on"] == numerics.published_family(slug, ROOT) and slug in numerics.family_dependent(ROOT)
    assert set(record["moves"]) == {"numbers", "same", "differed"}


def _toy_run(values, decisive=True, supporting=True, verdict="reproduced", count=7, best="crop", config=1, extra=None):
    checks = {"d": decisive, **({"e": extra} if extra is not None else {})}
    return {"slug": "toy", "config": {"k": config},
            "tolerances": [["count", results.exact()], ["*", results.band(abs=0.001)]],
            "metrics": {"acc": list(values), "count": count, "best": best, "label": "top-2"},
            "verdicts": [{"claim": "C1", "verdict": verdict, "decisive": checks,
                          "supporting": {"s": supporting}, "numbers": {"gain": values[0]}}]}


def test_a_pending_family_is_held_to_the_verdicts_and_to_bands_widened_by_the_measured_moves():
    """The families' last runs of one code: acc[i] moved by 0.001 i, count by 1, the supporting
    check and the best edit differed. Under new code, a pending family's rerun may move each
    number by its tolerance + 2 x its own move, flip what differed, and nothing else; what the
    new code added (acc[10], check e) is not compared there."""
    one = _toy_run([1.0] * 10)
    other = _toy_run([1.0 + 0.001 * i for i in range(10)], supporting=False, count=8, best="flip")
    moves = numerics.cross_family_moves(other, one)
    assert moves["numbers"]["acc[3]"] == pytest.approx(0.003) and moves["numbers"]["acc[0]"] == 0
    assert moves["numbers"]["count"] == 1 and moves["numbers"]["verdicts.C1.gain"] == 0
    assert moves["differed"] == ["best", "verdicts.C1.supporting.s"]
    assert moves["same"] == ["label", "verdicts.C1.decisive.d"]

    committed = _toy_run([1.0] * 10 + [1.0], extra=True)  # the new code: one number and one check more
    assert numerics.uncompared(committed, moves) == ["acc[10]", "best", "verdicts.C1.decisive.e", "verdicts.C1.supporting.s"]

    def problems(**change):
        rerun = json.loads(json.dumps(committed))
        for path, delta in change.get("acc", {}).items():
            rerun["metrics"]["acc"][path] += delta
        rerun["metrics"]["count"] += change.get("count", 0)
        rerun["metrics"]["best"] = change.get("best", "crop")
        rerun["metrics"]["label"] = change.get("label", "top-2")
        for key, value in change.get("verdict", {}).items():
            rerun["verdicts"][0][key] = {**rerun["verdicts"][0][key], **value} if isinstance(value, dict) else value
        rerun["config"] = change.get("config", rerun["config"])
        return results.compare(rerun, numerics.pending_view(committed, rerun, moves))

    assert problems() == []
    assert problems(acc={3: 0.0065}) == []  # ≤ 0.001 + 2 x 0.003
    assert problems(acc={3: 0.0075}) and problems(acc={3: -0.0075})
    assert problems(acc={0: 0.005})  # the families agreed on acc[0]: its own tolerance only
    assert problems(acc={10: 5.0}) == []  # new: never compared across families
    assert problems(count=2) == [] and problems(count=3)  # exact, widened to 2 x its move
    assert problems(best="flip") == [] and problems(label="top-3")
    assert problems(verdict={"supporting": {"s": False}}) == [] and problems(verdict={"decisive": {"e": False}}) == []
    assert problems(verdict={"decisive": {"d": False}})  # the families agreed on it
    assert problems(verdict={"verdict": "not reproduced"})
    assert problems(config={"k": 2})
    assert numerics.pending_view(committed, committed, moves)["tolerances"][-2:] == committed["tolerances"]


def test_what_a_code_change_changed_is_no_longer_measured():
    """Against the publishing family's own old run, a value is unchanged within its declared
    tolerance; against the other family's, within the pending band. A changed value takes
    its whole record with it (acc[2] changed: every acc[i] may be computed otherwise now)."""
    one = _toy_run([1.0] * 10)
    moves = numerics.cross_family_moves(_toy_run([1.0 + 0.001 * i for i in range(10)]), one)
    changed = json.loads(json.dumps(one))
    changed["metrics"]["acc"][2] += 0.5
    changed["metrics"]["label"] = "top-3"
    changed["verdicts"][0]["decisive"]["d"] = False
    kept = numerics.still_measured(moves, changed, one, same_family=True)
    assert set(kept["numbers"]) == {"count", "verdicts.C1.gain"}
    assert kept["same"] == ["best", "verdicts.C1.supporting.s"]
    nudged = json.loads(json.dumps(one))
    nudged["metrics"]["acc"][3] += 0.006  # beyond its tolerance, within 0.001 + 2 x its move 0.003
    assert "acc[3]" in numerics.still_measured(moves, nudged, one, same_family=False)["numbers"]
    assert "acc[3]" not in numerics.still_measured(moves, nudged, one, same_family=True)["numbers"]
    assert numerics.still_measured(moves, one, one, same_family=True) == moves


def test_publishing_under_changed_code_makes_the_other_family_pending_until_its_reference(tmp_path):
    root, slug, old, notebook = _chapter_09(tmp_path)
    intel = json.loads(json.dumps(old))
    intel["metrics"]["scores"]["vit|object"][14] += 0.01  # that family's sums
    numerics.mark_family_dependent(slug, root)
    numerics.write_reference(slug, "x86_64-intel", intel, notebook, root)
    def publish(family, run, previous):  # as runner.run does: the results file first
        (root / "results" / f"{slug}.json").write_text(json.dumps(run))
        return numerics.record_publication(slug, family, run, previous, notebook, root)

    new = json.loads(json.dumps(dict(old, code_version="f" * 16)))
    new["metrics"]["ablation"][1]["worst group"] += 0.5  # the new code computes this row otherwise
    waiting = publish("x86_64-amd", new, old)

    path = numerics.reference_path(slug, "x86_64-intel", root)
    record = json.loads(path.read_text())
    assert waiting == [path] and record["pending"] and record["code_version"] == "f" * 16
    assert record["moves"]["numbers"]["scores.vit|object[14]"] == pytest.approx(0.01)
    assert record["moves"]["numbers"]["scores.vit|object[12]"] == 0 and record["moves"]["differed"] == []
    assert not [p for p in record["moves"]["numbers"] if p.startswith("ablation[1].")]  # changed: not measured
    assert numerics.missing_families(slug, root) == [] and list(numerics.pending_families(slug, root)) == ["x86_64-intel"]

    away = numerics.Expected(slug, "x86_64-intel", root)
    assert away.pending and not away.compares_outputs and away.cell_outputs(notebook) is None
    assert away.results == new and "pending since" in away.source
    moved = json.loads(json.dumps(new))
    moved["metrics"]["scores"]["vit|object"][14] += 0.015
    assert away.compare(moved) == [] and numerics.Expected(slug, "x86_64-amd", root).compare(moved)
    moved["metrics"]["ablation"][1]["average"] += 0.5
    assert away.compare(moved) == []
    moved["metrics"]["scores"]["vit|object"][12] += 0.015
    assert away.compare(moved)

    # published again under other code: the moves are still the last measured ones
    newer = dict(new, code_version="e" * 16)
    assert publish("x86_64-amd", newer, new) == [path]
    again = json.loads(path.read_text())
    assert again["moves"] == record["moves"] and again["measured"] == record["measured"] and again["code_version"] == "e" * 16
    # and when that family publishes, the other one waits with the same moves
    newest = dict(newer, code_version="d" * 16)
    publish("x86_64-intel", newest, newer)
    assert not path.exists()
    amd = json.loads(numerics.reference_path(slug, "x86_64-amd", root).read_text())
    assert amd["pending"] and amd["moves"] == record["moves"]
    # that family's own rerun ends the wait
    numerics.write_reference(slug, "x86_64-amd", dict(newest, date="2099-01-02"), notebook, root)
    assert numerics.pending_families(slug, root) == {} and numerics.Expected(slug, "x86_64-amd", root).reference


def test_a_family_publishing_over_the_other_measures_changes_against_its_own_old_run(tmp_path):
    """Intel publishes new code over AMD's results: whether the new code changed a number is
    judged against Intel's own reference of the old code, not AMD's run (whose distance from
    Intel's numbers could hide the change)."""
    root, slug, amd, notebook = _chapter_09(tmp_path)
    intel = json.loads(json.dumps(amd))
    intel["metrics"]["scores"]["vit|object"][14] += 0.01  # that family's sums
    numerics.mark_family_dependent(slug, root)
    numerics.write_reference(slug, "x86_64-intel", intel, notebook, root)
    new = json.loads(json.dumps(dict(intel, code_version="f" * 16)))
    new["metrics"]["scores"]["vit|object"][14] += 0.005  # changed on Intel, yet within AMD's 0.001 + 2 x 0.01
    (root / "results" / f"{slug}.json").write_text(json.dumps(new))
    numerics.record_publication(slug, "x86_64-intel", new, amd, notebook, root)
    moves = json.loads(numerics.reference_path(slug, "x86_64-amd", root).read_text())["moves"]
    assert "scores.vit|object[14]" not in moves["numbers"] and "scores.vit|object[0]" not in moves["numbers"]
    assert moves["numbers"]["scores.vit|colour[0]"] == 0


def _nbval_items(path: Path, notebook):
    """A maker of the cells nbval collects from ``notebook`` (at ``path``), as its plugin makes them."""
    class IPyNbFile:
        fspath, nb = path, notebook

    class IPyNbCell:
        def __init__(self, k, cell):
            # the options as nbval's collection makes them (nbval.plugin.IPyNbFile.collect): a
            # defaultdict(bool) of the cell's markers, from which nbval later reads keys no
            # marker set ("skip", "check_exception")
            self.parent, self.cell_num, self.cell = IPyNbFile, k, cell
            self.options = defaultdict(bool, find_metadata_tags(cell.metadata))
            self.options.setdefault("check", True)

    return lambda: [IPyNbCell(k, c) for k, c in enumerate(c for c in notebook.cells if c.cell_type == "code")]


def test_nbval_runs_the_cells_of_a_pending_family_without_comparing_them(tmp_path, monkeypatch):
    root = _book_copy(tmp_path, "09_vit_decompose")
    slug = "09_vit_decompose"
    path = root / "notebooks" / f"{slug}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    committed = json.loads((root / "results" / f"{slug}.json").read_text())
    numerics.mark_family_dependent(slug, root)
    numerics.write_pending(slug, "x86_64-intel", committed, "x86_64-amd",
                           {"numbers": {}, "same": [], "differed": []}, None, root)
    monkeypatch.setattr("conftest.ROOT", root)
    items = _nbval_items(path, notebook)
    away, home = items(), items()
    assert "pending since" in expect_this_familys_outputs(away, "x86_64-intel")[slug]
    assert all(i.options["check"] is False for i in away)
    # every key nbval reads when it runs a cell still answers (a plain dict in place of nbval's
    # defaultdict failed every cell of CI's run with "pytest plugin exception: 'skip'")
    assert all(i.options["skip"] is False and i.options["check_exception"] is False for i in away)
    expect_this_familys_outputs(home, "x86_64-amd")
    assert [i.options for i in home] == [i.options for i in items()]  # the published family: as nbval made them
    assert any(i.options["check"] for i in home)


# ----------------------------------------------------------------------------- CPU models of a family

ZEN3 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"


def _summed_otherwise(run: dict, index: int, by: float) -> dict:
    """A copy of chapter 09's ``run`` as another CPU's sums give it: one score moved by ``by``."""
    other = json.loads(json.dumps(run))
    other["metrics"]["scores"]["vit|object"][index] += by
    return other


def test_a_cpu_model_is_tagged_by_its_family_and_model_numbers():
    assert numerics.cpu_variant(AMD) == "f23m49" and numerics.cpu_variant(ZEN3) == "f25m1"
    assert numerics.cpu_variant(INTEL) == "f6m207"
    assert numerics.recorded_variant({"cpu": numerics.cpu_model(ZEN3)}) == "f25m1"
    assert numerics.recorded_variant({"cpu": "the machine that published it before"}) is None
    assert numerics.variant_name("x86_64-amd", "f25m17") == "x86_64-amd@f25m17"


def test_a_cpu_model_with_its_own_numbers_is_held_to_them_and_the_family_to_its_own(tmp_path):
    """Chapter 03 on AMD: a Zen 4 gives other numbers than a Zen 3 (numerics' docstring). Each
    model is held to its own record; a model without one to the family's; the model's record
    applies on the published family too; a stale one is refused with the command that renews it."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    numerics.mark_family_dependent(slug, root)
    zen3 = _summed_otherwise(committed, 14, 0.5)
    zen4 = _summed_otherwise(committed, 14, 0.9)
    numerics.write_reference(slug, "x86_64-intel", zen3, _with_output(notebook, "zen 3's table"), root,
                             cpu=numerics.cpu_model(ZEN3))
    numerics.write_reference(slug, "x86_64-intel@f25m17", zen4, _with_output(notebook, "zen 4's table"), root)

    on_zen4 = numerics.Expected(slug, "x86_64-intel", root, variant="f25m17")
    assert on_zen4.where == "x86_64-intel@f25m17" and on_zen4.results == zen4 and not on_zen4.compare(zen4)
    assert on_zen4.compare(zen3) and "zen 4's table" in json.dumps(on_zen4.cell_outputs(notebook))
    assert "CPU model" in on_zen4.source
    on_zen3 = numerics.Expected(slug, "x86_64-intel", root, variant="f25m1")
    assert on_zen3.where == "x86_64-intel" and on_zen3.results == zen3 and on_zen3.compare(zen4)
    assert numerics.Expected(slug, "x86_64-intel", root, variant="").results == zen3  # the family's alone
    # the published family: its models are held to the published numbers unless one has its own
    numerics.write_reference(slug, "x86_64-amd@f25m17", zen4, notebook, root)
    assert numerics.Expected(slug, "x86_64-amd", root, variant="f23m49").results == committed
    assert numerics.Expected(slug, "x86_64-amd", root, variant="f25m17").results == zen4
    stale = json.loads(numerics.reference_path(slug, "x86_64-intel@f25m17", root).read_text())
    stale["code_version"] = "0" * 16
    numerics.reference_path(slug, "x86_64-intel@f25m17", root).write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="replbook reference 09 --cpu-model"):
        numerics.Expected(slug, "x86_64-intel", root, variant="f25m17")
    numerics.Expected(slug, "x86_64-intel", root, variant="f25m1")  # the other model is not affected


def test_a_cpu_model_without_numbers_where_the_familys_models_differ_is_held_within_their_spread(tmp_path):
    """Chapter 03 on AMD: a Zen 3 (the family's reference) and a Zen 4 (its own record) sum
    differently, so a third model (a Zen 2) can be held to neither exactly: it is held, as a
    pending family is, to the family's verdicts and to each number within its tolerance plus
    twice the largest move measured between the recorded models, nbval comparing no output,
    until its own record. The recorded models, and the family's record asked for alone, are
    held as before; so is a family whose models were never seen to differ."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    numerics.mark_family_dependent(slug, root)
    zen3 = _summed_otherwise(committed, 14, 0.03)
    zen4 = _summed_otherwise(committed, 14, 0.07)  # 0.04 from zen 3's
    numerics.write_reference(slug, "x86_64-intel", zen3, notebook, root, cpu=numerics.cpu_model(ZEN3))
    assert numerics.model_spread(slug, "x86_64-intel", "f23m49", root) is None, "no model was seen to differ"
    assert numerics.Expected(slug, "x86_64-intel", root, variant="f23m49").compares_outputs
    numerics.write_reference(slug, "x86_64-intel@f25m17", zen4, notebook, root)
    numerics.write_reference(slug, "x86_64-intel@f26m2", zen4, notebook, root)  # a Zen 5 summed as the Zen 4

    spread = numerics.model_spread(slug, "x86_64-intel", "f23m49", root)
    assert spread["numbers"]["scores.vit|object[14]"] == pytest.approx(0.04), "the largest move of any two runs"
    assert spread["numbers"]["scores.vit|object[13]"] == 0 and len(spread["runs"]) == 3
    on_zen2 = numerics.Expected(slug, "x86_64-intel", root, variant="f23m49")
    assert on_zen2.spread and on_zen2.results == zen3 and not on_zen2.compares_outputs
    assert "f23m49" in on_zen2.source and "replbook reference 09 --cpu-model" in on_zen2.source

    def moved(index: int, by: float, flip: bool = False) -> dict:
        rerun = _summed_otherwise(zen3, index, by)
        if flip:
            rerun["verdicts"][0]["verdict"] = "not reproduced" if rerun["verdicts"][0]["verdict"] != "not reproduced" else "reproduced"
        return rerun

    assert on_zen2.compare(zen3) == [] and on_zen2.compare(zen4) == []
    assert on_zen2.compare(moved(14, 0.07)) == [] and on_zen2.compare(moved(14, -0.07)) == []  # ≤ 0.0011 + 2 × 0.04
    assert on_zen2.compare(moved(14, 0.09)), "beyond twice the spread"
    assert on_zen2.compare(moved(13, 0.005)), "the models agreed on this one: its own tolerance"
    assert on_zen2.compare(moved(14, 0.0, flip=True)), "verdicts exactly"
    # the models that made the records, and the family's record asked for alone, as before
    for variant, held_to in (("f25m1", zen3), ("f25m17", zen4), ("f26m2", zen4), ("", zen3)):
        expected = numerics.Expected(slug, "x86_64-intel", root, variant=variant)
        assert expected.spread is None and expected.compares_outputs and expected.results == held_to, variant
        assert expected.compare(_summed_otherwise(held_to, 14, 0.07))
    # a model record of other code: no spread is measured (the guard reports the stale record)
    stale = json.loads(numerics.reference_path(slug, "x86_64-intel@f25m17", root).read_text())
    numerics.reference_path(slug, "x86_64-intel@f25m17", root).write_text(json.dumps({**stale, "code_version": "0" * 16}))
    assert numerics.model_spread(slug, "x86_64-intel", "f23m49", root) is None


def test_the_spread_on_the_published_family_counts_the_published_numbers(tmp_path):
    """On the family a chapter was published on, the published results are one of the runs the
    spread is measured over (that family has no reference of its own): with one model record
    beside them, the spread is the move between the two; without them there would be no pair."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    numerics.mark_family_dependent(slug, root)
    published = numerics.published_family(slug, root)
    numerics.write_reference(slug, f"{published}@f25m17", _summed_otherwise(committed, 14, 0.05), notebook, root)
    spread = numerics.model_spread(slug, published, "f23m49", root)
    assert spread is not None and len(spread["runs"]) == 2
    assert spread["numbers"]["scores.vit|object[14]"] == pytest.approx(0.05)


def test_nbval_runs_the_cells_of_an_unrecorded_cpu_model_without_comparing_them(tmp_path, monkeypatch):
    """The conftest's side of the spread: on a CPU model without numbers where the family's
    models differ, nbval runs each cell and compares none (its own outputs are not known);
    on a recorded model it compares them against that model's record."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    numerics.mark_family_dependent(slug, root)
    numerics.write_reference(slug, "x86_64-intel", _summed_otherwise(committed, 14, 0.03), notebook, root,
                             cpu=numerics.cpu_model(ZEN3))
    numerics.write_reference(slug, "x86_64-intel@f25m17", _summed_otherwise(committed, 14, 0.07), notebook, root)
    monkeypatch.setattr("conftest.ROOT", root)
    items = _nbval_items(root / "notebooks" / f"{slug}.ipynb", notebook)

    monkeypatch.setattr(numerics, "cpu_variant", lambda cpuinfo=None: "f23m49")
    unrecorded = items()
    held_to = expect_this_familys_outputs(unrecorded, "x86_64-intel")[slug]
    assert "f23m49" in held_to and "--cpu-model" in held_to
    assert all(i.options["check"] is False and i.options["skip"] is False for i in unrecorded)

    monkeypatch.setattr(numerics, "cpu_variant", lambda cpuinfo=None: "f25m17")
    recorded = items()
    assert "x86_64-intel@f25m17" in expect_this_familys_outputs(recorded, "x86_64-intel")[slug]
    assert any(i.options["check"] for i in recorded)


def test_publishing_under_changed_code_makes_a_cpu_models_record_pending_with_its_own_move(tmp_path):
    root, slug, old, notebook = _chapter_09(tmp_path)
    numerics.mark_family_dependent(slug, root)
    intel = _summed_otherwise(old, 14, 0.01)
    zen4 = _summed_otherwise(old, 13, 0.02)
    numerics.write_reference(slug, "x86_64-intel", intel, notebook, root)
    numerics.write_reference(slug, "x86_64-amd@f25m17", zen4, notebook, root)
    new = dict(old, code_version="f" * 16)
    (root / "results" / f"{slug}.json").write_text(json.dumps(new))
    waiting = numerics.record_publication(slug, "x86_64-amd", new, old, notebook, root, variant="f23m49")
    model = numerics.reference_path(slug, "x86_64-amd@f25m17", root)
    assert model in waiting and numerics.reference_path(slug, "x86_64-intel", root) in waiting
    record = json.loads(model.read_text())
    assert record["pending"] and record["code_version"] == "f" * 16 and "--cpu-model" in record["why"]
    assert record["moves"]["numbers"]["scores.vit|object[13]"] == pytest.approx(0.02)  # its own distance
    assert record["moves"]["numbers"]["scores.vit|object[14]"] == 0
    assert list(numerics.pending_families(slug, root)) == ["x86_64-amd@f25m17", "x86_64-intel"]
    assert numerics.Expected(slug, "x86_64-amd", root, variant="f25m17").pending
    assert not numerics.Expected(slug, "x86_64-amd", root, variant="f23m49").pending


def test_a_model_that_publishes_drops_its_record_and_files_the_familys_under_the_model_it_came_from(tmp_path):
    """Zen 4 republishes chapter 03 on AMD, where the family's reference came from a Zen 3:
    Zen 4's own record is now the published numbers; the Zen 3 numbers move to Zen 3's
    record (pending under new code, measured against Zen 4's old run), so Zen 3 keeps its guard."""
    root, slug, old, notebook = _chapter_09(tmp_path)
    (root / "results" / "reference" / "published.json").write_text(json.dumps({slug: "x86_64-intel"}))
    numerics.mark_family_dependent(slug, root)
    zen3 = _summed_otherwise(old, 14, 0.01)
    zen4 = _summed_otherwise(old, 14, 0.04)
    numerics.write_reference(slug, "x86_64-amd", zen3, notebook, root, cpu=numerics.cpu_model(ZEN3))
    numerics.write_reference(slug, "x86_64-amd@f25m17", zen4, notebook, root)
    new = dict(zen4, code_version="f" * 16)
    (root / "results" / f"{slug}.json").write_text(json.dumps(new))
    numerics.record_publication(slug, "x86_64-amd", new, old, notebook, root, variant="f25m17")
    assert not numerics.reference_path(slug, "x86_64-amd", root).exists()
    assert not numerics.reference_path(slug, "x86_64-amd@f25m17", root).exists()
    moved = json.loads(numerics.reference_path(slug, "x86_64-amd@f25m1", root).read_text())
    assert moved["pending"] and moved["moves"]["numbers"]["scores.vit|object[14]"] == pytest.approx(0.03)
    intel = json.loads(numerics.reference_path(slug, "x86_64-intel", root).read_text())
    assert intel["pending"] and intel["moves"]["numbers"]["scores.vit|object[14]"] == pytest.approx(0.04)


# ----------------------------------------------------------------------------- doors the mutation sweep found open


def test_a_family_record_asked_for_alone_is_the_familys_even_where_a_cpu_model_has_its_own(tmp_path):
    """``variant=""`` is how ``replbook reference --cpu-model`` asks what the family is held to
    without this model's record; answered with the model's record, it would compare the
    rerun with itself and never write the model's numbers."""
    root, slug, committed, notebook = _chapter_09(tmp_path)
    model = numerics.variant_name("x86_64-intel", "f6m167")
    numerics.write_reference(slug, model, committed, notebook, root)
    assert numerics.reference_name(slug, "x86_64-intel", root, variant="f6m167") == model
    assert numerics.reference_name(slug, "x86_64-intel", root, variant="f6m143") == "x86_64-intel"
    assert numerics.reference_name(slug, "x86_64-intel", root, variant="") == "x86_64-intel"
    assert numerics.Expected(slug, "x86_64-intel", root, variant="").where == "x86_64-intel"
    assert numerics.Expected(slug, "x86_64-intel", root, variant="f6m167").where == model


def test_a_reference_keeps_each_cells_text_and_leaves_its_images_out():
    """nbval does not compare images; a reference that kept them would hold megabytes of PNG
    that no rerun is compared with."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("plot()", outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": "iVBOR", "image/svg+xml": "<svg/>",
                                                     "text/plain": "<Figure size 640x480>"}),
        nbformat.v4.new_output("stream", name="stdout", text="acc 0.91\n")])])
    cells = numerics.comparable_outputs(notebook)
    assert len(cells) == 1 and cells[0]["source_sha"] == numerics.source_digest("plot()")
    kept = cells[0]["outputs"]
    assert kept[0]["data"] == {"text/plain": "<Figure size 640x480>"} and kept[1]["text"] == "acc 0.91\n"


def test_a_pending_band_keeps_the_declared_relative_part():
    """A number declared within abs + rel × |value| is held on a pending family within
    (abs + 2 × its move) + rel × |value|: the widening adds to the declared band, it does not
    replace its relative part."""
    committed = {"config": {}, "tolerances": [["acc[*]", results.band(abs=0.001, rel=0.1)], ["*", results.exact()]],
                 "metrics": {"acc": [10.0, 10.0]}, "verdicts": []}
    other = json.loads(json.dumps(committed))
    other["metrics"]["acc"][0] += 0.05  # the families' last runs: acc[0] moved by 0.05
    moves = numerics.cross_family_moves(other, committed)

    def problems(delta):
        rerun = json.loads(json.dumps(committed))
        rerun["metrics"]["acc"][0] += delta
        return results.compare(rerun, numerics.pending_view(committed, rerun, moves))

    assert problems(1.1) == []  # ≤ 0.001 + 2 × 0.05 + 0.1 × 10 = 1.101
    assert problems(1.2)


def test_a_run_of_other_code_is_never_kept_as_a_reference(tmp_path):
    """The previous run becomes the old family's reference only when the new one is the same
    code: under other code it would be refused on that family's machines as stale (here a
    third family, which no pending record replaces)."""
    root, slug, old, notebook = _chapter_09(tmp_path)
    (root / "results" / "reference" / "published.json").write_text(json.dumps({slug: "aarch64"}))
    numerics.mark_family_dependent(slug, root)
    numerics.record_publication(slug, "x86_64-amd", dict(old, code_version="f" * 16), old, notebook, root)
    assert not numerics.reference_path(slug, "aarch64", root).exists()
    numerics.record_publication(slug, "x86_64-intel", dict(old, code_version="f" * 16, date="2099-01-01"),
                                dict(old, code_version="f" * 16), notebook, root)
    kept = json.loads(numerics.reference_path(slug, "x86_64-amd", root).read_text())
    assert kept["code_version"] == "f" * 16 and not kept.get("pending")  # same code: kept, as the control


def test_marking_a_chapter_family_dependent_keeps_the_others_listed(tmp_path):
    root = tmp_path
    numerics.mark_family_dependent("04_endor", root)
    numerics.mark_family_dependent("01_restor", root)
    numerics.mark_family_dependent("04_endor", root)
    assert numerics.family_dependent(root) == ["01_restor", "04_endor"]
