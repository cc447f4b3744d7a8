"""``replbook`` — run a chapter at a preset, build the site.

    replbook run 00 --preset book [-p max_new_tokens=4 ...]
    replbook build                 # scoreboard + site (executes chapters with no results)
    replbook scoreboard            # only regenerate the scoreboard files
    replbook annotate --preset book  # write chapter 02's rationales (committed data)
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import scoreboard
from .config import PRESETS
from .paths import repo_root

VOLATILE_CELL_METADATA = ("execution", "papermill")


def notebook_for(chapter: str, root: Path) -> Path:
    found = sorted((root / "notebooks").glob(f"{chapter}_*.ipynb")) if chapter else []
    if len(found) != 1:
        valid = sorted(p.name.split("_")[0] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"chapter={chapter!r} is not valid; choose one of: {', '.join(valid)}")
    return found[0]


def parse_parameters(pairs: list[str]) -> dict:
    """``["k=v", ...]`` -> dict; values are Python literals where they parse, else strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"parameter {pair!r} must look like name=value")
        key, raw = pair.split("=", 1)
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def notebook_parameters(path: Path) -> list[str]:
    import papermill

    return list(papermill.inspect_notebook(str(path)))


def clean_metadata(path: Path) -> None:
    """Drop per-cell timings papermill stores, so a rerun changes only what changed."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        for key in VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    pm = nb.get("metadata", {}).get("papermill", {})
    for key in ("start_time", "end_time", "duration", "input_path", "output_path"):
        pm.pop(key, None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run(chapter: str, preset: str = "book", parameters: dict | None = None, root: Path | None = None) -> Path:
    """Execute one chapter with papermill.

    ``book`` and ``paper`` runs replace the notebook in place and write
    ``results/<slug>.json``; ``smoke`` runs go to ``runs/smoke/`` and never touch
    the committed outputs. The notebook is written to a temporary file first and
    renamed when the run succeeds, so an interrupted run leaves the old one intact.
    """
    import papermill

    root = root or repo_root()
    source = notebook_for(chapter, root)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    parameters = dict(parameters or {})
    known = notebook_parameters(source)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {source.name}; "
                         f"valid parameters: {', '.join(known)}")
    saved_results_dir = os.environ.get("REPLBOOK_RESULTS_DIR")
    if preset == "smoke":
        out_dir = root / "runs" / "smoke"
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / source.name
        os.environ["REPLBOOK_RESULTS_DIR"] = str(out_dir / "results")  # the kernel inherits it
    else:
        target = source
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}.", suffix=".ipynb", dir=target.parent)
    os.close(fd)
    try:
        papermill.execute_notebook(
            str(source), tmp, parameters={"preset": preset, **parameters},
            cwd=str(source.parent), kernel_name="python3", progress_bar=True,
        )
        clean_metadata(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if saved_results_dir is None:
            os.environ.pop("REPLBOOK_RESULTS_DIR", None)
        else:
            os.environ["REPLBOOK_RESULTS_DIR"] = saved_results_dir
    return target


def needs_execution(notebook: Path, root: Path) -> bool:
    """A notebook with unexecuted code cells or no results file must be executed."""
    nb = json.loads(notebook.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    unexecuted = any(c.get("execution_count") is None for c in code)
    return unexecuted or not (root / "results" / f"{notebook.stem}.json").exists()


def write_scoreboard(root: Path) -> None:
    scoreboard.write_page(root / "book" / "_generated" / "scoreboard.md", root / "results")
    scoreboard.update_readme(root / "README.md", root / "results")


def build(root: Path | None = None, execute_missing: bool = True, out: Path | None = None) -> Path:
    root = root or repo_root()
    if execute_missing:
        for notebook in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            if needs_execution(notebook, root):
                print(f"executing {notebook.name} at the book preset (it has no results yet)")
                run(notebook.name[:2], "book", root=root)
    write_scoreboard(root)
    out = out or root
    jb = Path(sys.executable).with_name("jupyter-book")
    built = subprocess.run([str(jb), "build", str(root), "--path-output", str(out), "-W", "-n", "--keep-going"])
    if built.returncode != 0:
        raise RuntimeError("the book build failed or warned (warnings are errors): see its output above")
    index = out / "_build" / "html" / "index.html"
    print(f"\nThe book is built: open file://{index}")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replbook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute one chapter with papermill")
    p_run.add_argument("chapter", help="two-digit chapter number, e.g. 00")
    p_run.add_argument("--preset", default="book", help=f"one of {', '.join(PRESETS)}")
    p_run.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE")
    p_build = sub.add_parser("build", help="regenerate the scoreboard and build the site")
    p_build.add_argument("--no-execute", action="store_true", help="do not execute chapters lacking results")
    sub.add_parser("scoreboard", help="regenerate the scoreboard files only")
    p_annotate = sub.add_parser("annotate", help="write chapter 02's skill rationales (once; ~10 min on 2 cores)")
    p_annotate.add_argument("--preset", default="book", help="one of smoke, book, paper")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            print(run(args.chapter, args.preset, parse_parameters(args.parameter)))
        elif args.command == "build":
            build(execute_missing=not args.no_execute)
        elif args.command == "annotate":
            from . import config, skillslices

            print(skillslices.annotate(config.resolve(skillslices.PRESETS, args.preset)))
        else:
            write_scoreboard(repo_root())
    except ValueError as err:
        print(f"replbook: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"replbook: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
