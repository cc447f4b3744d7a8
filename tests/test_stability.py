"""Verdict stability records (``results/stability/``): the unit rules, and the check CI
makes that each record belongs to the committed results and the current code."""
import json

import nbformat
import pytest

from conftest import ROOT
from replbook import results, stability

SLUGS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# chapters whose K = 3 record is not made yet: each takes three book runs by hand, with
# cold trainings for every new seed (10 to 40 minutes a chapter on 2 cores). The test below
# fails once a record exists, so this list only shrinks.
PENDING: set[str] = set()


def test_seed_overrides_move_every_seed_parameter_and_never_reuse_a_seed():
    assert stability.seed_overrides({"seed": 0, "n": 5}, 0) == {}
    assert stability.seed_overrides({"seed": 0, "n": 5}, 2) == {"seed": 2}
    assert stability.seed_overrides({"seeds": [0, 1, 2], "data_seed": 0}, 1) == {"seeds": [3, 4, 5], "data_seed": 1}
    assert stability.seed_overrides({"seeds": [0, 1, 2]}, 2) == {"seeds": [6, 7, 8]}
    # a committed seed other than 0 moves from itself (seed 5's second run is 6, not 1)
    assert stability.seed_overrides({"seed": 5, "data_seed": 7}, 2) == {"seed": 7, "data_seed": 9}
    used = [s for i in range(3) for s in (stability.seed_overrides({"seeds": [1, 2, 3]}, i) or {"seeds": [1, 2, 3]})["seeds"]]
    assert len(used) == len(set(used))
    with pytest.raises(ValueError, match="none of the seed parameters"):
        stability.seed_overrides({"n": 1}, 1)


def test_stability_claims_count_verdicts_and_spread_numbers():
    runs = [{"index": 0, "verdicts": {"C1": "reproduced", "C2": "partly reproduced"}, "numbers": {"C1": {"gain": 0.3}}},
            {"index": 1, "verdicts": {"C1": "reproduced", "C2": "not reproduced"}, "numbers": {"C1": {"gain": 0.1}}},
            {"index": 2, "verdicts": {"C1": "not reproduced", "C2": "not reproduced"}, "numbers": {"C1": {"gain": -0.1}}}]
    claims = results.stability_claims(runs)
    assert claims["C1"]["counts"] == {"reproduced": 2, "not reproduced": 1} and claims["C1"]["committed"] == "reproduced"
    assert claims["C1"]["numbers"]["gain"]["min"] == -0.1 and claims["C1"]["numbers"]["gain"]["max"] == 0.3
    assert claims["C2"]["counts"] == {"partly reproduced": 1, "not reproduced": 2}
    # the seeds that gave the verdict asked about, not those of the commonest verdict
    assert results.agreement({"claims": claims}, "C2", "partly reproduced") == "1/3"
    assert results.agreement({"claims": claims}, "C2", "not reproduced") == "2/3"
    assert results.agreement({"claims": claims}, "C2", "reproduced") == "0/3"
    assert results.agreement(None, "C2", "reproduced") == "—"


def test_the_executing_run_stands_for_the_committed_seed():
    """The chapter's verdict section counts its own verdicts as seed 0 with the record's other seeds."""
    record = {"runs": [{"index": 0, "verdicts": {"C1": "not reproduced"}, "numbers": {}},
                       {"index": 1, "verdicts": {"C1": "reproduced"}, "numbers": {}},
                       {"index": 2, "verdicts": {"C1": "reproduced"}, "numbers": {}}]}
    merged = results.with_this_run(record, [results.judge("C1", "s", decisive={"x": True}, numbers={"g": 1.0})])
    assert merged["claims"]["C1"]["counts"] == {"reproduced": 3} and merged["seeds"] == [0, 1, 2]
    assert merged["claims"]["C1"]["numbers"]["g"]["values"] == [1.0]


@pytest.mark.parametrize("slug", SLUGS)
def test_stability_record_matches_the_committed_results_and_code(slug):
    """A record is valid only for the code it was made with: its code version (the
    notebook's code cells and the replbook modules it reaches, see results.code_version)
    must equal the current one and the committed results'. A change to a chapter's rule or
    method after the record was made fails here until `replbook stability` is rerun."""
    record = results.load_stability(slug, ROOT)
    if slug in PENDING:
        assert record is None, f"{slug} has a stability record now: remove it from PENDING"
        pytest.skip(f"{slug}: no stability record yet (listed in PENDING)")
    assert record is not None, f"{slug}: no results/stability/{slug}.json (run `replbook stability {slug[:2]} --seeds 3`)"
    saved = json.loads((ROOT / "results" / f"{slug}.json").read_text())
    current = results.code_version(slug, ROOT)
    assert saved["code_version"] == current, (
        f"{slug}: results/{slug}.json was made by other code than the committed notebook and modules: re-execute it")
    assert record["code_version"] == current, (
        f"{slug}: the chapter's rule or method changed after its stability record was made: rerun "
        f"`replbook stability {slug[:2]} --seeds 3`")
    assert record["preset"] == saved["preset"] == "book"
    assert len(record["seeds"]) >= 3 and len(set(record["seeds"])) == len(record["seeds"])
    committed = {v["claim"]: v["verdict"] for v in saved["verdicts"]}
    assert sorted(record["claims"]) == sorted(committed)
    assert {c: e["committed"] for c, e in record["claims"].items()} == committed, \
        "the record's committed-seed verdicts differ from results/"
    for claim, entry in record["claims"].items():
        assert sum(entry["counts"].values()) == len(record["seeds"]) and set(entry["counts"]) <= set(results.VERDICTS)
    # the record's committed seed is the published run itself, numbers and all (a carried-forward
    # record's too: carry_forward replaces it with the rerun it checked)
    own = next(r for r in record["runs"] if r["index"] == 0)
    assert own["verdicts"] == committed and own["numbers"] == {v["claim"]: v.get("numbers", {}) for v in saved["verdicts"]}, \
        f"{slug}: the record's committed-seed run is not results/{slug}.json"
    for step in record.get("carried_forward", []):
        assert set(step) - {"parameters_added"} == {"from", "to", "date", "check"} and step["from"] != step["to"]
        assert set(step.get("parameters_added", {})) <= set(saved["config"]), "an added parameter is in the config"


# ----------------------------------------------------------------------------- carry-forward


@pytest.fixture
def chapter_with_record(tmp_path):
    """A copy of chapter 09 (its notebook, results and record) in a scratch root, its code
    then changed by a comment, so the record is stale."""
    slug = "09_vit_decompose"
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results" / "stability").mkdir(parents=True)
    source = (ROOT / "notebooks" / f"{slug}.ipynb").read_text()
    (tmp_path / "notebooks" / f"{slug}.ipynb").write_text(source)
    saved = json.loads((ROOT / "results" / f"{slug}.json").read_text())
    record = json.loads((ROOT / "results" / "stability" / f"{slug}.json").read_text())
    saved["code_version"] = record["code_version"] = results.code_version(slug, tmp_path)
    (tmp_path / "results" / f"{slug}.json").write_text(json.dumps(saved))
    (tmp_path / "results" / "stability" / f"{slug}.json").write_text(json.dumps(record))
    nb = json.loads(source)
    code = next(c for c in nb["cells"] if c["cell_type"] == "code"
                and not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", [])))
    code["source"] = ["# a refactor\n", *code["source"]]
    (tmp_path / "notebooks" / f"{slug}.ipynb").write_text(json.dumps(nb))
    assert results.code_version(slug, tmp_path) != record["code_version"]
    return slug, tmp_path, saved, record


def _fake_runner(monkeypatch, slug, saved, change=None, during=None):
    """``runner.run`` as stability calls it, without running anything: a run given an
    ``out_dir`` (another seed) writes its results there, a run without one publishes to
    ``results/``. ``change(new)`` edits each new results file, ``during(count)`` runs after
    each call. Returns one entry per call: the overrides it got, whether it published, and
    the stability record as that run found it (current? which seeds?), which is what its
    verdict section would read."""
    from replbook import runner

    calls = []

    def run(chapter, preset, parameters=None, root=None, publish=None, out_dir=None, progress=True):
        record = results.load_stability(slug, root)
        calls.append({"overrides": dict(parameters or {}), "published": out_dir is None,
                      "record_current": results.stability_current(record, slug, root),
                      "record_seeds": (record or {}).get("seeds")})
        new = json.loads(json.dumps(saved))
        new["code_version"] = results.code_version(slug, root)
        new["config"].update(parameters or {})
        if change:
            change(new)
        folder = (out_dir or root) / "results"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{slug}.json").write_text(json.dumps(new))
        if during:
            during(len(calls))
        return root / "notebooks" / f"{slug}.ipynb"

    monkeypatch.setattr(runner, "run", run)
    return calls


def test_carry_forward_keeps_a_record_whose_rerun_moves_no_number(chapter_with_record, monkeypatch):
    slug, root, saved, record = chapter_with_record
    calls = _fake_runner(monkeypatch, slug, saved)
    stability.carry_forward(slug[:2], root, progress=False)
    carried = results.load_stability(slug, root)
    assert [c["record_current"] for c in calls] == [True]  # marked current while it runs
    assert carried["code_version"] == results.code_version(slug, root) != record["code_version"]
    assert carried["carried_forward"][-1]["from"] == record["code_version"]
    assert [r for r in carried["runs"] if r["index"] != 0] == [r for r in record["runs"] if r["index"] != 0]
    assert carried["claims"] == record["claims"]


def test_carry_forward_accepts_an_added_parameter_and_says_so_but_not_a_changed_one(chapter_with_record, monkeypatch):
    slug, root, saved, record = chapter_with_record
    added = {"a_new_parameter": "its old behaviour"}  # a name the chapter's config does not have yet
    assert not set(added) & set(saved["config"])
    _fake_runner(monkeypatch, slug, saved, lambda new: new["config"].update(added))
    stability.carry_forward(slug[:2], root, progress=False)
    assert results.load_stability(slug, root)["carried_forward"][-1]["parameters_added"] == added
    (root / "results" / "stability" / f"{slug}.json").write_text(json.dumps(record))
    (root / "results" / f"{slug}.json").write_text(json.dumps(saved))
    key = next(iter(saved["config"]))
    _fake_runner(monkeypatch, slug, saved, lambda new: new["config"].update({key: "changed"}))
    with pytest.raises(stability.CarryForwardRefused, match="config"):
        stability.carry_forward(slug[:2], root, progress=False)


def test_carry_forward_refuses_a_rerun_that_moved_a_number(chapter_with_record, monkeypatch):
    slug, root, saved, record = chapter_with_record
    claim = saved["verdicts"][0]
    name = next(iter(claim["numbers"]))

    def move(new):
        new["verdicts"][0]["numbers"][name] = claim["numbers"][name] + 0.5  # past any tolerance here

    published = (root / "results" / f"{slug}.json").read_bytes()
    _fake_runner(monkeypatch, slug, saved, move)
    with pytest.raises(stability.CarryForwardRefused, match=name):
        stability.carry_forward(slug[:2], root, progress=False)
    assert results.load_stability(slug, root) == record, "a refused record keeps its old code version (stale)"
    assert (root / "results" / f"{slug}.json").read_bytes() == published, "the refused run stays published"


def test_a_refused_carry_forward_leaves_the_other_familys_reference_as_it_was(chapter_with_record, monkeypatch):
    """Publishing under new code turns the other family's reference into a pending record
    (numerics.record_publication); a refused run puts the reference back, and removes a
    record its publication wrote where there was none."""
    from replbook import numerics

    slug, root, saved, record = chapter_with_record
    (root / "results" / "reference").mkdir()
    (root / "results" / "reference" / "published.json").write_text(json.dumps({slug: "x86_64-amd"}))
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-amd")
    numerics.mark_family_dependent(slug, root)
    notebook = nbformat.read(root / "notebooks" / f"{slug}.ipynb", 4)
    numerics.write_reference(slug, "x86_64-intel", saved, notebook, root)
    intel = numerics.reference_path(slug, "x86_64-intel", root)
    before = intel.read_bytes()
    stray = numerics.reference_path(slug, "aarch64", root)

    def move_and_publish(new):
        new["verdicts"][0]["numbers"][next(iter(new["verdicts"][0]["numbers"]))] += 0.5
        assert numerics.record_publication(slug, "x86_64-amd", new, saved, notebook, root) == [intel]
        numerics.write_pending(slug, "aarch64", new, "x86_64-amd", {}, None, root)

    _fake_runner(monkeypatch, slug, saved, move_and_publish)
    with pytest.raises(stability.CarryForwardRefused):
        stability.carry_forward(slug[:2], root, progress=False)
    assert intel.read_bytes() == before and not stray.exists()


def test_carry_forward_is_refused_where_the_chapters_numbers_are_another_familys(chapter_with_record, monkeypatch):
    """On an Intel machine, a chapter published from an AMD one whose numbers differ on Intel
    (it has an Intel reference) is not carried forward: the rerun would replace AMD's numbers."""
    from replbook import numerics

    slug, root, saved, record = chapter_with_record
    calls = _fake_runner(monkeypatch, slug, saved)
    (root / "results" / "reference").mkdir()
    (root / "results" / "reference" / "published.json").write_text(json.dumps({slug: "x86_64-amd"}))
    monkeypatch.setattr(numerics, "family", lambda environ=None, *a: "x86_64-intel")
    stability.carry_forward(slug[:2], root, progress=False)  # no intel reference: numbers alike, allowed
    assert [c["record_current"] for c in calls] == [True]  # marked current while it runs
    (root / "results" / "stability" / f"{slug}.json").write_text(json.dumps(record))  # stale again
    (root / "results" / f"{slug}.json").write_text(json.dumps(saved))
    numerics.write_reference(slug, "x86_64-intel", saved, nbformat.read(root / "notebooks" / f"{slug}.ipynb", 4), root)
    with pytest.raises(ValueError, match="carry it forward on a x86_64-amd machine"):
        stability.carry_forward(slug[:2], root, progress=False)
    assert len(calls) == 1 and results.load_stability(slug, root) == record


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failed_carry_forward_restores_the_stale_record(chapter_with_record, monkeypatch, stop):
    """Marked current while the chapter runs, the record must go back to its old code
    version when the run is stopped (Ctrl-C, SIGTERM) or fails, or the tests would take
    an unchecked record for a current one."""
    from replbook import runner

    slug, root, saved, record = chapter_with_record

    def run(*args, **kwargs):
        assert results.load_stability(slug, root)["code_version"] != record["code_version"]  # marked current
        (root / "results" / f"{slug}.json").write_text("{}")  # stopped after the half-way publish
        raise stop("stopped mid-run")

    published = (root / "results" / f"{slug}.json").read_bytes()
    monkeypatch.setattr(runner, "run", run)
    with pytest.raises(stop):
        stability.carry_forward(slug[:2], root, progress=False)
    assert results.load_stability(slug, root) == record
    assert (root / "results" / f"{slug}.json").read_bytes() == published


def test_carry_forward_needs_the_run_the_record_was_made_with(chapter_with_record):
    slug, root, saved, record = chapter_with_record
    (root / "results" / f"{slug}.json").write_text(json.dumps({**saved, "code_version": "0" * 16}))
    with pytest.raises(ValueError, match="is not the run the stability record was made with"):
        stability.carry_forward(slug[:2], root, progress=False)


# ----------------------------------------------------------------------------- the seed runs


def test_a_stability_run_reruns_every_other_seed_then_publishes_the_committed_one(chapter_with_record, monkeypatch):
    slug, root, saved, _ = chapter_with_record
    calls = _fake_runner(monkeypatch, slug, saved)
    path = stability.run(slug[:2], seeds=3, root=root, progress=False)
    # K - 1 other seeds under runs/, then the committed one, published
    assert [c["overrides"] for c in calls] == [{"seed": 1}, {"seed": 2}, {}]
    assert [c["published"] for c in calls] == [False, False, True]
    # the committed seed's run finds the other seeds' record, current, so its verdict section reads it
    assert calls[-1]["record_current"] and calls[-1]["record_seeds"] == [1, 2]
    record = json.loads(path.read_text())
    assert record["seeds"] == [0, 1, 2] and record["code_version"] == results.code_version(slug, root)
    assert [r["index"] for r in record["runs"]] == [0, 1, 2]
    assert [r["overrides"] for r in record["runs"]] == [{}, {"seed": 1}, {"seed": 2}]
    assert record["runs"][1]["source"] == f"runs/stability/{slug}/seed-1"


def test_a_stability_record_needs_two_seeds_and_is_refused_before_any_run(chapter_with_record, monkeypatch):
    slug, root, saved, _ = chapter_with_record
    calls = _fake_runner(monkeypatch, slug, saved)
    for seeds in (1, 0):
        with pytest.raises(ValueError, match=f"seeds={seeds}: a stability record needs at least 2"):
            stability.run(slug[:2], seeds=seeds, root=root, progress=False)
    assert calls == []


def test_a_stability_record_is_not_written_when_the_code_changed_during_its_runs(chapter_with_record, monkeypatch):
    """The seeds ran partly under one code and partly under another: the record would call
    them all the current code's."""
    slug, root, saved, record = chapter_with_record
    notebook = root / "notebooks" / f"{slug}.ipynb"

    def edit_after_the_first(count):
        if count == 1:
            notebook.write_text(notebook.read_text().replace("# a refactor\\n", "# an edit mid-run\\n"))

    _fake_runner(monkeypatch, slug, saved, during=edit_after_the_first)
    with pytest.raises(RuntimeError, match="code changed while its stability runs ran"):
        stability.run(slug[:2], seeds=3, root=root, progress=False)
    assert results.load_stability(slug, root) == record
