"""Chapter 03's CLIP-like model with an image side learned from captions: colour reaches
the map only as pixels, captions are the ones the data says, and the map learns them."""
import numpy as np
import pytest
import torch

from replbook import captionclip


def test_the_colour_histogram_counts_the_centre_only():
    image = np.zeros((1, 8, 8, 3), np.uint8)  # black border
    image[:, 2:6, 2:6] = (255, 10, 10)  # a red centre
    histogram = captionclip.colour_histogram(image)
    assert histogram.shape == (1, 64) and histogram.sum() == pytest.approx(1.0)
    red_cell = (3 * 4 + 0) * 4 + 0
    assert histogram[0, red_cell] == 1.0, "the border must not count"
    image[:, 4:6, 2:6] = (10, 10, 255)  # bottom half of the centre blue
    assert captionclip.colour_histogram(image)[0, red_cell] == 0.5


def test_captions_name_the_colour_with_the_given_share():
    classes, colours = ["cat", "frog"], ["red", "green", "blue"]
    texts = captionclip.caption_texts(classes, colours)
    labels, attributes = np.array([0, 1, 1, 0]), np.array([2, 0, 1, 1])
    always = captionclip.caption_index(labels, attributes, 2, 3, share=1.0, seed=0)
    assert [texts[i] for i in always] == ["a photo of a blue cat", "a photo of a red frog", "a photo of a green frog",
                                          "a photo of a green cat"]
    never = captionclip.caption_index(labels, attributes, 2, 3, share=0.0, seed=0)
    assert [texts[i] for i in never] == ["a photo of a cat", "a photo of a frog", "a photo of a frog", "a photo of a cat"]
    half = captionclip.caption_index(np.zeros(2000, int), np.zeros(2000, int), 2, 3, share=0.5, seed=0)
    assert 0.45 < (half >= 2).mean() < 0.55


def test_the_map_learns_captions_it_can_read_and_keeps_its_best_epoch():
    """Captions decided jointly by two feature blocks (an 'object' and a 'colour' code, as
    in 'a photo of a {colour} {class}'): the projection must pick the right one of four on
    held-out images (fails if it never trains, or trains on the wrong captions)."""
    rng = np.random.default_rng(0)
    n = 800
    obj, col = rng.integers(0, 2, n), rng.integers(0, 2, n)
    features = torch.as_tensor(np.concatenate([np.eye(2)[obj], np.eye(2)[col], 0.1 * rng.normal(size=(n, 6))], 1),
                               dtype=torch.float32)
    captions = torch.as_tensor(obj * 2 + col)
    texts = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    projection, history = captionclip.fit_projection(features, captions, texts, seed=0, epochs=30, batch=64, lr=3e-3,
                                                     dropout=0.0)
    assert history[-1]["held-out caption accuracy"] > 0.95
    best = min(range(len(history)), key=lambda i: history[i]["held-out loss"])
    with torch.no_grad():  # the kept weights are the best epoch's: recomputing its held-out loss agrees
        picked = (projection(features) @ texts.T).argmax(1)
    assert (picked == captions).float().mean() > 0.95 and history[best]["held-out loss"] <= history[-1]["held-out loss"]


def test_alignment_contrasts_only_captions_the_split_carries(monkeypatch):
    """With every caption naming a colour, the bare "a photo of a {class}" must not be a
    negative the images learn to avoid (that would write C1 in)."""
    seen = {}

    def fake_fit(features, captions, texts, seed, **kwargs):
        seen["n_texts"], seen["max_caption"] = len(texts), int(captions.max())
        return None, []

    monkeypatch.setattr(captionclip, "fit_projection", fake_fit)
    model = captionclip.CaptionedClip.__new__(captionclip.CaptionedClip)
    model.colour_caption_share, model.align_epochs, model.hidden = 1.0, 1, 8
    embedded = []
    model.embed_texts = lambda texts: embedded.extend(texts) or torch.zeros(len(texts), 4)
    model.align(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), ["cat", "frog"],
                ["red", "green"], seed=0)
    assert sorted(embedded) == ["a photo of a green cat", "a photo of a green frog", "a photo of a red cat",
                                "a photo of a red frog"]
    assert seen == {"n_texts": 4, "max_caption": 3} and model.n_captions == 4


def test_image_features_and_the_need_to_align_first():
    model = captionclip.CaptionedClip("smoke", "tiny-efficientnet", "tiny-bert-encoder", image_size=64)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    features = model.image_features(images)
    assert features.shape == (3, 1280 + 64) and np.allclose(features[:, 1280:], captionclip.colour_histogram(images))
    with pytest.raises(RuntimeError, match="call align"):
        model.embed_features(features)
    model.align(np.repeat(features, 10, 0), np.arange(30) % 2, np.arange(30) % 3, ["cat", "frog"],
                ["red", "green", "blue"], seed=0)
    embedded = model.embed_features(features)
    assert embedded.shape == (3, model.dim) and torch.allclose(embedded.norm(dim=-1), torch.ones(3))
    assert model.with_caption_share(0.0).projection is None and model.projection is not None
