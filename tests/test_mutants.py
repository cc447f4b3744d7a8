"""The mutation sweep (tests/mutants/, `make mutants` by hand): the catalogue of plausible wrong
implementations still applies to the library, and the sweep tells a caught mutant from a missed
one, restores what it mutated and notices when a mutant's inputs change, and the committed
record (results/guard/mutants.json) covers the catalogue, is current and shows every mutant
caught but those declared equivalent."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_sweep", ROOT / "tests" / "mutants" / "run.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def test_every_catalogued_mutant_still_applies_exactly_once():
    """A refactor that moves a mutant's anchor must update the catalogue, or the door it
    guarded is silently no longer checked."""
    catalogue = sweep.load_catalogue()
    assert len({sweep.key(m) for m in catalogue}) == len(catalogue), "two mutants share a module and name"
    problems = []
    for mutant in catalogue:
        # a library module by its name, a triton kernel's module as kernels.<name>
        stem = Path(mutant["file"]).stem
        assert mutant["module"] == (f"kernels.{stem}" if mutant["file"].startswith("kernels/") else stem), \
            sweep.key(mutant)
        assert mutant["tests"] and all((ROOT / t).is_file() for t in mutant["tests"]), sweep.key(mutant)
        try:
            sweep.apply(mutant, (ROOT / mutant["file"]).read_text())
        except ValueError as error:
            problems.append(str(error))
    assert not problems, "\n".join(problems)


def test_a_mutant_that_leaves_its_module_unable_to_compile_is_refused():
    """runner's "timings kept in the notebook" once deleted a loop's only statement: the
    module no longer compiled, every test failed at import, and the record called it caught."""
    mutant = {"module": "toy", "name": "body gone", "file": "lib/toy.py", "old": "        total += x\n", "new": ""}
    text = "def total(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n"
    with pytest.raises(ValueError, match="unable to compile"):
        sweep.apply(mutant, text)
    assert "pass" in sweep.apply({**mutant, "new": "        pass\n"}, text)


def test_the_committed_sweep_is_current_and_every_mutant_is_caught():
    """The record of `make mutants`: every catalogued mutant in it, made from the library file,
    tests and mutation as they are now (a change to any of them makes the entry stale, as a
    changed chapter makes its by-hand record stale), and killed by a test unless the catalogue
    declares it equivalent and says why. A mutant that survives is a door a plausible bug walks
    through: add the test that closes it, or the reason it cannot be told apart."""
    assert sweep.RECORD.exists(), f"no {sweep.RECORD.relative_to(ROOT)}: run `make mutants ARGS=--all` (~30 min)"
    record = json.loads(sweep.RECORD.read_text())
    catalogue = sweep.load_catalogue()
    assert set(record["mutants"]) == {sweep.key(m) for m in catalogue}, \
        "the record and the catalogue name different mutants: run `make mutants`"
    stale = [sweep.key(m) for m in catalogue if record["mutants"][sweep.key(m)]["fingerprint"] != sweep.fingerprint(m)]
    assert not stale, (f"{len(stale)} mutants' library file, tests or mutation changed since the sweep: "
                       f"run `make mutants` (reruns only these): {stale[:8]}")
    survived = [sweep.key(m) for m in catalogue
                if record["mutants"][sweep.key(m)]["status"] != "killed" and not m.get("equivalent")]
    assert not survived, f"no test fails on these wrong implementations: {survived}"
    # caught means a named test failed on it: not a collection error, an import error or a timeout
    unnamed = [name for name, entry in record["mutants"].items() if entry["status"] == "killed" and "::" not in entry["evidence"]]
    assert not unnamed, f"these mutants are recorded caught with no test that failed on them: {unnamed}"
    assert all(len(m["equivalent"]) > 40 for m in catalogue if "equivalent" in m), \
        "an equivalent mutant must say why it cannot be told apart"


def test_the_record_check_refuses_a_missed_or_stale_mutant(monkeypatch, tmp_path):
    """The check above can fail: a survived mutant, a stale fingerprint, a missing one and one
    recorded caught with no failing test each do."""
    catalogue = sweep.load_catalogue()[:2]
    good = {"mutants": {sweep.key(m): {"file": m["file"], "status": "killed", "fingerprint": sweep.fingerprint(m),
                                       "evidence": m["tests"][0] + "::test_that_failed"} for m in catalogue}}
    monkeypatch.setattr(sweep, "load_catalogue", lambda path=None: catalogue)
    monkeypatch.setattr(sweep, "RECORD", tmp_path / "mutants.json")
    for spoil, message in [(lambda r: None, None),
                           (lambda r: r["mutants"][sweep.key(catalogue[0])].update(status="survived"), "no test fails"),
                           (lambda r: r["mutants"][sweep.key(catalogue[1])].update(fingerprint="0" * 16), "changed since"),
                           (lambda r: r["mutants"].pop(sweep.key(catalogue[1])), "different mutants"),
                           (lambda r: r["mutants"][sweep.key(catalogue[0])].update(evidence=""), "no test that failed")]:
        record = json.loads(json.dumps(good))
        spoil(record)
        sweep.RECORD.write_text(json.dumps(record))
        if message is None:
            test_the_committed_sweep_is_current_and_every_mutant_is_caught()
        else:
            with pytest.raises(AssertionError, match=message):
                test_the_committed_sweep_is_current_and_every_mutant_is_caught()


@pytest.fixture
def toy_project(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "lib" / "toy.py").write_text("def mean(xs):\n    return sum(xs) / len(xs)\n\n\nSCALE = 2\n")
    (tmp_path / "tests" / "test_toy.py").write_text(
        "import sys\nsys.path.insert(0, 'lib')\nimport toy\n\n\ndef test_mean():\n    assert toy.mean([1, 2, 6]) == 3\n")
    return tmp_path


def toy_mutant(old, new):
    return {"module": "toy", "name": f"{old} -> {new}", "file": "lib/toy.py", "old": old, "new": new,
            "tests": ["tests/test_toy.py"]}


def test_the_sweep_tells_a_caught_mutant_from_a_missed_one_and_restores_the_file(toy_project):
    original = (toy_project / "lib" / "toy.py").read_text()
    caught = sweep.run_mutant(toy_mutant("/ len(xs)", "/ max(len(xs) - 1, 1)"), toy_project)
    missed = sweep.run_mutant(toy_mutant("SCALE = 2", "SCALE = 3"), toy_project)  # no test reads SCALE
    assert caught["status"] == "killed" and "test_mean" in caught["evidence"]
    assert missed["status"] == "survived"
    assert (toy_project / "lib" / "toy.py").read_text() == original
    assert not (toy_project / "runs" / sweep.IN_PROGRESS.name).exists()
    # the fingerprint moves with the library file and with the tests that judge it
    before = sweep.fingerprint(toy_mutant("SCALE = 2", "SCALE = 3"), toy_project)
    (toy_project / "tests" / "test_toy.py").write_text(
        (toy_project / "tests" / "test_toy.py").read_text() + "\n\ndef test_scale():\n    assert toy.SCALE == 2\n")
    assert sweep.fingerprint(toy_mutant("SCALE = 2", "SCALE = 3"), toy_project) != before
    assert sweep.run_mutant(toy_mutant("SCALE = 2", "SCALE = 3"), toy_project)["status"] == "killed"


def test_the_sweep_refuses_an_anchor_that_is_missing_or_ambiguous_and_repairs_a_killed_sweep(toy_project):
    text = (toy_project / "lib" / "toy.py").read_text()
    with pytest.raises(ValueError, match="occurs 0 times"):
        sweep.apply(toy_mutant("len(ys)", "1"), text)
    with pytest.raises(ValueError, match="occurs 2 times"):
        sweep.apply(toy_mutant("xs", "ys"), "xs + xs")
    # a sweep killed with SIGKILL leaves the mutated file and its marker: the next run puts it back
    (toy_project / "runs").mkdir()
    (toy_project / "runs" / sweep.IN_PROGRESS.name).write_text(json.dumps({"file": "lib/toy.py", "original": text}))
    (toy_project / "lib" / "toy.py").write_text(text.replace("SCALE = 2", "SCALE = 3"))
    assert sweep.restore_interrupted(toy_project) == "lib/toy.py"
    assert (toy_project / "lib" / "toy.py").read_text() == text
    assert sweep.restore_interrupted(toy_project) is None


def test_make_mutants_runs_the_sweep():
    make = subprocess.run(["make", "-n", "mutants"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0 and "tests/mutants/run.py" in make.stdout, make.stdout + make.stderr


NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}  # as the page spells them


def test_how_to_run_states_the_catalogue_and_the_record_as_committed():
    """The page's figures are the committed ones: how many mutants, how many caught, how many
    equivalent (a typed figure no test reads goes stale with the next sweep)."""
    page = " ".join((ROOT / "book" / "how-to-run.md").read_text().split())
    catalogue = sweep.load_catalogue()
    statuses = [entry["status"] for entry in json.loads(sweep.RECORD.read_text())["mutants"].values()]
    equivalent = sum("equivalent" in m for m in catalogue)
    modules = sorted({m["module"] for m in catalogue})
    for phrase in [f"lists {len(catalogue)} wrong implementations of {len(modules)} library modules ({', '.join(modules)})",
                   f"shows {statuses.count('killed')} caught and {NUMBER_WORDS.get(equivalent, str(equivalent))} equivalent"]:
        assert phrase in page, f"how-to-run no longer says {phrase!r}"
