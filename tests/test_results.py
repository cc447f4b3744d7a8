import json
from pathlib import Path

import numpy as np
import pytest

from replbook import results


def test_verdict_rule_decisive_then_supporting():
    judge = results.judge
    assert judge("C1", "s", decisive={"a": True}, supporting={"b": True}).verdict == results.REPRODUCED
    assert judge("C1", "s", decisive={"a": True}).verdict == results.REPRODUCED
    assert judge("C1", "s", decisive={"a": True}, supporting={"b": False}).verdict == results.PARTLY
    # a failed decisive check is never "partly", whatever the supporting checks say
    assert judge("C1", "s", decisive={"a": False}, supporting={"b": True, "c": True}).verdict == results.NOT_REPRODUCED
    assert judge("C1", "s", decisive={"a": True, "b": False}).verdict == results.NOT_REPRODUCED
    untestable = judge("C1", "s", untestable="needs a GPU", supporting={"cpu": True})
    assert untestable.verdict == results.NOT_TESTABLE and "needs a GPU" in str(untestable)


def test_verdict_needs_a_decisive_check_or_a_reason():
    with pytest.raises(ValueError, match="at least one decisive check"):
        results.judge("C1", "s", supporting={"a": True})
    with pytest.raises(ValueError, match="is testable"):
        results.judge("C1", "s", decisive={"a": True}, untestable="why")
    with pytest.raises(ValueError, match="both decisive and supporting"):
        results.judge("C1", "s", decisive={"a": True}, supporting={"a": True})


def test_verdict_text_marks_the_decisive_checks():
    text = str(results.judge("C2", "s", decisive={"gain > 0": True}, supporting={"beats random": False}))
    assert text == "C2: PARTLY REPRODUCED — ✓ gain > 0 [decisive]; ✗ beats random"


TOLERANCES = {"load[*].seconds": results.ignored("wall-clock time"), "counts.*": results.exact(),
              "verdicts.*": results.band(abs=0.01), "*": results.band(abs=0.01, rel=0.1)}


def _saved(tmp_path, metrics, decisive=True, numbers=None, folder="a"):
    run = results.Run("99_test", "A test", {"preset": "book", "seed": 1})
    path = run.save([results.judge("C1", "it works", decisive={"works": np.bool_(decisive)}, numbers=numbers or {})],
                    metrics, TOLERANCES, folder=tmp_path / folder)
    return json.loads(path.read_text())


def test_run_save_writes_complete_json(results_tmp):
    run = results.Run("99_test", "A test", {"preset": "smoke", "seed": 1})
    path = run.save([results.judge("C1", "it works", decisive={"works": np.bool_(True)}, numbers={"x": np.float32(2)})],
                    {"accuracy": np.float32(0.5), "bad": float("nan"), "pair": (1, 2)}, TOLERANCES)
    assert path == results_tmp / "99_test.json"
    data = json.loads(path.read_text())
    assert data["verdicts"][0]["verdict"] == "reproduced" and data["verdicts"][0]["decisive"] == {"works": True}
    assert data["verdicts"][0]["numbers"] == {"x": 2.0}
    assert data["metrics"] == {"accuracy": 0.5, "bad": None, "pair": [1, 2]}
    assert data["preset"] == "smoke" and data["seed"] == 1 and "torch" in data["versions"]
    assert data["tolerances"][0] == ["load[*].seconds", {"kind": "ignored", "why": "wall-clock time"}]
    assert not list(results_tmp.glob("*.tmp"))


def test_a_run_never_writes_the_published_results_folder(repo_root, monkeypatch):
    monkeypatch.setenv("REPLBOOK_RESULTS_DIR", str(repo_root / "results"))
    before = sorted(p.name for p in (repo_root / "results").iterdir())
    with pytest.raises(RuntimeError, match="replbook run"):
        results.Run("99_test", "A test", {"preset": "book"}).save(
            [results.judge("C1", "s", decisive={"a": True})], {}, TOLERANCES)
    assert sorted(p.name for p in (repo_root / "results").iterdir()) == before


def test_tolerances_are_declared_properly(results_tmp):
    run = results.Run("99_test", "A test", {"preset": "smoke"})
    verdict = [results.judge("C1", "s", decisive={"a": True})]
    with pytest.raises(ValueError, match="declare at least one"):
        run.save(verdict, {}, {})
    with pytest.raises(ValueError, match="use results.exact"):
        run.save(verdict, {}, {"*": {"kind": "roughly"}})
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        results.band(abs=-1)
    with pytest.raises(ValueError, match="say why"):
        results.ignored(" ")


def test_duplicate_claims_are_refused(results_tmp):
    run = results.Run("99_test", "A test", {"preset": "smoke"})
    with pytest.raises(ValueError, match="unique"):
        run.save([results.judge("C1", "a", decisive={"x": True}), results.judge("C1", "b", decisive={"x": True})],
                 {}, TOLERANCES)


def test_patterns_match_whole_paths_literally():
    rows = results.check_tolerances({"load[*].cold_s": results.ignored("t"), "a.b": results.exact(),
                                     "*": results.band(abs=1)})
    assert results.tolerance_for("load[0].cold_s", rows)["kind"] == "ignored"
    assert results.tolerance_for("load[0].cold_s_extra", rows)["kind"] == "band"  # not a prefix match
    assert results.tolerance_for("axb", rows)["kind"] == "band"  # "." is literal, not a regex dot
    assert results.tolerance_for("a.b", rows)["kind"] == "exact"


def test_compare_passes_within_tolerance_and_names_every_failure(tmp_path):
    base = {"load": [{"seconds": 3.0}], "counts": {"n": 10, "name": "x"}, "acc": 0.80}
    committed = _saved(tmp_path, base, numbers={"gain": 0.30})
    # timing ignored, accuracy within abs 0.01 + 10%, the decisive number within 0.01
    rerun = _saved(tmp_path, {**base, "load": [{"seconds": 99.0}], "acc": 0.85}, numbers={"gain": 0.305}, folder="b")
    assert results.compare(rerun, committed) == []
    worse = _saved(tmp_path, {**base, "acc": 0.5, "counts": {"n": 11, "name": "x"}}, numbers={"gain": 0.2}, folder="c")
    problems = results.compare(worse, committed)
    assert any(p.startswith("metrics.acc: rerun 0.5 vs committed 0.8") and "band abs=0.01, rel=0.1" in p for p in problems)
    assert any(p.startswith("metrics.counts.n: rerun 11 vs committed 10 (exact)") for p in problems)
    assert any(p.startswith("verdicts.C1.gain: rerun 0.2 vs committed 0.3") for p in problems)
    assert len(problems) == 3


def test_compare_catches_changed_verdicts_structure_and_undeclared_metrics(tmp_path):
    committed = _saved(tmp_path, {"counts": {"n": 1}, "acc": [0.5, 0.6]})
    flipped = _saved(tmp_path, {"counts": {"n": 1}, "acc": [0.5, 0.6]}, decisive=False, folder="b")
    assert any(p.startswith("verdicts.C1.verdict: rerun 'not reproduced'") for p in results.compare(flipped, committed))
    assert any(p.startswith("verdicts.C1.decisive") for p in results.compare(flipped, committed))
    shorter = _saved(tmp_path, {"counts": {"n": 1}, "acc": [0.5]}, folder="c")
    assert results.compare(shorter, committed) == ["metrics.acc[1]: missing from the rerun (structure changed)"]
    no_catch_all = dict(committed, tolerances=[["counts.*", {"kind": "exact"}]])
    assert any("metrics.acc[0]: no tolerance declared" in p for p in results.compare(committed, no_catch_all))
    other_config = dict(committed, config={"preset": "book", "seed": 2})
    assert any(p.startswith("config:") for p in results.compare(other_config, committed))
    assert results.compare(committed, dict(committed, tolerances=None)) == ["99_test: the committed results declare no tolerances"]


def test_interrupted_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    results.write_atomic(path, {"old": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        results.write_atomic(path, {"new": Unserialisable()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_at_a_glance_and_run_facts():
    box = results.at_a_glance([results.judge("C1", "a | b", decisive={"x": True}),
                               results.judge("C2", "c", decisive={"x": False})])
    assert box.splitlines()[0] == "| Claim | Verdict | Seeds agree | Statement |"
    assert box.splitlines()[2] == "| C1 | **✓ reproduced** | — | a \\| b |"
    assert "✗ not reproduced" in box.splitlines()[3]
    record = {"seeds": [0, 1, 2], "claims": {"C1": {"counts": {"reproduced": 3}},
                                               "C2": {"counts": {"not reproduced": 2, "partly reproduced": 1}}}}
    box = results.at_a_glance([results.judge("C1", "a", decisive={"x": True})], record)
    assert "| **✓ reproduced** | 3/3 |" in box
    # a published verdict that only one seed in three gave (chapter 10's C3 at stop 51):
    # the box counts the seeds that gave *it*, never the commonest verdict's
    minority = {"seeds": [0, 1, 2], "claims": {"C3": {"counts": {"reproduced": 1, "not reproduced": 2}}}}
    box = results.at_a_glance([results.judge("C3", "a", decisive={"x": True})], minority)
    assert "| C3 | **✓ reproduced** | 1/3 |" in box
    facts = results.run_facts({"preset": "book", "runtime_seconds": 17.4, "machine": "m", "date": "d"}, 82.0)
    assert facts == "Preset `book` · 17 s with models cached (82 s from a cold cache) · m · d"


def test_stability_note_is_computed_from_the_record():
    verdicts = [results.judge("C1", "a", decisive={"x": True}), results.judge("C2", "b", decisive={"x": False})]
    record = {"seeds": [0, 1, 2], "claims": {"C1": {"counts": {"reproduced": 3}},
                                               "C2": {"counts": {"not reproduced": 2, "partly reproduced": 1}}}}
    note = results.stability_note(verdicts, record)
    assert "C1 ✓ reproduced · 3/3 seeds agree" in note
    assert "C2 ✗ not reproduced · 2/3 seeds agree (2 ✗ not reproduced, 1 ◐ partly reproduced)" in note
    assert "Seeds disagree on C2" in note
    minority = {"seeds": [0, 1, 2], "claims": {"C1": {"counts": {"reproduced": 1, "not reproduced": 2}},
                                                 "C2": {"counts": {"not reproduced": 3}}}}
    assert "C1 ✓ reproduced · 1/3 seeds agree (2 ✗ not reproduced, 1 ✓ reproduced)" in \
        results.stability_note(verdicts, minority)
    agreeing = {"seeds": [0, 1], "claims": {"C1": {"counts": {"reproduced": 2}}, "C2": {"counts": {"not reproduced": 2}}}}
    assert "Every verdict came out the same on every seed" in results.stability_note(verdicts, agreeing)
    assert "no record yet" in results.stability_note(verdicts, None)
    assert "not shown" in results.stability_note(verdicts, record, current=False)


def test_code_version_follows_the_notebook_code_and_its_method_modules(repo_root, tmp_path):
    import shutil

    import nbformat

    modules = results.method_modules(repo_root / "notebooks" / "09_vit_decompose.ipynb")
    assert {"vitdecomp", "cliplike", "models", "data"} <= set(modules)  # imported, and reached through imports
    assert not set(modules) & results.INFRASTRUCTURE
    (tmp_path / "notebooks").mkdir()
    shutil.copy(repo_root / "notebooks" / "00_model_zoo.ipynb", tmp_path / "notebooks")
    before = results.code_version("00_model_zoo", tmp_path)
    assert before == results.source_version("00_model_zoo", repo_root)  # no refactor recorded in tmp_path
    nb = nbformat.read(tmp_path / "notebooks" / "00_model_zoo.ipynb", as_version=4)
    for cell in nb.cells:  # outputs and markdown do not count ...
        if cell.cell_type == "markdown":
            cell.source += "\nmore prose"
        if cell.cell_type == "code":
            cell.outputs = []
    nbformat.write(nb, tmp_path / "notebooks" / "00_model_zoo.ipynb")
    assert results.code_version("00_model_zoo", tmp_path) == before
    rule = next(c for c in nb.cells if "verdicts = [" in c.source)  # ... a changed rule does
    rule.source = rule.source.replace(">= 5", ">= 4")
    nbformat.write(nb, tmp_path / "notebooks" / "00_model_zoo.ipynb")
    assert results.code_version("00_model_zoo", tmp_path) != before


def test_a_proven_refactor_keeps_the_code_version_for_exactly_its_sources(repo_root, tmp_path):
    """results.REFACTORS: sources re-executed with every cell and number as committed keep the
    version the records hold; other sources, or a rerun that failed anywhere, do not."""
    import json
    import shutil

    (tmp_path / "notebooks").mkdir()
    shutil.copy(repo_root / "notebooks" / "00_model_zoo.ipynb", tmp_path / "notebooks")
    sources = results.source_version("00_model_zoo", tmp_path)
    assert results.code_version("00_model_zoo", tmp_path) == sources  # nothing recorded

    def version_with(**entry) -> str:
        proof = {"from": sources, "holds": "0ld0ld0ld0ld0ld0", "why": "cache plumbing", "cells_passed": 12,
                 "cells_failed": 0, "guard_problems": [], **entry}
        (tmp_path / results.REFACTORS).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / results.REFACTORS).write_text(json.dumps({"00_model_zoo": proof}))
        return results.code_version("00_model_zoo", tmp_path)

    assert version_with() == "0ld0ld0ld0ld0ld0"
    assert version_with(**{"from": "f" * 16}) == sources, "a proof of other sources settles nothing here"
    assert version_with(cells_failed=1) == sources, "a cell that failed under nbval is no proof"
    assert version_with(cells_passed=0) == sources, "a rerun that ran no cell is no proof"
    assert version_with(guard_problems=["metrics.x moved"]) == sources, "a moved number is no proof"
    # while it is being proven the held version stands, so the rerun reads the records as current
    assert version_with(cells_passed=0, proving=True) == "0ld0ld0ld0ld0ld0"
    assert version_with(**{"from": "f" * 16, "proving": True}) == sources
    # begin_refactor writes that provisional entry for the committed version
    fresh = tmp_path / "fresh"
    (fresh / "results").mkdir(parents=True)
    shutil.copytree(tmp_path / "notebooks", fresh / "notebooks")
    committed = json.loads((repo_root / "results" / "00_model_zoo.json").read_text())
    for held in ("0ld0ld0ld0ld0ld0", sources):
        (fresh / "results" / "00_model_zoo.json").write_text(json.dumps({**committed, "code_version": held}))
        results.begin_refactor(["00_model_zoo"], "a test", fresh)
        expected = {"00_model_zoo": {"from": sources, "holds": held, "why": "a test", "earlier": "", "proving": True}}
        assert results.refactors(fresh) == (expected if held != sources else {}), "nothing to settle: no entry"
        assert results.code_version("00_model_zoo", fresh) == held
    with pytest.raises(ValueError, match="why=''"):
        results.begin_refactor(["00_model_zoo"], " ", fresh)


def test_a_new_refactor_proof_keeps_the_whys_its_held_version_went_through(repo_root, tmp_path):
    """A chapter's refactor record says every change its held version was carried across: a
    second proof joins its why to the first's with "; then ", a retry of the same proof does
    not repeat it, and an entry for another held version (records moved since) is not history."""
    import json
    import shutil

    (tmp_path / "notebooks").mkdir()
    shutil.copy(repo_root / "notebooks" / "00_model_zoo.ipynb", tmp_path / "notebooks")
    (tmp_path / "results").mkdir()
    committed = json.loads((repo_root / "results" / "00_model_zoo.json").read_text())
    held = "0ld0ld0ld0ld0ld0"
    (tmp_path / "results" / "00_model_zoo.json").write_text(json.dumps({**committed, "code_version": held}))
    sources = results.source_version("00_model_zoo", tmp_path)
    path = tmp_path / results.REFACTORS
    proven = {"holds": held, "why": "pins", "cells_passed": 12, "cells_failed": 0, "guard_problems": []}

    def begin(earlier: dict, why: str) -> dict:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"00_model_zoo": earlier}))
        results.begin_refactor(["00_model_zoo"], why, tmp_path)
        return results.refactors(tmp_path)["00_model_zoo"]

    later = begin({**proven, "from": "e" * 16}, "wikitext pinned")  # proven for the sources before this edit
    assert (later["why"], later["earlier"]) == ("pins; then wikitext pinned", "pins")
    assert begin(later, "wikitext pinned, retried")["why"] == "pins; then wikitext pinned, retried"
    redone = {**proven, "from": sources, "why": "pins; then wikitext pinned", "earlier": "pins"}
    assert begin(redone, "wikitext pinned again")["why"] == "pins; then wikitext pinned again"
    assert begin({**proven, "from": "e" * 16, "holds": "f" * 16}, "x")["why"] == "x", "another version's history"


def test_code_version_follows_an_edit_of_a_method_module_not_of_infrastructure(repo_root, tmp_path):
    """A stability record made before the chapter's method changed must be detected as stale:
    one character changed in a module the chapter reaches changes its code version; an edit
    of the book's machinery (plotting) or of another chapter's module does not."""
    import shutil

    package = tmp_path / "replbook"
    shutil.copytree(Path(results.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = results.code_version("09_vit_decompose", repo_root, package)
    assert before == results.code_version("09_vit_decompose", repo_root)

    def edited(name: str, old: str, new: str) -> str:
        source = (package / f"{name}.py").read_text()
        assert old in source, (name, old)
        (package / f"{name}.py").write_text(source.replace(old, new, 1))
        try:
            return results.code_version("09_vit_decompose", repo_root, package)
        finally:
            (package / f"{name}.py").write_text(source)

    assert edited("vitdecomp", "def ", "def  ") != before  # the chapter's own method
    assert edited("cliplike", "def ", "def  ") != before  # a model organism it reaches through imports
    assert edited("plotting", "def ", "def  ") == before  # machinery: figures do not move numbers
    assert edited("restor", "def ", "def  ") == before  # another chapter's method


def test_a_supporting_check_on_wall_clock_numbers_may_flip_only_where_declared():
    def saved(timed: bool, exactness: bool = True, fit: bool = False, decisive: bool = True):
        v = results.judge("C3", "s", decisive={"claim": decisive},
                          supporting={"faster here": timed, "outputs identical": exactness, "model fits": fit})
        return {"slug": "99_test", "config": {}, "metrics": {}, "verdicts": [dict(vars(v), verdict=v.verdict)],
                "tolerances": results.check_tolerances({"verdicts.C3.supporting.faster*": results.ignored("wall clock"),
                                                        "*": results.exact()})}

    committed = saved(timed=False)  # partly: "model fits" fails
    assert results.compare(saved(timed=True), committed) == []  # the declared timed check flipped, verdict the same
    problems = results.compare(saved(timed=False, exactness=False), committed)
    assert problems == ["verdicts.C3.supporting.outputs identical: rerun False ≠ committed True (exact)"]
    # a flip of the timed check that changes the verdict is still caught, as a verdict change
    problems = results.compare(saved(timed=True, fit=True), saved(timed=False, fit=True))
    assert len(problems) == 1 and problems[0].startswith("verdicts.C3.verdict: rerun 'reproduced'")
    assert results.compare(saved(timed=False, decisive=False), committed)  # decisive checks: always exact


def test_a_band_is_abs_plus_rel_times_the_committed_value_and_nan_never_fits(tmp_path):
    tolerances = {"x": results.band(abs=0.25, rel=0.25), "*": results.exact()}

    def saved(x, folder):
        run = results.Run("99_test", "A test", {"preset": "book", "seed": 1})
        path = run.save([results.judge("C1", "s", decisive={"works": True})], {"x": x}, tolerances,
                        folder=tmp_path / folder)
        return dict(json.loads(path.read_text()), metrics={"x": x})  # NaN kept as a float, as a rerun holds it

    committed = saved(2.0, "committed")
    # allowed = 0.25 + 0.25 × |2.0| = 0.75 (binary-exact numbers: the edge itself is tested)
    assert results.compare(saved(2.75, "edge"), committed) == []
    assert results.compare(saved(1.25, "low edge"), committed) == []
    # a band read off the rerun's value (0.25 + 0.25 × 2.875 > 0.875) would let this through
    assert results.compare(saved(2.875, "over"), committed)
    assert results.compare(saved(float("nan"), "nan"), committed), "NaN is never within a band"


def test_exact_tells_a_flag_from_a_count_and_a_changed_set_of_supporting_checks_is_caught():
    def saved(flag, supporting):
        v = results.judge("C1", "s", decisive={"a": True}, supporting=supporting)
        return {"slug": "99_test", "config": {}, "metrics": {"flag": flag},
                "verdicts": [dict(vars(v), verdict=v.verdict)],
                "tolerances": results.check_tolerances({"*": results.exact()})}

    assert results.compare(saved(True, {"b": True}), saved(True, {"b": True})) == []
    assert results.compare(saved(True, {"b": True}), saved(1, {"b": True})), "True == 1 in Python; not here"
    added = results.compare(saved(True, {"b": True, "c": True}), saved(True, {"b": True}))
    assert added and "supporting: checks" in added[0], "a new passing check leaves the verdict alone, not the record"


def test_mean_interval_is_the_two_sided_t_interval_over_n_minus_one_degrees_of_freedom():
    mean, low, high = results.mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729749462 / np.sqrt(3)  # t(0.975, 2) x sample std 1 / sqrt(3)
    assert mean == 2.0 and low == pytest.approx(2 - half, rel=1e-9) and high == pytest.approx(2 + half, rel=1e-9)
    mean, low, high = results.mean_interval([1.0, 2.0, 3.0, 4.0], level=0.9)
    half = 2.3533634348018233 * np.std([1.0, 2.0, 3.0, 4.0], ddof=1) / 2  # t(0.95, 3)
    assert (low, high) == (pytest.approx(2.5 - half, rel=1e-9), pytest.approx(2.5 + half, rel=1e-9))
    assert np.isnan(results.mean_interval([5.0])[1]), "one value has no interval"
