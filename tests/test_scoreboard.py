from replbook import results, scoreboard


def _fake():
    return [{"slug": "07_drew", "title": "DREW", "preset": "book", "runtime_seconds": 90.0, "date": "2026-11-26",
             "verdicts": [{"claim": "C1", "statement": "a | b", "verdict": "reproduced"},
                          {"claim": "C2", "statement": "c", "verdict": "not reproduced"}]}]


def test_markdown_has_one_row_per_claim_and_links_the_chapter_once():
    table = scoreboard.markdown(_fake())
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert "[07 DREW](../notebooks/07_drew.ipynb)" in lines[2] and "07 DREW" not in lines[3]
    assert "a \\| b" in lines[2] and "✓ reproduced" in lines[2] and "✗ not reproduced" in lines[3]
    assert "1.5 min" in lines[2]


def test_seeds_agree_counts_the_seeds_that_gave_the_published_verdict(monkeypatch):
    """C1 published as reproduced, which one seed in three gave: "1/3", not the 2/3 of the
    commonest verdict (the README showed chapter 10's C3 that way at stop 51)."""
    record = {"seeds": [0, 1, 2], "claims": {"C1": {"counts": {"reproduced": 1, "not reproduced": 2}},
                                             "C2": {"counts": {"not reproduced": 3}}}}
    monkeypatch.setattr(scoreboard, "load_stability", lambda slug, root=None: record)
    monkeypatch.setattr(scoreboard, "stability_current", lambda record, slug, root=None: True)
    assert [r["seeds"] for r in scoreboard.rows(_fake())] == ["1/3", "3/3"]
    assert "| ✓ reproduced | 1/3 |" in scoreboard.markdown(_fake(), brief=True)


def test_empty_scoreboard_says_how_to_fill_it():
    assert "make run" in scoreboard.markdown([])


def test_readme_scoreboard_matches_the_committed_results(repo_root):
    """The README's brief scoreboard is generated; it must not go stale."""
    block = scoreboard.readme_block(results.load_all(repo_root / "results"))
    assert block in (repo_root / "README.md").read_text(), "README scoreboard is stale: run `make scoreboard`"


def test_every_committed_result_has_a_notebook_and_valid_verdicts(repo_root):
    saved = results.load_all(repo_root / "results")
    assert saved, "no results committed"
    for r in saved:
        assert (repo_root / "notebooks" / f"{r['slug']}.ipynb").exists()
        assert r["preset"] in ("book", "paper")
        for v in r["verdicts"]:
            assert v["verdict"] in results.VERDICTS and (v["decisive"] or v["untestable"])


def test_the_scoreboard_says_where_the_guard_waits_for_another_familys_numbers(tmp_path):
    from replbook import numerics

    (tmp_path / "results" / "reference").mkdir(parents=True)
    fake = _fake()
    assert "pending" not in scoreboard.markdown(fake, root=tmp_path)
    numerics.write_pending(fake[0]["slug"], "x86_64-amd", {"code_version": "f" * 16}, "x86_64-intel",
                           {"numbers": {}, "same": [], "differed": []}, None, tmp_path)
    page = scoreboard.markdown(fake, root=tmp_path)
    assert f"{fake[0]['slug'][:2]} on x86_64-amd (since " in page and "pending" in page
    assert "pending" not in scoreboard.markdown(fake, root=tmp_path, brief=True)


def test_a_failed_scoreboard_write_leaves_the_old_readme_whole(tmp_path, monkeypatch):
    """The README is replaced by a rename, never rewritten in place: a write that fails
    half-way (or a second run publishing at the same moment) cannot leave it torn."""
    import json
    import os

    import pytest

    folder = tmp_path / "results"
    folder.mkdir()
    fake = {**_fake()[0], "config": {"preset": "book"}, "metrics": {}, "tolerances": []}
    (folder / "07_drew.json").write_text(json.dumps(fake))
    readme = tmp_path / "README.md"
    old = f"intro\n{scoreboard.README_START}\nold\n{scoreboard.README_END}\noutro\n"
    readme.write_text(old)

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        scoreboard.update_readme(readme, folder)
    assert readme.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"]
    monkeypatch.undo()
    assert scoreboard.update_readme(readme, folder) and "07 DREW" in readme.read_text()


def test_how_to_run_names_every_chapter_over_the_book_budget_and_no_fast_one():
    """The presets table promises the book preset in five minutes cached; the page must
    name each committed book run that takes longer, and stop naming one once it is well
    inside the budget (under four minutes, so a run near the line does not flap)."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    line = next(l for l in (root / "book" / "how-to-run.md").read_text().splitlines()
                if l.startswith("Over the book budget (cached):"))
    named = set(re.findall(r"\b(\d\d)\b", line.split(":", 1)[1]))
    runtimes = {}
    for path in (root / "results").glob("[0-9][0-9]_*.json"):
        saved = json.loads(path.read_text())
        if saved["preset"] == "book":
            runtimes[path.name[:2]] = saved["runtime_seconds"]
    over = {number for number, seconds in runtimes.items() if seconds > 300}
    assert over <= named, f"over five minutes cached but not named in how-to-run: {sorted(over - named)}"
    fast = {number for number in named if runtimes.get(number, 0) < 240}
    assert not fast, f"named as over budget but well inside it: {sorted(fast)}"


def test_how_to_run_states_chapter_01s_budget_in_the_committed_runs_figures():
    """The budget paragraph types chapter 01's sizes (facts per k, forget documents, model
    states, facts evaluated, methods, k): each must be what the committed run recorded, so a
    change of preset cannot leave the page describing an older run."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = " ".join((root / "book" / "how-to-run.md").read_text().split())
    paragraph = page[page.index("Chapter 01 is the clearest case."):page.index("A test keeps this list")]
    saved = json.loads((root / "results" / "01_restor.json").read_text())
    splits, summary = saved["metrics"]["splits"], saved["metrics"]["summary"]
    methods = {row["state"] for row in summary} - {"clean", "corrupted"}
    documents = {budget["forget_documents"] for budget in saved["metrics"]["unlearning"].values()}
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    expected = [f"reports {len(splits['corrupted'])} facts per k",
                f"one fact moves a share by {round(100 / len(splits['corrupted']))} points",
                f"each of {words[len(saved['config']['mix_k'])]} k",
                f"runs {words[len(methods)]} unlearning methods",
                f"one pass over {documents.pop()} forget documents",
                f"evaluates {len(summary)} model states",
                f"on {len(splits['corrupted']) + len(splits['untouched'])} facts"]
    assert not documents, "the k's forget sets differ in size: the page's single figure no longer fits"
    missing = [phrase for phrase in expected if phrase not in paragraph]
    assert not missing, f"how-to-run's chapter 01 paragraph no longer says {missing}: {paragraph!r}"
    # "one pass of one method takes about a minute": the committed run's time per method and k,
    # evaluation and corruption included, must stay within a factor of two of a minute
    per_pass = saved["runtime_seconds"] / (len(methods) * len(saved["config"]["mix_k"]))
    assert "one pass of one method takes about a minute" in paragraph and 30 <= per_pass <= 120, per_pass


def test_an_unchanged_readme_is_reported_unchanged_and_left_untouched(tmp_path):
    """``make scoreboard`` says whether it changed the README; a second run with the same
    results must say no and leave the file (its bytes and its modification time) alone."""
    import json
    import os

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "07_drew.json").write_text(json.dumps({**_fake()[0], "config": {}, "metrics": {}, "tolerances": []}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{scoreboard.README_START}\nold\n{scoreboard.README_END}\n")
    assert scoreboard.update_readme(readme, folder)
    first = readme.read_text()
    os.utime(readme, ns=(1, 1))
    assert not scoreboard.update_readme(readme, folder)
    assert readme.read_text() == first and readme.stat().st_mtime_ns == 1


def test_the_page_reads_pending_families_beside_the_results_it_shows(tmp_path):
    """write_page(out, folder) lists the pending families of ``folder``'s book, not of the
    repository the code happens to sit in."""
    import json

    from replbook import numerics

    folder = tmp_path / "results"
    (folder / "reference").mkdir(parents=True)
    (folder / "07_drew.json").write_text(json.dumps({**_fake()[0], "config": {}, "metrics": {}, "tolerances": []}))
    numerics.write_pending("07_drew", "x86_64-amd", {"code_version": "f" * 16}, "x86_64-intel",
                           {"numbers": {}, "same": [], "differed": []}, None, tmp_path)
    page = scoreboard.write_page(tmp_path / "book" / "scoreboard.md", folder).read_text()
    assert "07 on x86_64-amd (since " in page


def test_a_seed_record_made_before_the_chapter_changed_is_not_shown(monkeypatch):
    """A stability record of older code says nothing about the published verdicts: its row
    shows the dash of "no current record", not its counts."""
    record = {"seeds": [0, 1, 2], "claims": {"C1": {"counts": {"reproduced": 3}}, "C2": {"counts": {"not reproduced": 3}}}}
    monkeypatch.setattr(scoreboard, "load_stability", lambda slug, root=None: record)
    monkeypatch.setattr(scoreboard, "stability_current", lambda record, slug, root=None: False)
    assert [r["seeds"] for r in scoreboard.rows(_fake())] == [results.agreement(None, "C1", "reproduced")] * 2
    assert results.agreement(None, "C1", "reproduced") != "3/3"
