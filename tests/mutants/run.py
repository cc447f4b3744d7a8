"""Mutation sweep (by hand, like the guard proofs): apply each plausible wrong implementation
in ``catalogue.json`` to the library, one at a time, run the tests that should notice it, and
record in ``results/guard/mutants.json`` whether they did ("killed") or not ("survived").

Why: a test earns its place by failing on a plausible bug. The catalogue names such bugs for
the method modules, the shared organisms, the cache, the parameter rules, the run command and the
guard's own records (a sign, an off-by-one, a missing mask, a max for a mean, a band read off
the rerun, ...). `make test` checks that every mutant still applies (tests/test_mutants.py).
Each mutant's fingerprint hashes its library file, its test files and the mutation itself, so
`make mutants` reruns only those whose inputs changed (``--all`` reruns every one; ~150 min on
2 cores alone). `make test` checks that the committed record covers the catalogue, is current
(every fingerprint as the files are now) and shows every mutant killed but those the catalogue
declares equivalent, with the reason (tests/test_mutants.py).

Safety: the mutated file is restored in a ``finally`` and on SIGTERM/SIGINT; should the process
die harder, ``runs/.mutant-in-progress.json`` holds the original text and the next run puts it
back before anything else.

    python tests/mutants/run.py [--all] [--module restor] [--name "softcap dropped"]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CATALOGUE = HERE / "catalogue.json"
RECORD = ROOT / "results" / "guard" / "mutants.json"
IN_PROGRESS = ROOT / "runs" / ".mutant-in-progress.json"
TIMEOUT_S = 900  # a mutant that hangs its tests is killed by the timeout, and recorded as such


def key(mutant: dict) -> str:
    """A mutant's name in the record: ``module: name`` (names repeat across modules)."""
    return f"{mutant['module']}: {mutant['name']}"


def load_catalogue(path: Path = CATALOGUE) -> list[dict]:
    return json.loads(path.read_text())


def fingerprint(mutant: dict, root: Path = ROOT) -> str:
    """What a result depends on: the library file, the test files that judge it, the mutation."""
    digest = hashlib.sha256()
    for name in [mutant["file"], *sorted(mutant["tests"])]:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    digest.update(json.dumps([mutant["old"], mutant["new"]]).encode())
    return digest.hexdigest()[:16]


def apply(mutant: dict, text: str) -> str:
    """The mutated text; refuses a mutation whose anchor is missing or ambiguous."""
    found = text.count(mutant["old"])
    if found != 1:
        raise ValueError(f"mutant {key(mutant)!r}: its 'old' text occurs {found} times in {mutant['file']}, "
                         "it must occur exactly once (update the catalogue after a refactor)")
    if mutant["old"] == mutant["new"]:
        raise ValueError(f"mutant {key(mutant)!r} changes nothing")
    mutated = text.replace(mutant["old"], mutant["new"])
    try:  # a mutant that breaks the module's syntax is "caught" by every import, and tests nothing
        compile(mutated, mutant["file"], "exec")
    except SyntaxError as error:
        raise ValueError(f"mutant {key(mutant)!r} leaves {mutant['file']} unable to compile ({error.msg}, line "
                         f"{error.lineno}): a wrong implementation must still run") from None
    return mutated


def restore_interrupted(root: Path = ROOT) -> str | None:
    """Put back a file a killed sweep left mutated; returns its path, or None."""
    marker = root / "runs" / IN_PROGRESS.name
    if not marker.exists():
        return None
    saved = json.loads(marker.read_text())
    (root / saved["file"]).write_text(saved["original"])
    marker.unlink()
    return saved["file"]


def pytest_command(tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests]


def first_failure(output: str) -> str:
    failed = [line[len("FAILED "):].split(" - ")[0] for line in output.splitlines() if line.startswith("FAILED ")]
    if failed:
        return failed[0]
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def run_mutant(mutant: dict, root: Path = ROOT, timeout_s: int = TIMEOUT_S) -> dict:
    """Mutate, run the mutant's tests, restore. Killed = the tests fail (or time out)."""
    path = root / mutant["file"]
    original = path.read_text()
    mutated = apply(mutant, original)
    marker = root / "runs" / IN_PROGRESS.name
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"file": mutant["file"], "original": original}))
    started = time.time()
    try:
        path.write_text(mutated)
        try:
            done = subprocess.run(pytest_command(mutant["tests"]), cwd=root, capture_output=True, text=True,
                                  timeout=timeout_s)
            status = "survived" if done.returncode == 0 else "killed"
            evidence = first_failure(done.stdout) if status == "killed" else done.stdout.strip().splitlines()[-1]
        except subprocess.TimeoutExpired:
            status, evidence = "killed", f"tests timed out after {timeout_s} s"
    finally:
        path.write_text(original)
        marker.unlink(missing_ok=True)
    return {"status": status, "evidence": evidence, "seconds": round(time.time() - started, 1),
            "fingerprint": fingerprint(mutant, root), "date": datetime.date.today().isoformat()}


def machine() -> str:
    try:
        from replbook import numerics

        return f"{numerics.cpu_model()}, {os.cpu_count()} cores"
    except Exception:  # the record is still useful without the CPU's name
        return f"{platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="rerun every mutant, not only those whose inputs changed")
    parser.add_argument("--module", help="only this library module's mutants, e.g. restor")
    parser.add_argument("--name", help="only mutants whose name contains this")
    args = parser.parse_args(argv)
    from replbook.results import write_atomic  # the book's one way to write a record

    def interrupted(signum, frame):
        raise SystemExit(f"interrupted by signal {signum}: the mutated file was restored")

    signal.signal(signal.SIGTERM, interrupted)
    put_back = restore_interrupted()
    if put_back:
        print(f"restored {put_back}, left mutated by a sweep that was killed")
    catalogue = load_catalogue()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"mutants": {}}
    chosen = [m for m in catalogue
              if (not args.module or m["module"] == args.module) and (not args.name or args.name in m["name"])
              and (args.all or record["mutants"].get(key(m), {}).get("fingerprint") != fingerprint(m))]
    for mutant in chosen:
        apply(mutant, (ROOT / mutant["file"]).read_text())  # every anchor checked before anything is mutated
    tests = sorted({test for mutant in chosen for test in mutant["tests"]})
    if tests:
        baseline = subprocess.run(pytest_command(tests), cwd=ROOT, capture_output=True, text=True)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:])
            raise SystemExit("the unmutated tests fail: fix them before sweeping")
    try:
        from tqdm import tqdm
    except ImportError:  # the book's environment has it; the sweep does not need it
        tqdm = None
    progress = tqdm(chosen, desc="mutants", unit="mutant") if tqdm else chosen
    for mutant in progress:
        outcome = run_mutant(mutant)
        record["mutants"][key(mutant)] = {"file": mutant["file"], **outcome}
        if outcome["status"] == "survived":
            print(f"SURVIVED {key(mutant)}", flush=True)
        record["machine"] = machine()
        write_atomic(RECORD, record)  # after each mutant, so an interrupted sweep keeps what it measured
    current = {key(m) for m in catalogue}
    record["mutants"] = {name: entry for name, entry in record["mutants"].items() if name in current}
    write_atomic(RECORD, record)
    statuses = [entry["status"] for entry in record["mutants"].values()]
    print(f"{len(chosen)} mutants run; record: {statuses.count('killed')} killed, "
          f"{statuses.count('survived')} survived, {len(current) - len(statuses)} never run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
