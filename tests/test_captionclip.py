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


def _unit_texts(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random unit caption embeddings, the same on every run (not the global torch RNG)."""
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_caption_draws_follow_their_seed():
    """Which images get a colour caption is drawn with the alignment's seed: two seeds, two draws."""
    labels = np.zeros(400, int)
    draws = [captionclip.caption_index(labels, labels, 2, 3, share=0.5, seed=s) for s in (0, 1, 1)]
    assert not np.array_equal(draws[0], draws[1]) and np.array_equal(draws[1], draws[2])


def test_the_map_is_standardised_on_the_training_images_only():
    """A tenth of the images, drawn with ``seed``, is held out: neither the feature
    standardisation nor any step sees them (the held-out loss would flatter the map)."""
    rng = np.random.default_rng(1)
    features = torch.as_tensor(rng.normal(size=(50, 6)) * np.arange(1, 7) + 10, dtype=torch.float32)
    captions, texts = torch.as_tensor(rng.integers(0, 3, 50)), _unit_texts(3)
    projection, _ = captionclip.fit_projection(features, captions, texts, seed=3, epochs=1, batch=16, dropout=0.0)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    train = order[5:]
    assert torch.allclose(projection.mean, features[train].mean(0))
    assert torch.allclose(projection.std, features[train].std(0))
    # the standardisation is applied: shifting and scaling the features with it changes nothing
    moved = captionclip.ImageProjection(projection.mean * 3 + 1, projection.std * 3, 8, hidden=256)
    moved.load_state_dict({**projection.state_dict(), "mean": projection.mean * 3 + 1, "std": projection.std * 3})
    with torch.no_grad():
        assert torch.allclose(moved.eval()(features * 3 + 1), projection(features), atol=1e-5)
        assert not torch.allclose(projection(features * 3 + 1), projection(features), atol=1e-3)


def test_the_returned_map_is_the_epoch_with_the_lowest_held_out_loss(monkeypatch):
    """Every epoch ends in eval(): record the weights there, and the map returned must be
    the recorded epoch whose held-out loss was lowest, on a run whose best epoch is neither
    the first nor the last (it overfits noise)."""
    states = []

    class Recording(captionclip.ImageProjection):
        def eval(self):
            states.append({k: v.clone() for k, v in self.state_dict().items()})
            return super().eval()

    monkeypatch.setattr(captionclip, "ImageProjection", Recording)
    rng = np.random.default_rng(2)
    features = torch.as_tensor(rng.normal(size=(60, 12)), dtype=torch.float32)
    captions, texts = torch.as_tensor(rng.integers(0, 4, 60)), _unit_texts(4)
    projection, history = captionclip.fit_projection(features, captions, texts, seed=0, epochs=12, batch=8,
                                                     lr=3e-2, dropout=0.0, weight_decay=0.0)
    losses = [row["held-out loss"] for row in history]
    best = int(np.argmin(losses))
    assert 0 < best < len(losses) - 1, f"the best epoch must be neither the first nor the last: {losses}"
    final = projection.state_dict()
    assert all(torch.equal(final[k], states[best][k]) for k in final)


def test_each_step_uses_only_its_own_gradient(monkeypatch):
    """The optimizer steps on the current batch's gradient only (zero_grad before backward)."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    rng = np.random.default_rng(4)
    features = torch.as_tensor(rng.normal(size=(40, 5)), dtype=torch.float32)
    captions, texts = torch.as_tensor(rng.integers(0, 3, 40)), _unit_texts(3)
    captionclip.fit_projection(features, captions, texts, seed=0, epochs=2, batch=36, lr=0.0, dropout=0.0)
    # lr 0: the weights never move, so with one batch per epoch both steps see the same gradient;
    # (up to summation order); gradients left to accumulate would make the second twice the first
    assert len(seen) == 2 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*seen))


def test_the_feature_cache_key_names_the_image_model_its_size_and_the_feature_code(monkeypatch):
    def key(image_model="efficientnet-lite0", image_size=128):
        model = captionclip.CaptionedClip.__new__(captionclip.CaptionedClip)
        model.image_model, model.image_size = image_model, image_size
        return model.feature_key

    assert key() == key() and len({key(), key(image_size=64), key(image_model="tiny-efficientnet")}) == 3
    before = key()
    monkeypatch.setattr(captionclip, "colour_histogram", lambda images, bins=8, centre=1.0: images)
    assert key() != before, "a change to the colour histogram's code must change the cached features' key"
