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
