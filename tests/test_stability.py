"""Verdict stability records (``results/stability/``): the unit rules, and the check CI
makes that each record belongs to the committed results and the current code."""
import json

import pytest

from conftest import ROOT
from replbook import results, stability

SLUGS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# chapters whose K = 3 record is not made yet: each takes three book runs by hand, with
# cold trainings for every new seed (10 to 40 minutes a chapter on 2 cores). The test below
# fails once a record exists, so this list only shrinks.
PENDING: set[str] = {"01_restor", "02_skill_slices", "05_t2i_composition", "07_drew"}


def test_seed_overrides_move_every_seed_parameter_and_never_reuse_a_seed():
    assert stability.seed_overrides({"seed": 0, "n": 5}, 0) == {}
    assert stability.seed_overrides({"seed": 0, "n": 5}, 2) == {"seed": 2}
    assert stability.seed_overrides({"seeds": [0, 1, 2], "data_seed": 0}, 1) == {"seeds": [3, 4, 5], "data_seed": 1}
    assert stability.seed_overrides({"seeds": [0, 1, 2]}, 2) == {"seeds": [6, 7, 8]}
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
    assert results.agreement({"claims": claims}, "C2") == "2/3"


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
