"""Chapter 03's prompt learners: the prompt is built as written, gradients reach the
context and nothing else, the attribute mixture is what it claims to be."""
import numpy as np
import pytest
import torch

from replbook import cliplike, intcoop

CLASSES = ["cat", "truck", "frog"]


def test_the_initial_prompt_is_the_hand_written_one(clip_like):
    learner = intcoop.PromptLearner(clip_like, CLASSES, ["red", "green"])
    with torch.no_grad():
        assert torch.allclose(learner.features([0, 1, 2]),
                              clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES]), atol=1e-5)
        assert torch.allclose(learner.features([2], attribute=1), clip_like.embed_texts(["a photo of a green frog"]),
                              atol=1e-5)


def test_context_receives_gradients_and_the_text_encoder_stays_frozen(clip_like):
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green"])
    before = {n: p.detach().clone() for n, p in clip_like.bert.named_parameters()}
    context_before = method.prompts.context.detach().clone()
    images = torch.nn.functional.normalize(torch.randn(6, 384), dim=-1)
    data = intcoop.FewShot(images, np.array([0, 1, 2, 0, 1, 2]), np.array([0, 1, 0, 1, 0, 1]))
    loss = method.loss(images, torch.tensor([0, 1, 2, 0, 1, 2]), [0, 1, 2], torch.tensor(data.attributes))
    loss.backward()
    assert method.prompts.context.grad is not None and method.prompts.context.grad.abs().sum() > 0
    assert method.attribute_head.weight.grad is not None
    assert all(not p.requires_grad for p in clip_like.bert.parameters())
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        "prompts.context", "attribute_head.weight", "attribute_head.bias"}
    intcoop.train(method, data, [0, 1, 2], steps=2, lr=1e-2, seed=0)
    assert not torch.equal(method.prompts.context, context_before)
    assert all(torch.equal(p, before[n]) for n, p in clip_like.bert.named_parameters())


def test_a_certain_attribute_gives_that_attributes_prompt(clip_like):
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green"])
    with torch.no_grad():
        method.attribute_head.weight.zero_()
        method.attribute_head.bias.copy_(torch.tensor([30.0, -30.0]))  # q(x) = one-hot "red"
        images = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
        expected = method.scale * images @ method.prompts.features([0, 1, 2], attribute=0).T
        assert torch.allclose(method.logits(images, [0, 1, 2]), expected, atol=1e-4)


def test_training_learns_a_separable_toy_and_accuracy_reindexes(clip_like):
    texts = clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES])
    # images near the wrong class's text: the zero-shot rule fails, training must fix it
    labels = np.array([0, 1, 2] * 4)
    images = torch.nn.functional.normalize(texts[(labels + 1) % 3] + 0.01 * torch.randn(12, texts.shape[1]), dim=-1)
    data = intcoop.FewShot(images, labels, np.zeros(12, dtype=np.int64))
    method = intcoop.CoOp(clip_like, CLASSES)
    before = intcoop.accuracy(method, data, [0, 1, 2])
    losses = intcoop.train(method, data, [0, 1, 2], steps=60, lr=2e-2, seed=0)
    assert losses[-1] < losses[0] and intcoop.accuracy(method, data, [0, 1, 2]) > before
    assert intcoop.accuracy(method, data, [2, 0]) == intcoop.accuracy(method, intcoop.FewShot(
        images[labels != 1], labels[labels != 1], data.attributes[labels != 1]), [2, 0])


def test_harmonic_mean():
    assert intcoop.harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert intcoop.harmonic_mean(0.0, 0.0) == 0.0 and intcoop.harmonic_mean(1.0, 0.0) == 0.0


# ----------------------------------------------------------------------------- the paper preset's CLIP


@pytest.fixture(scope="module")
def tiny_open_clip():
    from replbook.cliplike import OpenClip

    return OpenClip("tiny-open-clip", preset="smoke")


def test_open_clip_prompts_reproduce_encode_text_and_train_only_the_context(tiny_open_clip):
    learner = intcoop.PromptLearner(tiny_open_clip, CLASSES, ["red"])
    with torch.no_grad():
        assert torch.allclose(learner.features([0, 1, 2]),
                              tiny_open_clip.embed_texts([f"a photo of a {c}" for c in CLASSES]), atol=1e-5)
        assert torch.allclose(learner.features([1], attribute=0), tiny_open_clip.embed_texts(["a photo of a red truck"]),
                              atol=1e-5)
    method = intcoop.CoOp(tiny_open_clip, CLASSES)
    images = torch.nn.functional.normalize(torch.randn(3, tiny_open_clip.dim), dim=-1)
    method.loss(images, torch.tensor([0, 1, 2]), [0, 1, 2]).backward()
    assert method.prompts.context.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_open_clip.net.parameters())


def test_the_paper_preset_code_path_runs_on_a_tiny_open_clip(tmp_path, results_tmp):
    """The paper preset with CLIP ViT-B/16 replaced by a random 2-layer open_clip model."""
    import json

    import papermill

    from replbook.paths import repo_root

    notebook = repo_root() / "notebooks" / "03_intcoop.ipynb"
    papermill.execute_notebook(
        str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(notebook.parent),
        progress_bar=False, parameters={"preset": "paper", "clip": "tiny-open-clip", "datasets": ["synthetic-shapes"],
                                        "pool_size": 80, "n_test": 40, "shots": 4, "steps": 2, "seeds": [0, 1],
                                        "threads": 2})
    saved = json.loads((results_tmp / "03_intcoop.json").read_text())
    assert saved["preset"] == "paper" and {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}
    assert saved["metrics"]["model"] == {"kind": "open_clip", "model": "tiny-open-clip"}
    assert {r["method"] for r in saved["metrics"]["rows"]} == set(intcoop.METHOD_NAMES)


# ----------------------------------------------------------------------------- the experiment's parts


def test_the_nearest_attribute_of_a_certain_token_is_that_attribute(clip_like):
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green", "blue"])
    with torch.no_grad():
        method.attribute_head.weight.zero_()
        method.attribute_head.bias.copy_(torch.tensor([-30.0, 30.0, -30.0]))
    images = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    assert (intcoop.nearest_attribute(method, images) == 1).all()
    assert all(words[0] == "green" for words in intcoop.nearest_words(method, images))


def test_alignment_gain_is_positive_for_an_image_that_is_the_attribute_prompt(clip_like):
    from replbook.cliplike import COLOURS

    images = clip_like.embed_texts(["a photo of a red cat", "a photo of a frog"])
    gain = intcoop.alignment_gain(clip_like, images, np.array([0, 2]), np.array([COLOURS.index("red")] * 2), CLASSES)
    assert gain[0] > 0 and gain[1] < 0


def test_colour_weight_zero_removes_the_colour_part(clip_like):
    features = np.zeros((1, 1000 + 11), np.float32)
    features[0, 5] = 3.0
    features[0, 1000] = 1.0  # all "red"
    with_colour, without = clip_like.embed_features(features), clip_like.embed_features(features, colour_weight=0.0)
    objects, colour = clip_like.embed_image_parts(features[:, :1000], features[:, 1000:])
    assert torch.allclose(without, torch.nn.functional.normalize(objects, dim=-1))
    assert not torch.allclose(with_colour, without)


def test_painted_garments_measure_as_their_paint():
    from replbook.cliplike import COLOURS, dominant_colour

    garment = np.full((1, 28, 28), 255, np.uint8)  # a full-intensity garment filling the image
    for seed in range(8):
        painted = intcoop.tint(garment, seed)
        colour = [name for name, rgb in intcoop.TINTS.items() if tuple(painted[0, 14, 14]) == rgb]
        assert len(colour) == 1 and COLOURS[dominant_colour(painted)[0]] == colour[0]
    assert (intcoop.tint(np.zeros((1, 28, 28), np.uint8), 0) == 255).all(), "no garment: white background"


def test_corruptions_and_their_errors():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    gray = intcoop.corrupt(images, "grayscale")
    assert gray.dtype == np.uint8 and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.array_equal(intcoop.corrupt(images, "noise", seed=3), intcoop.corrupt(images, "noise", seed=3))
    assert intcoop.corrupt(images, "blur").std() < images.std()
    with pytest.raises(ValueError, match="choose one of: grayscale, blur, noise"):
        intcoop.corrupt(images, "fog")


def test_few_shot_draws_that_many_of_each_class_and_says_when_it_cannot():
    labels = np.array([0, 1, 2] * 10)
    picked = intcoop.few_shot(labels, [0, 2], shots=4, seed=0)
    assert np.bincount(labels[picked], minlength=3).tolist() == [4, 0, 4] and len(set(picked)) == 8
    assert np.array_equal(picked, intcoop.few_shot(labels, [0, 2], shots=4, seed=0))
    with pytest.raises(ValueError, match="fewer than shots=11"):
        intcoop.few_shot(labels, [1], shots=11, seed=0)


def test_cifar10_split_is_shuffled_and_disjoint():
    ds = intcoop.load_dataset("cifar10", pool_size=500, n_test=500, seed=0)
    assert set(ds.pool_labels) == set(ds.test_labels) == set(range(10))
    pool = {im.tobytes() for im in ds.pool_images}
    assert not any(im.tobytes() in pool for im in ds.test_images)
    with pytest.raises(ValueError, match="choose one of: cifar10, fashion-tinted, synthetic-shapes"):
        intcoop.load_dataset("imagenet", 10, 10, 0)


def test_mean_interval():
    mean, low, high = intcoop.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low == pytest.approx(2 - 4.302653 / np.sqrt(3)) and high == pytest.approx(2 + 4.302653 / np.sqrt(3))


def test_features_are_cached_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))

    class Counting:
        feature_key, calls = "counting", 0

        def image_features(self, images, progress=None):
            Counting.calls += 1
            return images.reshape(len(images), -1).astype(np.float32)

    images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    first, second = cliplike.cached_features(Counting(), images), intcoop.cached_features(Counting(), images)
    assert Counting.calls == 1 and np.array_equal(first, second)
    assert not list(tmp_path.rglob("*.tmp.npy"))
