"""The landing page's scoreboard, built from ``results/*.json`` — never by hand."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import numerics
from .results import BADGE, agreement, load_all, load_stability, stability_current


def rows(results: list[dict[str, Any]], root: Path | None = None) -> list[dict[str, str]]:
    out = []
    for r in results:
        record = load_stability(r["slug"], root)
        if record and not stability_current(record, r["slug"], root):
            record = None  # made before the chapter's rule or method changed: not shown
        for v in r["verdicts"]:
            out.append({
                "slug": r["slug"], "chapter": f"{r['slug'][:2]} {r['title']}", "claim": v["claim"],
                "statement": v["statement"], "verdict": v["verdict"], "preset": r["preset"],
                "seeds": agreement(record, v["claim"], v["verdict"]),
                "runtime": f"{r['runtime_seconds'] / 60:.1f} min", "date": r["date"],
            })
    return out


def markdown(results: list[dict[str, Any]], link_prefix: str = "../notebooks/", brief: bool = False,
             root: Path | None = None) -> str:
    """A markdown table: chapter, claim, verdict, how many seeds agree on it (from
    ``results/stability/``; — where no current record exists), preset, runtime (and the
    claim text unless brief)."""
    if not results:
        return "*No results yet: run a chapter (`make run PAPER=00`).*\n"
    head = ["Chapter", "Claim", "Verdict", "Seeds agree", "Preset", "Runtime"] if brief else \
        ["Chapter", "Claim", "Statement", "Verdict", "Seeds agree", "Preset", "Runtime", "Date"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for row in rows(results, root):
        chapter = row["chapter"] if row["slug"] != last else ""
        if chapter and link_prefix:
            chapter = f"[{chapter}]({link_prefix}{row['slug']}.ipynb)"
        last = row["slug"]
        cells = [chapter, row["claim"]]
        if not brief:
            cells.append(row["statement"].replace("|", "\\|"))
        cells += [BADGE[row["verdict"]], row["seeds"], row["preset"], row["runtime"]]
        if not brief:
            cells.append(row["date"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + ("" if brief else pending_note(results, root))


def pending_note(results: list[dict[str, Any]], root: Path | None = None) -> str:
    """A line per chapter whose regression guard waits for another CPU family's numbers
    (``numerics``: pending), or nothing."""
    waiting = [f"{r['slug'][:2]} on {family} (since {since})" for r in results
               for family, since in numerics.pending_families(r["slug"], root).items()]
    if not waiting:
        return ""
    return ("\n*Regression guard pending on another CPU family* (its own numbers of the chapter's current code are "
            "not recorded yet; a rerun there is held to the verdicts and to the measured cross-family bands): "
            + "; ".join(waiting) + ".\n")


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename, so a reader (or a
    second run publishing at the same time, as the tasks of a cluster array do) never sees
    a half-written file, and a failed write leaves the old one."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_page(out: Path, results_folder: Path | None = None) -> Path:
    """Write the included scoreboard file of the landing page."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace(out, markdown(load_all(results_folder), root=Path(results_folder).parent if results_folder else None))
    return out


README_START, README_END = "<!-- scoreboard:start -->", "<!-- scoreboard:end -->"


def readme_block(results: list[dict[str, Any]]) -> str:
    return f"{README_START}\n{markdown(results, link_prefix='notebooks/', brief=True)}{README_END}"


def update_readme(readme: Path, results_folder: Path | None = None) -> bool:
    """Replace the README's scoreboard block; True if it changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block")
    new = pattern.sub(lambda _: readme_block(load_all(results_folder)), text)
    changed = new != text
    if changed:
        _replace(readme, new)
    return changed
