import json

import numpy as np
import pytest

from replbook import results


def test_verdict_rule():
    assert results.judge("C1", "s", a=True, b=True).verdict == results.REPRODUCED
    assert results.judge("C1", "s", a=True, b=False).verdict == results.PARTLY
    assert results.judge("C1", "s", a=False).verdict == results.NOT_REPRODUCED
    with pytest.raises(ValueError, match="at least one check"):
        results.judge("C1", "s").verdict


def test_run_save_writes_complete_json(results_tmp):
    run = results.Run("99_test", "A test", {"preset": "smoke", "seed": 1})
    path = run.save([results.judge("C1", "it works", works=np.bool_(True))],
                    {"accuracy": np.float32(0.5), "bad": float("nan"), "pair": (1, 2)})
    assert path == results_tmp / "99_test.json"
    data = json.loads(path.read_text())
    assert data["verdicts"][0]["verdict"] == "reproduced"
    assert data["metrics"] == {"accuracy": 0.5, "bad": None, "pair": [1, 2]}
    assert data["preset"] == "smoke" and data["seed"] == 1 and "torch" in data["versions"]
    assert not list(results_tmp.glob("*.tmp"))


def test_duplicate_claims_are_refused(results_tmp):
    run = results.Run("99_test", "A test", {"preset": "smoke"})
    with pytest.raises(ValueError, match="unique"):
        run.save([results.judge("C1", "a", x=True), results.judge("C1", "b", x=True)], {})


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
    box = results.at_a_glance([results.judge("C1", "a | b", x=True), results.judge("C2", "c", x=False)])
    assert box.splitlines()[2] == "| C1 | **✓ reproduced** | a \\| b |"
    assert "✗ not reproduced" in box.splitlines()[3]
    facts = results.run_facts({"preset": "book", "runtime_seconds": 17.4, "machine": "m", "date": "d"}, 82.0)
    assert facts == "Preset `book` · 17 s with models cached (82 s from a cold cache) · m · d"
