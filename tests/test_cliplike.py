"""The CLIP-like model of chapters 03 and 09: colour naming, the differentiable text
path, and that the joint space means something on real photos."""
import numpy as np
import pytest
import torch

from replbook import cliplike, data


@pytest.fixture
def model(clip_like):
    return clip_like


def test_pure_colours_get_their_names():
    rgb = {"red": (220, 20, 20), "orange": (240, 140, 20), "yellow": (230, 220, 30), "green": (30, 180, 40),
           "blue": (30, 60, 220), "purple": (140, 40, 200), "pink": (240, 80, 200), "brown": (120, 60, 20),
           "black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128)}
    patches = np.stack([np.full((8, 8, 3), c, np.uint8) for c in rgb.values()])
    assert [cliplike.COLOURS[i] for i in cliplike.dominant_colour(patches)] == list(rgb)
    shares = cliplike.colour_shares(patches)
    assert np.allclose(shares.sum(1), 1) and shares.shape == (len(rgb), len(cliplike.COLOURS))


def test_the_centre_decides_the_colour():
    image = np.full((1, 16, 16, 3), (30, 60, 220), np.uint8)  # blue background
    image[:, 4:12, 4:12] = (220, 20, 20)  # a red object in the middle
    assert cliplike.COLOURS[cliplike.dominant_colour(image)[0]] == "red"


def test_text_from_input_embeddings_equals_the_encoder_output(model):
    """The path prompt learning uses reproduces MiniLM's own sentence embedding."""
    texts = ["a photo of a red car", "a photo of a cat"]
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        via_embeddings = model.encode_embeddings(model.token_embeddings(batch["input_ids"]), batch["attention_mask"])
    assert torch.allclose(via_embeddings, model.embed_texts(texts), atol=1e-5)


def test_gradients_reach_learned_context_through_the_frozen_encoder(model):
    batch = model.tokenizer(["X X a cat"], return_tensors="pt")
    words = model.token_embeddings(batch["input_ids"]).detach()
    context = torch.zeros(2, words.shape[-1], requires_grad=True)
    inputs = torch.cat([words[:, :1], context[None], words[:, 3:]], 1)
    model.encode_embeddings(inputs, batch["attention_mask"]).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_zero_shot_and_colour_are_well_above_chance_on_real_photos(model):
    images, labels = data.cifar10_test()
    pick = np.random.default_rng(0).choice(len(images), 300, replace=False)
    x, y = images[pick], labels[pick]
    logits, shares = model.image_logits(x), cliplike.colour_shares(x)
    classes = model.embed_texts([f"a photo of a {c}" for c in data.CIFAR10_CLASSES])
    colours = model.embed_texts([f"a photo of something {c}" for c in cliplike.COLOURS])
    measured = shares.argmax(1)

    def scores(weight):
        model.colour_weight = weight
        image = model.embed_from_features(logits, shares)
        return ((image @ classes.T).argmax(1).numpy() == y).mean(), ((image @ colours.T).argmax(1).numpy() == measured).mean()

    try:
        zero_shot, colour = scores(0.5)
        _, colour_without = scores(0.0)
    finally:
        model.colour_weight = 0.5
    assert zero_shot > 0.4, "10 classes: chance is 0.1"
    assert colour > 0.8 and colour_without < 0.4, "the colour term is what carries colour"


# ----------------------------------------------------------------------------- the joint space's construction


def test_a_sure_posterior_lands_on_its_class_prompt_and_a_pure_colour_on_its_colour_prompt(model):
    """Both sides of the joint space are centred by the same mean μ (the module docstring):
    an image the classifier is sure is class c embeds, without colour, exactly where the text
    "a photo of a c" does. With a flat posterior the object part vanishes, and one pure colour
    leaves the centred colour prompt. Fails if either side skips its centring or the colour
    weight asked for is not the one used."""
    from replbook import models

    classes = models.imagenet_classes()
    n_logits, c = len(classes), 207
    sure = np.zeros((1, n_logits), np.float32)
    sure[0, c] = 1e4
    blue = np.zeros((1, len(cliplike.COLOURS)), np.float32)
    blue[0, cliplike.COLOURS.index("blue")] = 1.0
    image = model.embed_from_features(sure, blue, colour_weight=0.0)
    text = model.embed_texts([f"a photo of a {classes[c]}"])
    assert torch.allclose(image, text, atol=1e-4)
    assert (image @ model.embed_from_features(sure, blue).T).item() < 0.99  # the default weight adds colour

    flat = np.zeros((1, n_logits), np.float32)
    objects, colour = model.embed_image_parts(flat, blue)
    assert objects.abs().max() < 1e-5
    prompt = torch.nn.functional.normalize(model._raw_texts(["a photo of something blue"]) - model.colour_mean, dim=-1)
    assert torch.allclose(model.embed_from_features(flat, blue), prompt, atol=1e-4)


def test_image_embeddings_are_unit_vectors_read_from_the_cached_features(model):
    """``embed_features`` splits the cached array into the 1000 logits and the colour shares
    (one column off and every image's colour changes), and returns unit vectors, as the
    cosine similarities the chapters compute assume."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 1000)).astype(np.float32)
    shares = rng.dirichlet(np.ones(len(cliplike.COLOURS)), 4).astype(np.float32)
    features = np.concatenate([logits, shares], axis=1)
    embedded = model.embed_features(features)
    assert torch.allclose(embedded, model.embed_from_features(logits, shares))
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_the_feature_cache_keeps_each_models_features_apart(monkeypatch, tmp_path):
    """Chapters 03 and 09 cache image features under the images and the model's feature key:
    keyed by the images alone, CLIP's features would be served to the CLIP-like model."""
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))

    class Model:
        def __init__(self, key, scale):
            self.feature_key, self.scale, self.calls = key, scale, 0

        def image_features(self, images, progress=None):
            self.calls += 1
            return self.scale * images.reshape(len(images), -1).astype(np.float32)

    images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    one, other = Model("one", 1.0), Model("other", 2.0)
    first, second = cliplike.cached_features(one, images), cliplike.cached_features(other, images)
    assert np.array_equal(second, 2.0 * first) and (one.calls, other.calls) == (1, 1)
    assert np.array_equal(cliplike.cached_features(one, images), first) and one.calls == 1  # served from the cache


def test_load_passes_every_setting_on_to_the_model(monkeypatch):
    """A chapter's ``temperature``, ``colour_weight`` and ``image_size`` parameters reach the
    model (dropped in ``load``, the defaults would run under the chapter's numbers' name)."""
    seen = {}
    monkeypatch.setattr(cliplike, "ClipLike", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    cliplike.load("cliplike", "smoke", "tiny-efficientnet", "tiny-minilm", temperature=3.0, colour_weight=0.25,
                  image_size=96)
    assert seen == {"args": ("smoke", "tiny-efficientnet", "tiny-minilm"),
                    "kwargs": {"temperature": 3.0, "colour_weight": 0.25, "image_size": 96}}
    with pytest.raises(ValueError, match="clip='clip-vit-b-32'; choose one of: cliplike, clip-vit-b-16"):
        cliplike.load("clip-vit-b-32")


def test_open_clip_computes_on_its_device_and_hands_back_host_tensors(monkeypatch):
    """Chapter 09's paper preset embeds on the GPU (device='auto'): load hands the device on,
    the embeddings come back on the host (the decompositions they are compared with live
    there), and features made on a GPU, equal to the CPU's only to float rounding, are
    cached under their own key."""
    seen = {}
    monkeypatch.setattr(cliplike, "OpenClip", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    cliplike.load("tiny-open-clip", "smoke", device="auto")
    assert seen == {"args": ("tiny-open-clip",), "kwargs": {"preset": "smoke", "device": "auto"}}
    monkeypatch.undo()

    clip = cliplike.OpenClip("tiny-open-clip", preset="smoke", device="auto")  # no GPU here: the CPU
    assert clip.device.type == "cpu" and next(clip.net.parameters()).device.type == "cpu"
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    assert torch.as_tensor(clip.image_features(images, batch=2)).shape[0] == 3
    assert clip.embed_texts(["a red bird"]).device.type == "cpu"
    cpu_key = clip.feature_key
    clip.device = torch.device("cuda")
    assert clip.feature_key != cpu_key
