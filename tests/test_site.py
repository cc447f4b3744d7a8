"""The site builds with warnings as errors, and a real browser shows the
scoreboard on the landing page and the figures of chapter 00."""
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from replbook import results, scoreboard

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site() -> Path:
    scoreboard.write_page(ROOT / "book" / "_generated" / "scoreboard.md", ROOT / "results")
    out = Path(tempfile.mkdtemp(prefix="replbook-site-"))
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jupyter_book), "build", str(ROOT), "--path-output", str(out), "-W", "-n",
                           "--keep-going"], capture_output=True, text=True)
    assert proc.returncode == 0, f"the book build failed or warned:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    yield out / "_build" / "html"
    shutil.rmtree(out, ignore_errors=True)


def chromium(*args: str) -> str:
    exe = shutil.which("chromium")
    assert exe, "the rendering test needs Chromium: `make browser` (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_landing_page_shows_the_generated_scoreboard(site):
    dom = chromium("--dump-dom", (site / "book" / "intro.html").as_uri())
    tables = re.findall(r"<table.*?</table>", dom, re.S)
    assert tables, "no table on the landing page"
    board = tables[0]
    for r in results.load_all(ROOT / "results"):
        assert f"{r['slug'][:2]} {r['title']}" in board
        for v in r["verdicts"]:
            assert re.search(rf"<td[^>]*>\s*(<p>)?\s*{v['claim']}\s*(</p>)?\s*</td>", board), v["claim"]
    assert "reproduced" in board


@pytest.mark.parametrize("chapter", ["00_model_zoo", "01_restor", "02_skill_slices", "03_intcoop", "04_endor", "05_t2i_composition", "06_mllm_tracing", "07_drew", "08_loki", "09_vit_decompose", "10_semantic_tokens"])
def test_chapters_render_their_figures_with_captions_and_verdicts(site, chapter):
    page = site / "notebooks" / f"{chapter}.html"
    dom = chromium("--dump-dom", page.as_uri())
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', dom)
    assert len(images) >= 3, f"expected the chapter's figures, found {images}"
    for src in images:
        assert (page.parent / src).resolve().exists(), src
    assert dom.count("<figcaption") >= 3
    assert "Verdict" in dom and "Deviations" in dom
    saved = next(r for r in results.load_all(ROOT / "results") if r["slug"] == chapter)
    for v in saved["verdicts"]:  # the glued at-a-glance box shows this run's verdicts
        assert results.BADGE[v["verdict"]] in dom
    # the plotting code is collapsed behind a toggle naming what it draws (test_notebooks)
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    for cell in nb.cells:
        if "hide-input" in cell.metadata.get("tags", []):
            prompt = html.escape(cell.metadata["mystnb"]["code_prompt_show"], quote=False)
            assert re.search(r'<details class="[^"]*\bhide\b[^"]*above-input[^"]*">\s*<summary[^>]*>\s*'
                             rf'<p class="collapsed admonition-title">{re.escape(prompt)}</p>', dom), prompt


def test_landing_page_screenshot(site, tmp_path):
    shot = tmp_path / "landing.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", (site / "book" / "intro.html").as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000


def test_every_chapter_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"file: notebooks/{notebook.stem}" in toc, f"{notebook.name} is missing from _toc.yml"
