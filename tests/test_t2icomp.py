"""Chapter 05's building blocks (replbook.t2icomp): scenes and captions, the binding
checker on rendered ground truth, the tokenizer and CLIP text tower, the small UNet,
sampling with the switch-off schedule, and the zero-initialized projections."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from replbook import t2icomp as t
from replbook.images import to_tensor


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


def test_an_object_touching_the_border_does_not_shift_the_background_estimate_and_holes_do_not_make_a_circle():
    # the background is the border's median: a quarter of the border covered by an object
    # leaves it exactly the background (a mean would be dragged toward the object's colour)
    image = np.full((32, 32, 3), (150, 150, 205), dtype=np.uint8)
    image[:, :8] = t.COLOURS["red"]  # a red object along the left edge
    assert t.background_colour(image).tolist() == [150, 150, 205]
    # a generated square with background-coloured speckles inside still reads as a square:
    # the blob's holes are filled before its bounding-box fill is measured
    half = np.full((32, 16, 3), t.BACKGROUND, dtype=np.uint8)
    half[6:26, 2:14] = t.COLOURS["blue"]
    half[8:24:2, 4:12:2] = t.BACKGROUND  # 32 holes: without filling, the box is under 90% full
    assert t.read_half(half) == t.Reading("blue", "square")


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
    backbone, losses = t.train_diffusion(text_model, t.all_scenes(), TINY, progress=False)
    return backbone, losses


def test_diffusion_training_runs(tiny_pipeline):
    backbone, losses = tiny_pipeline
    assert len(losses) == TINY.unet_steps and all(np.isfinite(losses))
    # 16-px images, 2×2 unshuffled: the UNet works on 8×8×12
    assert backbone.latent_shape == (12, 8, 8) and backbone.unet.config.cross_attention_dim == 16
    pixels = to_tensor(t.render(t.all_scenes()[0], 16)[None])
    assert torch.equal(backbone.decode(backbone.encode(pixels)), pixels)


def test_denoising_loss_targets_follow_the_prediction_type(tiny_pipeline):
    backbone, _ = tiny_pipeline
    latents = backbone.encode(to_tensor(t.render(t.all_scenes()[0], 16)[None].repeat(2, 0)))
    states = backbone.states(["a red circle and a blue square"] * 2)
    assert backbone.train_scheduler().config.prediction_type == "sample"
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(0, 1000, (2,), generator=generator)
    scheduler = backbone.train_scheduler()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(
            backbone.predict(scheduler.add_noise(latents, noise, steps), steps, states), latents)
        loss = t.denoising_loss(backbone, latents, states, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, expected)


def test_generation_is_deterministic_and_switch_off_picks_the_states(tiny_pipeline):
    backbone, _ = tiny_pipeline
    early = backbone.states(["a red circle and a blue square"] * 3)
    late = backbone.states(["a green triangle and a yellow circle"] * 3)
    first = t.generate(backbone, early, steps=3, seed=1)
    assert first.shape == (3, 16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, t.generate(backbone, early, steps=3, seed=1))
    # batches of 2 then 1 give other matrix shapes, which some CPUs' kernels sum in another order
    # (a CI machine): a pixel may round the other way, but a batch must not get another image's
    # noise or states (which moves pixels by tens of levels)
    batched = t.generate(backbone, early, steps=3, seed=1, batch=2)
    moved = np.abs(first.astype(int) - batched.astype(int))
    assert moved.max() <= 1 and (moved > 0).mean() < 0.01, f"batching changed the images: {moved.max()=}"
    assert np.array_equal(t.generate(backbone, early, steps=3, seed=1, late_states=late, switch_at=3), first)
    assert np.array_equal(t.generate(backbone, early, steps=3, seed=1, late_states=late, switch_at=0),
                          t.generate(backbone, late, steps=3, seed=1))


@pytest.mark.parametrize("kind", ["linear", "wiclp"])
def test_zero_initialized_projection_leaves_the_pipeline_unchanged(tiny_pipeline, kind):
    backbone, _ = tiny_pipeline
    states = backbone.states(["a red circle and a blue square", "a blue triangle and a green square"])
    projection = t.projection(kind, states.shape[-1])
    with torch.no_grad():
        projected = projection(states)
    assert torch.equal(projected, states)
    assert np.array_equal(t.generate(backbone, projected, steps=3), t.generate(backbone, states, steps=3))
    # and it is trainable: one gradient step moves it off the identity
    latents = backbone.encode(to_tensor(t.render(t.all_scenes()[0], 16)[None].repeat(2, 0)))
    loss = t.denoising_loss(backbone, latents, projection(states), generator=torch.Generator().manual_seed(0))
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
    text = CLIPModel(t.clip_config(width=16, layers=1, image_size=16)).text_model.eval()
    return t.Backbone(text, t.tokenizer(), None, None, image_size=16, max_length=t.MAX_TOKENS)


def test_final_attention_is_causal_and_normalized(one_layer_text):
    weights = t.final_attention(one_layer_text, ["a red circle and a blue square"])
    assert weights.shape == (1, t.MAX_TOKENS, t.MAX_TOKENS)
    assert torch.allclose(weights.sum(-1), torch.ones(1, t.MAX_TOKENS), atol=1e-5)
    assert torch.all(torch.triu(weights[0], diagonal=1) == 0), "a token never attends to later ones"
    shares = t.attention_shares(one_layer_text, ["a red circle and a blue square", "a green square and a red circle"])
    assert set(shares) == {"second colour", "second shape", "end token"}
    assert shares["second colour"]["second shape"] == 0, "causal: the colour cannot see its own shape"
    assert all(0 <= v <= 1 for row in shares.values() for v in row.values())
    assert sum(shares["second shape"].values()) <= 1 + 1e-6


def test_reweighting_cuts_the_second_object_off_the_first(one_layer_text):
    captions = ["a red circle and a blue square", "a green circle and a blue square"]  # only the first colour differs
    plain = one_layer_text.states(captions)
    assert torch.allclose(t.reweighted_states(one_layer_text, captions, scale=1.0), plain, atol=1e-6)
    cut = t.reweighted_states(one_layer_text, captions, scale=0.0)
    second = list(t.SECOND_OBJECT)
    # with one layer, the second object's outputs no longer see the first object's colour ...
    assert torch.allclose(cut[0, second], cut[1, second], atol=1e-5)
    assert not torch.allclose(plain[0, second], plain[1, second], atol=1e-5)
    # ... and nothing before the second object changes
    assert torch.allclose(cut[:, :6], plain[:, :6], atol=1e-6)
    halved = t.reweighted_states(one_layer_text, captions, scale=0.5)
    padded = captions + [""]  # a padded row makes the layer receive a boolean mask instead of none
    assert torch.allclose(t.reweighted_states(one_layer_text, padded, scale=1.0),
                          one_layer_text.states(padded), atol=1e-6)
    assert not torch.allclose(halved, plain) and not torch.allclose(halved, cut)


# ----------------------------------------------------------------------------- fitting embeddings and projections


def test_optimized_states_and_projection_training_lower_the_denoising_loss(tiny_pipeline):
    backbone, _ = tiny_pipeline
    scenes = t.all_scenes()[:2]
    images, captions = t.denoising_targets(scenes, size=16)
    assert captions == [t.caption(s) for s in scenes]
    latents = backbone.encode(to_tensor(images))
    states = backbone.states(captions)
    optimized = t.optimize_states(backbone, states, latents[:, None].expand(-1, 3, -1, -1, -1), steps=3, lr=0.05)
    assert optimized.shape == states.shape and not torch.equal(optimized, states)

    projection = t.projection("wiclp", states.shape[-1])
    losses = t.train_projection(projection, backbone, states, latents, steps=3, lr=1e-2, batch=2, progress=False)
    assert len(losses) == 3 and projection.map.weight.abs().sum() > 0


def test_c1_in_chunks_takes_the_one_batch_gradient(tiny_pipeline):
    """C1's gradient taken a few prompts at a time (what keeps the paper preset's backward
    within a GPU: optimize_chunk) is the one batch's gradient of the mean loss over every
    prompt's every view, with the same noise draws: identical in one chunk, equal to float
    rounding in several. A chunk's mean left unweighted, noise drawn afresh per chunk or
    rows cut without their views would each give another gradient."""
    backbone, _ = tiny_pipeline
    for p in backbone.unet.parameters():
        p.requires_grad_(False)
    images, captions = t.denoising_targets(t.all_scenes()[:4], size=16)
    prompts, views = 4, 2
    latents = backbone.encode(to_tensor(images))
    flat = latents[:, None].expand(-1, views, -1, -1, -1).reshape(prompts * views, *latents.shape[1:])
    states = backbone.states(captions)

    one = torch.nn.Parameter(states.clone())  # the paper's loss, in one batch
    expanded = one[:, None].expand(-1, views, -1, -1).reshape(prompts * views, *states.shape[1:])
    loss = t.denoising_loss(backbone, flat, expanded, torch.Generator().manual_seed(0))
    loss.backward()

    def chunked(chunk):
        target = torch.nn.Parameter(states.clone())
        noise, steps = t.draw_noise(backbone, flat, torch.Generator().manual_seed(0))
        return t.backward_in_chunks(backbone, target, flat, noise, steps, chunk), target.grad

    for chunk in (None, 4, 9):
        got, grad = chunked(chunk)
        assert got == float(loss.detach()) and torch.equal(grad, one.grad), f"chunk {chunk}"
    scale = one.grad.abs().max()
    for chunk in (1, 3):
        got, grad = chunked(chunk)
        assert got == pytest.approx(float(loss.detach()), rel=1e-5), f"chunk {chunk}"
        assert torch.allclose(grad, one.grad, rtol=1e-4, atol=1e-5 * scale), f"chunk {chunk}"


def test_optimized_states_follow_the_same_steps_in_chunks(tiny_pipeline):
    """The whole optimisation with the paper preset's kind of chunking ends where the one
    batch's does (to float rounding), and in one chunk exactly there.

    "Float rounding" is a thousandth of how far the states moved: Adam divides each step by
    the gradient's running size, which magnifies the chunked sum's rounding where a gradient
    is near zero. The bound was atol=1e-5 until 2026-12-07, when an AMD EPYC of family 26
    (Zen 5) ended 2.5e-5 apart on one of 432 values, with the states moved by 0.15; the new
    bound was chosen after seeing that. A chunk left out or counted twice moves a prompt's
    states by a step of 0.05."""
    backbone, _ = tiny_pipeline
    images, captions = t.denoising_targets(t.all_scenes()[:3], size=16)
    latents = backbone.encode(to_tensor(images))[:, None].expand(-1, 2, -1, -1, -1)
    states = backbone.states(captions)
    whole = t.optimize_states(backbone, states, latents, steps=3, lr=0.05)
    assert torch.equal(t.optimize_states(backbone, states, latents, steps=3, lr=0.05, chunk=3), whole)
    parts = t.optimize_states(backbone, states, latents, steps=3, lr=0.05, chunk=2)
    moved = float((whole - states).abs().max())
    assert moved > 0.05, "three steps of lr 0.05 must move the states"
    assert torch.allclose(parts, whole, rtol=0, atol=1e-3 * moved)


def test_the_chunk_sets_how_many_images_each_backward_pass_holds(tiny_pipeline, monkeypatch):
    """What optimize_chunk is for: each backward pass runs the UNet on at most chunk ×
    views images (3 prompts × 2 views in chunks of 2: passes on 4 and 2 images, a step).
    An implementation that took the gradient in one batch whatever the chunk would give
    the same numbers and pass every test above, and still need ~71 GB at the paper preset."""
    backbone, _ = tiny_pipeline
    images, captions = t.denoising_targets(t.all_scenes()[:3], size=16)
    latents = backbone.encode(to_tensor(images))[:, None].expand(-1, 2, -1, -1, -1)
    states = backbone.states(captions)
    seen = []
    real = t.noised_loss

    def counted(backbone_, rows, *rest):
        seen.append(len(rows))
        return real(backbone_, rows, *rest)

    monkeypatch.setattr(t, "noised_loss", counted)
    t.optimize_states(backbone, states, latents, steps=2, lr=0.05, chunk=2)
    assert seen == [4, 2, 4, 2]
    seen.clear()
    t.optimize_states(backbone, states, latents, steps=1, lr=0.05)
    assert seen == [6], "no chunk: the whole batch in one pass"


# ----------------------------------------------------------------------------- the chapter's runs


def test_split_scenes_is_disjoint_and_seeded():
    scenes = t.all_scenes()
    train, held = t.split_scenes(scenes, 24, seed=0)
    assert len(held) == 24 and len(train) == 48 and not set(train) & set(held)
    assert t.split_scenes(scenes, 24, seed=0) == (train, held)
    assert t.split_scenes(scenes, 24, seed=1)[1] != held


def test_scores_and_clip_preference():
    scenes = t.all_scenes()[:6]
    images = np.stack([t.render(s, 32) for s in scenes])
    swapped = np.stack([t.render(t.Scene((s.right[0], s.left[1]), (s.left[0], s.right[1])), 32) for s in scenes])
    captions = [t.caption(s) for s in scenes]
    assert t.score_images(images, captions)["binding"].tolist() == [1.0] * 6
    wrong = t.score_images(swapped, captions)
    assert wrong["binding"].tolist() == [0.0] * 6 and wrong["object_score"].tolist() == [0.0] * 6
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(t.clip_config(width=16, layers=1, image_size=32)).eval()
    assert 0.0 <= t.clip_binding_preference(clip, scenes, 32) <= 1.0


def test_book_backbone_is_cached_under_its_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    settings = {**t.PRESETS["smoke"], "image_size": 16}
    first, clip, record = t.book_backbone_cached(settings, progress=False)
    assert not record["cached"] and len(record["unet_losses"]) == settings["unet_steps"]
    again, _, record_again = t.book_backbone_cached(settings, progress=False)
    assert record_again["cached"]
    states = first.states(["a red circle and a blue square"])
    assert torch.equal(states, again.states(["a red circle and a blue square"]))
    assert np.array_equal(t.generate(first, states, steps=2), t.generate(again, states, steps=2))
    _, _, other = t.book_backbone_cached({**settings, "seed": 1}, progress=False)
    assert not other["cached"], "another seed is another model"


def test_paper_backbone_runs_every_method_on_a_tiny_stable_diffusion():
    """The paper preset's path (Stable Diffusion's layout: VAE latents, v-prediction,
    no pooled state) on the registry's tiny random model."""
    from replbook import models

    parts = models.load("tiny-stable-diffusion", preset="smoke").model
    assert isinstance(parts, models.DiffusionParts)
    backbone = t.stable_diffusion(parts)
    assert backbone.vae is not None and backbone.image_size == 32 and backbone.latent_shape == (4, 16, 16)
    scenes = t.all_scenes()[:2]
    images, captions = t.denoising_targets(scenes, backbone.image_size)
    latents = backbone.encode(to_tensor(images))
    states = backbone.states(captions)
    assert states.shape[1] == backbone.max_length == 77
    # SD's pipeline feeds its encoder no attention mask (use_attention_mask is off), so the
    # padding states the UNet reads are the unmasked ones it was trained with
    ids, mask = backbone.tokenize(captions)
    assert mask is None
    batch = parts.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        unmasked = parts.text_encoder(input_ids=batch.input_ids).last_hidden_state
        masked = parts.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert torch.equal(states, unmasked) and not torch.allclose(states, masked)
    projection = t.projection("wiclp", states.shape[-1])
    assert np.array_equal(t.generate(backbone, projection(states).detach(), steps=2), t.generate(backbone, states, steps=2))
    assert len(t.train_projection(projection, backbone, states, latents, steps=2, lr=1e-3, batch=2,
                                  progress=False)) == 2
    optimized = t.optimize_states(backbone, states, latents[:, None], steps=2, lr=0.01, chunk=1)
    # the VAE encodes in batches (encode_batch), the last one short: every image, as alone
    three = backbone.encode(to_tensor(np.concatenate([images, images[:1]])), batch=2)
    assert three.shape == (3, *backbone.latent_shape)
    assert torch.allclose(three, torch.cat([latents, latents[:1]]), atol=1e-5)
    reweighted = t.reweighted_states(backbone, captions, scale=0.0)
    for s in (optimized, reweighted):
        assert t.generate(backbone, s, steps=2, late_states=states, switch_at=1).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="runs offline"):
        models.load("stable-diffusion-2-1", preset="book")


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


def test_shape_reading_by_taper_and_fill():
    square = np.ones((9, 9), dtype=bool)
    rounded = square.copy()
    rounded[0, [0, 1, -2, -1]] = rounded[-1, [0, 1, -2, -1]] = rounded[[1, -2], 0] = rounded[[1, -2], -1] = False
    assert t.shape_of(square) == "square"
    assert t.shape_of(rounded) == "circle", "rounded corners (fill 0.88) fall below the square's 0.9"
    yy, xx = np.mgrid[0:9, 0:9]
    assert t.shape_of(np.abs(xx - 4) <= yy * 0.55) == "triangle"
    assert t.shape_of(np.abs(xx - 4) <= (8 - yy) * 0.55) == "circle", "upside down it does not narrow upwards"


# ----------------------------------------------------------------------------- #27: what the fixes and C2's rule must get right


@pytest.mark.parametrize("kind, reach", [("linear", 0), ("wiclp", 2)])
def test_a_projection_reads_exactly_its_window_of_tokens(kind, reach):
    """WiCLP's token i reads tokens i−2 … i+2 (window 5) and no further; the linear
    projection reads token i only. A kernel of 1 (WiCLP collapsed to the linear map) or
    a window off by one fails here."""
    torch.manual_seed(0)
    projection = t.projection(kind, 8, window=5)
    for parameter in projection.parameters():
        torch.nn.init.normal_(parameter)
    states = torch.randn(1, 9, 8)
    i = 4
    with torch.no_grad():
        base = projection(states)
        for offset in range(-4, 5):
            moved = states.clone()
            moved[0, i + offset] += 1.0
            changed = not torch.allclose(projection(moved)[0, i], base[0, i])
            assert changed == (abs(offset) <= reach), f"{kind}: token {i} {'ignores' if not changed else 'reads'} offset {offset}"
    assert projection.map.bias is not None, "the official projectors carry a bias"
    with pytest.raises(ValueError, match="odd"):
        t.projection("wiclp", 8, window=4)


def test_cross_fitting_never_trains_a_projection_on_the_prompts_it_maps(tiny_pipeline, monkeypatch):
    """Each fold's projection is trained on the base prompts and the other folds' prompts,
    never on the prompts whose states it maps (the held-out prompts of C3)."""
    backbone, _ = tiny_pipeline
    scenes = t.all_scenes()
    base, rotating = scenes[:4], scenes[4:10]
    rotating_states = backbone.states([t.caption(s) for s in rotating])
    trained_on = []

    def record(projection, backbone, states, latents, *args, **kwargs):
        trained_on.append(states.clone())
        return [0.0]

    monkeypatch.setattr(t, "train_projection", record)
    cfg = {"seed": 0, "wiclp_window": 5, "projection_steps": 1, "projection_lr": 1e-3, "projection_batch": 2,
           "encode_batch": 4}
    mapped, _, _ = t.cross_fitted_projection("wiclp", backbone, base, rotating, cfg, folds=2, progress=False)
    assert len(trained_on) == 2 and mapped.shape == rotating_states.shape
    parts = np.array_split(np.arange(len(rotating)), 2)
    for part, states in zip(parts, trained_on):
        assert len(states) == len(base) + len(rotating) - len(part)
        for k in range(len(rotating)):
            seen = any(torch.equal(rotating_states[k], row) for row in states)
            assert seen == (k not in part), f"fold of {list(part)}: prompt {k} {'in' if seen else 'missing from'} training"


def test_position_only_attention_is_what_even_attention_gives(one_layer_text):
    captions = ["a red circle and a blue square", "a green square and a red circle"]
    even = t.position_only_attention(one_layer_text, captions)
    assert np.allclose(even["first object"], 2 / 8) and np.allclose(even["first colour"], 1 / 8)


def test_c2_rule_fails_for_even_attention_and_for_an_untrained_tower(one_layer_text):
    """C2's rule must not pass on attention that any tower gives: a tower whose attention
    is even (query and key maps zeroed) gives exactly the position-only share, and an
    untrained tower compared with another of its kind sits inside the untrained spread."""
    import copy

    captions = [t.caption(s) for s in t.all_scenes()]
    even_tower = copy.deepcopy(one_layer_text.text_model)
    for layer in even_tower.encoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
    even = t.second_shape_attention(one_layer_text.with_text_model(even_tower), captions)
    position = t.position_only_attention(one_layer_text, captions)
    assert np.allclose(even["first object"], position["first object"], atol=1e-6)
    margin = t.mixing_beyond_baselines(even["first object"], {"even": position["first object"]})["even"]
    assert not margin[1] > 0, "even attention must not pass the rule against position alone"

    # the untrained baselines: fresh weights of the same architecture, one set a seed, never
    # the trained tower's (a copy would make every margin exactly 0)
    first, second = (t.untrained_text_tower(one_layer_text.text_model, seed) for seed in (1, 2))
    assert first.config.to_dict() == one_layer_text.text_model.config.to_dict()
    assert not torch.equal(first.embeddings.token_embedding.weight, second.embeddings.token_embedding.weight)
    assert torch.equal(first.embeddings.token_embedding.weight,
                       t.untrained_text_tower(one_layer_text.text_model, 1).embeddings.token_embedding.weight)
    assert not torch.equal(first.encoder.layers[0].self_attn.q_proj.weight,
                           one_layer_text.text_model.encoder.layers[0].self_attn.q_proj.weight)
    own = t.second_shape_attention(one_layer_text.with_text_model(first), captions)["first object"]
    assert not t.mixing_beyond_baselines(own, {"itself": own})["itself"][1] > 0
