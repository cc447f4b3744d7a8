"""Chapter 05's building blocks (replbook.t2icomp): scenes and captions, the binding
checker on rendered ground truth, the tokenizer and CLIP text tower, the small UNet,
sampling with the switch-off schedule, and the zero-initialized projections."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from replbook import t2icomp as t


TINY = SimpleNamespace(seed=0, image_size=16, text_width=16, text_layers=1, clip_lr=1e-3, clip_steps=2,
                       clip_batch=8, unet_width=8, unet_lr=1e-3, unet_steps=2, unet_batch=4, caption_dropout=0.5)


# ----------------------------------------------------------------------------- scenes and the checker


def test_captions_name_both_objects_in_either_order():
    scene = t.Scene(("red", "circle"), ("blue", "square"))
    assert t.caption(scene) == "a red circle and a blue square"
    assert t.caption(scene, left_first=False) == "a blue square and a red circle"
    assert t.parse_caption(t.caption(scene, False)) == scene.objects
    with pytest.raises(ValueError, match="is not of the form"):
        t.parse_caption("a red circle")


def test_all_scenes_differ_in_colour_and_shape():
    scenes = t.all_scenes()
    assert len(scenes) == (4 * 3) * (3 * 2)  # left object, then a right one of another colour and shape
    assert all(s.left[0] != s.right[0] and s.left[1] != s.right[1] for s in scenes)


def test_checker_reads_every_rendered_scene():
    for scene in t.all_scenes():
        image = t.render(scene, 32)
        assert t.read_scene(image) == (t.Reading(*scene.left), t.Reading(*scene.right)), scene
        assert t.binding_correct(image, t.caption(scene, left_first=False))


def test_checker_on_jittered_scenes_and_swapped_bindings():
    rng = np.random.default_rng(0)
    scenes = t.all_scenes()
    right = [t.binding_correct(t.render(s, 32, rng), t.caption(s)) for s in scenes for _ in range(5)]
    assert np.mean(right) >= 0.99
    # the colours swapped between the shapes: the same words, the wrong binding
    scene = t.Scene(("red", "circle"), ("blue", "square"))
    swapped = t.render(t.Scene(("blue", "circle"), ("red", "square")), 32)
    assert not t.binding_correct(swapped, t.caption(scene))
    assert t.binding_score(swapped, t.caption(scene)) == 0.0
    half_right = t.render(t.Scene(("red", "circle"), ("green", "square")), 32)
    assert t.binding_score(half_right, t.caption(scene)) == 0.5
    blank = np.full((32, 32, 3), t.BACKGROUND, dtype=np.uint8)
    assert t.read_scene(blank) == (t.Reading(None, None), t.Reading(None, None))
    assert not t.binding_correct(blank, t.caption(scene))


def test_checker_copes_with_a_tinted_noisy_background_and_stray_pixels():
    """Generated images drift: a tinted background, noise, a few stray foreground pixels."""
    rng = np.random.default_rng(0)
    scene = t.Scene(("green", "triangle"), ("red", "square"))
    image = t.render(scene, 32).astype(float)
    background = (image == np.array(t.BACKGROUND)).all(-1)
    image[background] = (150, 150, 205)  # a bluish grey
    image += rng.normal(0, 8, image.shape)
    image[2, 3] = image[29, 28] = t.COLOURS["blue"]  # stray pixels away from the objects
    image = image.clip(0, 255).astype(np.uint8)
    assert t.read_scene(image) == (t.Reading("green", "triangle"), t.Reading("red", "square"))


# ----------------------------------------------------------------------------- text side


def test_tokenizer_adds_start_end_and_pads():
    ids, mask = t.encode_captions(t.tokenizer(), ["a red circle and a blue square", ""])
    assert ids.shape == (2, t.MAX_TOKENS)
    words = [t.VOCAB[i] for i in ids[0]]
    assert words == ["<start>", "a", "red", "circle", "and", "a", "blue", "square", "<end>"]
    assert [t.VOCAB[i] for i in ids[1, :2]] == ["<start>", "<end>"] and mask[1].tolist() == [1, 1] + [0] * 7


def test_clip_text_tower_pools_the_end_token():
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(t.clip_config(width=16, layers=1, image_size=16)).eval()
    ids, mask = t.encode_captions(t.tokenizer(), ["a red circle and a blue square", "a green triangle and a red square"])
    out = model.text_model(input_ids=ids, attention_mask=mask)
    end = (ids == t.VOCAB.index("<end>")).int().argmax(1)
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(2), end])


def test_clip_pretraining_runs_and_returns_losses():
    model, losses = t.pretrain_clip(t.all_scenes(), TINY, progress=False)
    assert len(losses) == TINY.clip_steps and all(np.isfinite(losses))
    assert not model.training


# ----------------------------------------------------------------------------- the diffusion side


@pytest.fixture(scope="module")
def tiny_pipeline():
    from transformers import CLIPModel

    torch.manual_seed(0)
    text_model = CLIPModel(t.clip_config(width=16, layers=1, image_size=16)).text_model.eval()
    model, losses = t.train_diffusion(text_model, t.all_scenes(), TINY, progress=False)
    return text_model, model, losses


def test_diffusion_training_runs(tiny_pipeline):
    _, model, losses = tiny_pipeline
    assert len(losses) == TINY.unet_steps and all(np.isfinite(losses))
    assert model.config.sample_size == 16 and model.config.cross_attention_dim == 16


def test_generation_is_deterministic_and_switch_off_picks_the_states(tiny_pipeline):
    text_model, model, _ = tiny_pipeline
    tok = t.tokenizer()
    early = t.text_states(text_model, tok, ["a red circle and a blue square"] * 2)
    late = t.text_states(text_model, tok, ["a green triangle and a yellow circle"] * 2)
    empty = t.text_states(text_model, tok, [""])
    first = t.generate(model, early, empty, steps=3, seed=1)
    assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, t.generate(model, early, empty, steps=3, seed=1))
    assert np.array_equal(t.generate(model, early, empty, steps=3, seed=1, late_states=late, switch_at=3), first)
    assert np.array_equal(t.generate(model, early, empty, steps=3, seed=1, late_states=late, switch_at=0),
                          t.generate(model, late, empty, steps=3, seed=1))


@pytest.mark.parametrize("kind", ["linear", "wiclp"])
def test_zero_initialized_projection_leaves_the_pipeline_unchanged(tiny_pipeline, kind):
    text_model, model, _ = tiny_pipeline
    tok = t.tokenizer()
    states = t.text_states(text_model, tok, ["a red circle and a blue square", "a blue triangle and a green square"])
    empty = t.text_states(text_model, tok, [""])
    projection = t.projection(kind, states.shape[-1])
    with torch.no_grad():
        projected = projection(states)
    assert torch.equal(projected, states)
    assert np.array_equal(t.generate(model, projected, empty, steps=3), t.generate(model, states, empty, steps=3))
    # and it is trainable: one gradient step moves it off the identity
    loss = t.denoising_loss(model, t.noise_scheduler(), t.to_pixels(t.render(t.all_scenes()[0], 16)[None].repeat(2, 0)),
                            projection(states), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert projection.map.weight.grad.abs().sum() > 0


def test_projection_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="choose from"):
        t.projection("mlp", 16)


# ----------------------------------------------------------------------------- attention and its re-weighting


@pytest.fixture(scope="module")
def one_layer_text():
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(t.clip_config(width=16, layers=1, image_size=16)).text_model.eval()


def test_final_attention_is_causal_and_normalized(one_layer_text):
    weights = t.final_attention(one_layer_text, t.tokenizer(), ["a red circle and a blue square"])
    assert weights.shape == (1, t.MAX_TOKENS, t.MAX_TOKENS)
    assert torch.allclose(weights.sum(-1), torch.ones(1, t.MAX_TOKENS), atol=1e-5)
    assert torch.all(torch.triu(weights[0], diagonal=1) == 0), "a token never attends to later ones"


def test_reweighting_cuts_the_second_object_off_the_first(one_layer_text):
    tok = t.tokenizer()
    captions = ["a red circle and a blue square", "a green circle and a blue square"]  # only the first colour differs
    plain = t.text_states(one_layer_text, tok, captions)
    assert torch.allclose(t.reweighted_states(one_layer_text, tok, captions, scale=1.0), plain, atol=1e-6)
    cut = t.reweighted_states(one_layer_text, tok, captions, scale=0.0)
    second = list(t.SECOND_OBJECT)
    # with one layer, the second object's outputs no longer see the first object's colour ...
    assert torch.allclose(cut[0, second], cut[1, second], atol=1e-5)
    assert not torch.allclose(plain[0, second], plain[1, second], atol=1e-5)
    # ... and nothing before the second object changes
    assert torch.allclose(cut[:, :6], plain[:, :6], atol=1e-6)
    halved = t.reweighted_states(one_layer_text, tok, captions, scale=0.5)
    padded = captions + [""]  # a padded row makes the layer receive a boolean mask instead of none
    assert torch.allclose(t.reweighted_states(one_layer_text, tok, padded, scale=1.0),
                          t.text_states(one_layer_text, tok, padded), atol=1e-6)
    assert not torch.allclose(halved, plain) and not torch.allclose(halved, cut)


# ----------------------------------------------------------------------------- fitting embeddings and projections


def test_optimized_states_and_projection_training_lower_the_denoising_loss(tiny_pipeline):
    text_model, model, _ = tiny_pipeline
    tok = t.tokenizer()
    rng = np.random.default_rng(0)
    scene = t.all_scenes()[0]
    images, captions = t.denoising_targets([scene], views=4, size=16, rng=rng)
    pixels = t.to_pixels(images)
    states = t.text_states(text_model, tok, captions[:1])
    optimized = t.optimize_states(model, states, pixels, steps=3, lr=0.05)
    assert optimized.shape == states.shape and not torch.equal(optimized, states)

    projection = t.projection("wiclp", states.shape[-1])
    losses = t.train_projection(projection, model, t.text_states(text_model, tok, captions), pixels,
                                steps=3, lr=1e-2, batch=2, progress=False)
    assert len(losses) == 3 and projection.map.weight.abs().sum() > 0


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    a -= a.mean(0)
    assert t.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([3.0, 0, 0, 0])
    assert t.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)
    wider = a * 2
    # same mean, covariance 4Σ: tr(Σ + 4Σ − 2·2Σ) = tr(Σ)
    assert t.frechet_distance(a, wider) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-3)


def test_quality_features_come_from_the_real_network():
    from replbook import models

    encoder = models.load("efficientnet-lite0").model
    images = np.stack([t.render(s, 32) for s in t.all_scenes()[:3]])
    features = t.quality_features(encoder, images, size=64)
    assert features.shape == (3, 1280) and np.isfinite(features).all()
