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


def test_every_method_is_built_and_trained_on_the_clips_device(tiny_open_clip, monkeypatch):
    """The paper preset computes where CLIP is (device auto: the GPU when there is one).
    The meta device stands in for the GPU here: every method's tensors must be on it, its
    logits and loss formed there, and train() and accuracy() must send the image features,
    kept on the host, there. A tensor left on the CPU shows as a CPU tensor or as a
    device error."""
    import copy
    import types

    clip = copy.copy(tiny_open_clip)
    clip.net, clip.device = copy.deepcopy(tiny_open_clip.net).to("meta"), torch.device("meta")
    # OpenClip hands text embeddings back on the host; the meta device cannot copy out
    clip.embed_texts = lambda texts: torch.nn.functional.normalize(torch.randn(len(texts), clip.dim), dim=-1)
    cfg = types.SimpleNamespace(scale=30.0, attribute_weight=1.0, regularizer_weight=8.0)
    classes, images = [0, 1, 2], torch.nn.functional.normalize(torch.randn(6, clip.dim), dim=-1)
    labels, attributes = np.array([0, 1, 2] * 2), np.array([0, 1] * 3)
    for name in intcoop.METHOD_NAMES:
        method = intcoop.build_method(name, clip, CLASSES, cfg)
        tensors = [*method.parameters(), *method.buffers()]
        assert tensors and {t.device.type for t in tensors} == {"meta"}, name
        assert intcoop.method_device(method).type == "meta"
        on_device = images.to("meta")
        assert method.logits(on_device, classes).device.type == "meta", name
        if name == "IntCoOp":
            assert method.hand_prompts(classes).device.type == "meta"
        if name != "zero-shot":
            loss = method.loss(on_device, torch.as_tensor(labels, device="meta"), classes,
                               torch.as_tensor(attributes, device="meta"))
            assert loss.device.type == "meta", name
            seen, host = [], torch.zeros((), requires_grad=True)

            def spy(images, labels, classes, attributes):
                seen.append({images.device.type, labels.device.type, attributes.device.type})
                return host * 1.0  # a loss the host can read: the meta device holds no numbers

            monkeypatch.setattr(method, "loss", spy)
            intcoop.train(method, intcoop.FewShot(images, labels, attributes), classes, steps=2, lr=0.1, seed=0)
            assert seen == [{"meta"}] * 2, name
        asked = []

        def logits(images, classes):
            asked.append(images.device.type)
            return torch.zeros(len(images), len(classes))

        monkeypatch.setattr(method, "logits", logits)
        intcoop.accuracy(method, intcoop.FewShot(images, labels, attributes), classes)
        assert asked == ["meta"], name


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
        painted, paint = intcoop.tint(garment, seed)
        colour = [name for name, rgb in intcoop.TINTS.items() if tuple(painted[0, 14, 14]) == rgb]
        assert len(colour) == 1 and COLOURS[dominant_colour(painted)[0]] == colour[0] == COLOURS[paint[0]]
    assert (intcoop.tint(np.zeros((1, 28, 28), np.uint8), 0)[0] == 255).all(), "no garment: white background"


def test_drawn_shapes_report_the_colour_they_were_drawn_in():
    from replbook.cliplike import COLOURS

    images, _, paint = intcoop.synthetic_shapes(12, seed=3)
    centre = images[:, 16, 16]  # every shape covers the centre
    assert [COLOURS[k] for k in paint] == [next(n for n, rgb in intcoop.TINTS.items() if tuple(px) == rgb) for px in centre]


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


@pytest.mark.parametrize("name", ["cifar10", "fashion-tinted"])
def test_pool_alignment_and_test_splits_are_disjoint(name):
    """The captioned CLIP-like model learns from the alignment split: an image there that is
    also a test or few-shot image would let it memorise what the claims are scored on.
    (The smoke preset's drawn shapes come in 40 kinds, so they repeat by design.)"""
    ds = intcoop.load_dataset(name, pool_size=400, n_test=400, seed=0, n_align=400)
    assert len(ds.pool_images) == len(ds.align_images) == len(ds.test_images) == 400
    assert set(ds.pool_labels) == set(ds.test_labels) == set(ds.align_labels) == set(range(len(ds.class_names)))
    seen = {im.tobytes() for im in ds.pool_images}
    aligned = {im.tobytes() for im in ds.align_images}
    assert not seen & aligned
    assert not any(im.tobytes() in seen | aligned for im in ds.test_images)
    assert (ds.test_colours is None) == (name == "cifar10")


def test_splits_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="choose one of: cifar10, fashion-tinted, synthetic-shapes"):
        intcoop.load_dataset("imagenet", 10, 10, 0)
    with pytest.raises(ValueError, match="pool_size \\+ n_align = 5001"):
        intcoop.load_dataset("cifar10", pool_size=1001, n_test=10, seed=0, n_align=4000)


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
    # checksummed (chapters 03 and 09): a damaged entry is rebuilt, never served
    entry = next(tmp_path.rglob("clip-features/*.pt"))
    entry.write_bytes(entry.read_bytes()[:-8] + b"damaged!")
    assert np.array_equal(cliplike.cached_features(Counting(), images), first) and Counting.calls == 2
    assert np.array_equal(cliplike.cached_features(Counting(), images), first) and Counting.calls == 2


# ----------------------------------------------------------------------------- IntCoOp's loss, term by term


def _toy_intcoop(clip_like, **weights):
    torch.manual_seed(0)
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green", "blue"], **weights)
    images = torch.nn.functional.normalize(torch.randn(6, clip_like.dim), dim=-1)
    return method, images, torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 2, 1, 0])


def test_each_loss_term_is_the_one_its_weight_scales(clip_like):
    """loss(λ_a, λ_r) − loss(0, 0) is λ_a · CE(head, *these* attribute labels) + λ_r · the
    regulariser: fails if the attribute term is dropped, reads shuffled labels or is weighted
    wrong, and if the regulariser is."""
    method, images, labels, attributes = _toy_intcoop(clip_like, attribute_weight=0.0, regularizer_weight=0.0)
    with torch.no_grad():
        task = method.loss(images, labels, [0, 1, 2], attributes)
        method.attribute_weight, method.regularizer_weight = 0.7, 3.0
        full = method.loss(images, labels, [0, 1, 2], attributes)
        expected_attribute = torch.nn.functional.cross_entropy(method.attribute_head(images), attributes)
        mixed = method._mixed(images, method._per_attribute([0, 1, 2]))
        expected_regularizer = method.regularizer(mixed, [0, 1, 2], attributes)
    assert full - task == pytest.approx(float(0.7 * expected_attribute + 3.0 * expected_regularizer), abs=1e-5)
    with torch.no_grad():
        shuffled = torch.nn.functional.cross_entropy(method.attribute_head(images), attributes.roll(1))
    assert float(expected_attribute) != pytest.approx(float(shuffled), abs=1e-4), "the toy must tell labels apart"


def test_the_regulariser_pulls_toward_the_prompt_naming_each_images_own_attribute(clip_like):
    """Zero exactly when every image's prompt features are "a photo of a {its attribute}
    {class}": fails for a pull toward the bare class prompt, or toward every attribute."""
    method, _, _, attributes = _toy_intcoop(clip_like)
    hand = method.hand_prompts([0, 1, 2])  # K x C x d
    assert torch.allclose(hand[1, 2], clip_like.embed_texts(["a photo of a green frog"])[0], atol=1e-6)
    own = hand[attributes]  # N x C x d
    assert float(method.regularizer(own, [0, 1, 2], attributes)) == pytest.approx(0.0, abs=1e-10)
    assert float(method.regularizer(own, [0, 1, 2], attributes.roll(1))) > 0.01
    bare = clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES]).expand(len(attributes), -1, -1)
    assert float(method.regularizer(bare, [0, 1, 2], attributes)) > 0.01


def test_the_class_loss_trains_the_attribute_head_through_the_token(clip_like):
    """With the attribute and regulariser terms off, the classification loss alone must reach
    the attribute head (through q(x) in the prompt): fails if the probabilities are detached."""
    method, images, labels, attributes = _toy_intcoop(clip_like, attribute_weight=0.0, regularizer_weight=0.0)
    method.loss(images, labels, [0, 1, 2], attributes).backward()
    assert method.attribute_head.weight.grad is not None and method.attribute_head.weight.grad.abs().sum() > 0


def _run_seed_config(shots: int):
    """The parameters ``intcoop.run_seed`` reads, one training step each (the tests look at
    what it trains and scores on, not at how well)."""
    return type("Config", (), {"shots": shots, "steps": 1, "lr": 0.01, "scale": 30.0, "attribute_weight": 1.0,
                               "regularizer_weight": 8.0})()


def test_prompt_learners_train_on_base_class_shots_only(clip_like, monkeypatch):
    """run_seed hands the learners base-class images only: fails if the few-shot set leaks
    novel classes (their accuracy would no longer measure generalisation)."""
    rng = np.random.default_rng(0)
    n, classes = 40, ["cat", "truck", "frog", "dog"]
    labels = np.repeat(np.arange(4), n // 4)
    images = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    ds = intcoop.Dataset("toy", classes, images, labels, images, labels, images[:0], labels[:0])
    vectors = torch.nn.functional.normalize(torch.randn(n, clip_like.dim), dim=-1)
    data = intcoop.Embedded(ds, vectors, vectors, {}, labels % 3, labels % 3, labels[:0])
    seen = []
    monkeypatch.setattr(intcoop, "train", lambda method, few, *args, **kwargs: seen.append(set(few.labels.tolist())))
    cfg = _run_seed_config(shots=3)
    rows, _ = intcoop.run_seed(clip_like, data, cfg, seed=0, progress=False)
    assert seen == [{0, 1}] * 3 and ds.base == [0, 1]  # CoOp, KgCoOp, IntCoOp
    assert {r["method"] for r in rows} == set(intcoop.METHOD_NAMES)


def test_c3_scores_the_true_colour_where_the_data_has_one(clip_like):
    """attribute_readings scores the token against the paint (never a training label) next
    to the measured label; a token fixed at "green" matches exactly the green ones."""
    from replbook.cliplike import COLOURS

    method = intcoop.IntCoOp(clip_like, ["cat", "truck", "frog", "dog"], list(COLOURS))
    with torch.no_grad():
        method.attribute_head.weight.zero_()
        method.attribute_head.bias.fill_(-30.0)
        method.attribute_head.bias[COLOURS.index("green")] = 30.0
    labels = np.array([0, 1, 2, 3] * 5)
    green, red = COLOURS.index("green"), COLOURS.index("red")
    true = np.array([green, red, green, green] * 5)
    measured = np.full(20, red)
    blank = np.zeros((20, 4, 4, 3), np.uint8)
    ds = intcoop.Dataset("toy", ["cat", "truck", "frog", "dog"], blank, labels, blank, labels, blank[:0], labels[:0], true)
    vectors = torch.nn.functional.normalize(torch.randn(20, clip_like.dim), dim=-1)
    readings = intcoop.attribute_readings(method, intcoop.Embedded(ds, vectors, vectors, {}, measured, measured, labels[:0]))
    assert readings["true_match_novel"] == 1.0 and readings["true_match_base"] == 0.5
    assert readings["match_novel"] == 0.0 and readings["majority_novel"] == 1.0
    # the commonest-colour baseline is each split's own: red on every base image, green on every
    # novel one gives 1.0 on both (over the whole test set it would be 0.5)
    by_split = np.where(np.isin(labels, ds.base), red, green)
    readings = intcoop.attribute_readings(method, intcoop.Embedded(ds, vectors, vectors, {}, by_split, by_split, labels[:0]))
    assert readings["majority_base"] == 1.0 and readings["majority_novel"] == 1.0


def test_kgcoop_is_coop_plus_the_pull_toward_the_bare_hand_prompt(clip_like):
    """At the start (context = "a photo of a") KgCoOp's pull is zero and its loss is CoOp's;
    once the context moves, the difference is λ · mean ‖g_c − hand(c)‖²."""
    torch.manual_seed(0)
    coop, kg = intcoop.CoOp(clip_like, CLASSES), intcoop.KgCoOp(clip_like, CLASSES, regularizer_weight=5.0)
    images = torch.nn.functional.normalize(torch.randn(6, clip_like.dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        assert float(kg.loss(images, labels, [0, 1, 2])) == pytest.approx(float(coop.loss(images, labels, [0, 1, 2])),
                                                                          abs=1e-5)
        kg.prompts.context.add_(0.05 * torch.randn_like(kg.prompts.context))
        coop.prompts.context.copy_(kg.prompts.context)
        features = kg.prompts.features([0, 1, 2])
        hand = clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES])
        pull = float(((features - hand) ** 2).sum(-1).mean())
        assert pull > 1e-4
        assert float(kg.loss(images, labels, [0, 1, 2]) - coop.loss(images, labels, [0, 1, 2])) == pytest.approx(
            5.0 * pull, rel=1e-4)


# ----------------------------------------------------------------------------- doors a mutation sweep found open (tests/mutants)


def test_a_prompt_padded_beside_longer_ones_encodes_as_it_does_alone(clip_like):
    """Prompts of different lengths share a padded batch: the padding must be masked out, so
    each class's features are those of its prompt encoded on its own."""
    learner = intcoop.PromptLearner(clip_like, ["cat", "pickup truck with a trailer", "frog"], ["red", "dark green"])
    assert len({len(t) for t in learner.class_tokens}) > 1, "the toy needs class names of different lengths"
    with torch.no_grad():
        for attribute in (None, 1):
            batch = learner.features([0, 1, 2], attribute)
            alone = torch.cat([learner.features([c], attribute) for c in range(3)])
            assert torch.allclose(batch, alone, atol=1e-5)


def test_kgcoop_pulls_each_class_toward_its_own_hand_prompt(clip_like):
    """At the start, KgCoOp's pull is zero for any subset of classes in any order (each class's
    learned prompt is its own hand-written one), not only for all classes in their order."""
    coop, kg = intcoop.CoOp(clip_like, CLASSES), intcoop.KgCoOp(clip_like, CLASSES, regularizer_weight=5.0)
    images = torch.nn.functional.normalize(torch.randn(4, clip_like.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert float(kg.loss(images, labels, [2, 0])) == pytest.approx(float(coop.loss(images, labels, [2, 0])), abs=1e-5)


def test_intcoop_logits_are_the_scaled_cosine_to_the_mixed_prompt_and_its_loss_their_cross_entropy(clip_like):
    """logits = scale · cos(x, Σ_k q_k(x) T_k) with the mixture renormalised, and with both extra
    terms off the loss is exactly the cross-entropy of those logits."""
    method, images, labels, attributes = _toy_intcoop(clip_like, attribute_weight=0.0, regularizer_weight=0.0)
    with torch.no_grad():
        method.attribute_head.weight.normal_(generator=torch.Generator().manual_seed(3))  # a spread q(x)
        q = method.attribute_probs(images)
        assert float(q.max()) < 0.99
        per_attribute = torch.stack([method.prompts.features([0, 1, 2], k) for k in range(3)])  # K x C x d
        mixture = torch.einsum("nk,kcd->ncd", q, per_attribute)
        expected = method.scale * torch.nn.functional.cosine_similarity(images[:, None], mixture, dim=-1)
        logits = method.logits(images, [0, 1, 2])
        assert torch.allclose(logits, expected, atol=1e-4)
        assert float(method.loss(images, labels, [0, 1, 2], attributes)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-5)


def test_hand_prompts_are_those_of_the_classes_asked_for(clip_like):
    """The hand-written prompts are cached per class list: asking for other classes of the same
    number gives theirs."""
    method, *_ = _toy_intcoop(clip_like)
    first, second = method.hand_prompts([0, 1]), method.hand_prompts([1, 2])
    assert torch.allclose(second[0, 1], clip_like.embed_texts(["a photo of a red frog"])[0], atol=1e-6)
    assert torch.allclose(first[2, 0], clip_like.embed_texts(["a photo of a blue cat"])[0], atol=1e-6)


class _Recorder(torch.nn.Module):
    """A stand-in method for train(): a linear score, recording the labels it is trained on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))
        self.seen = []

    def loss(self, images, labels, classes, attributes):
        self.seen.append(labels.tolist())
        return torch.nn.functional.cross_entropy(images @ self.weight.T, labels)


def test_train_is_plain_full_batch_adam_on_labels_reindexed_into_the_classes():
    """Each step: zero the gradients, backpropagate, step (gradients never accumulate across
    steps), with each label replaced by its class's position in ``classes``."""
    images = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    data = intcoop.FewShot(images, np.array([7, 2] * 4), np.zeros(8, dtype=np.int64))
    method = _Recorder()
    intcoop.train(method, data, [2, 7], steps=4, lr=0.1, seed=0)
    assert method.seen == [[1, 0] * 4] * 4
    reference = _Recorder()
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        reference.loss(images, torch.tensor([1, 0] * 4), [2, 7], None).backward()
        optimizer.step()
    assert torch.allclose(method.weight, reference.weight, atol=1e-6)


def test_accuracy_counts_a_perfect_classifier_as_perfect_among_any_classes():
    """accuracy() compares the arg-max position with the label's position in ``classes``."""
    class Perfect:
        def logits(self, images, classes):  # the images are the labels: one-hot at the label's position
            return (images[:, None] == torch.tensor(classes)[None]).float()

    labels = np.array([5, 8, 6, 8, 5, 1])
    data = intcoop.FewShot(torch.tensor(labels), labels, labels)
    assert intcoop.accuracy(Perfect(), data, [8, 5]) == 1.0 and intcoop.accuracy(Perfect(), data, [5, 6, 8, 1]) == 1.0


def test_pixel_noise_saturates_instead_of_wrapping_around():
    white, black = np.full((1, 16, 16, 3), 255, np.uint8), np.zeros((1, 16, 16, 3), np.uint8)
    assert intcoop.corrupt(white, "noise").min() > 100 and intcoop.corrupt(black, "noise").max() < 155
    assert (intcoop.corrupt(white, "noise") == 255).mean() > 0.3  # about half the pixels: noise above 0


def test_run_seed_scores_on_the_test_images_and_the_shifted_ones_among_base_classes(clip_like, monkeypatch):
    """Accuracy is measured on the test set (never the few-shot pool), and on the corrupted
    base-class images among the base classes only."""
    classes = ["cat", "truck", "frog", "dog"]
    pool_labels, test_labels = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 3)
    blank = np.zeros((20, 4, 4, 3), np.uint8)
    ds = intcoop.Dataset("toy", classes, blank, pool_labels, blank[:12], test_labels, blank[:0], pool_labels[:0])
    pool = torch.nn.functional.normalize(torch.randn(20, clip_like.dim), dim=-1)
    test = torch.nn.functional.normalize(torch.randn(12, clip_like.dim), dim=-1)
    shifted_labels = test_labels[test_labels < 2]
    shifted = {"grayscale": torch.nn.functional.normalize(torch.randn(len(shifted_labels), clip_like.dim), dim=-1)}
    data = intcoop.Embedded(ds, pool, test, shifted, pool_labels % 3, test_labels % 3, shifted_labels)
    scored = []
    monkeypatch.setattr(intcoop, "train", lambda *args, **kwargs: None)
    monkeypatch.setattr(intcoop, "accuracy", lambda method, few, among: scored.append((few.images, list(among))) or 0.5)
    cfg = _run_seed_config(shots=2)
    intcoop.run_seed(clip_like, data, cfg, seed=0, progress=False)
    assert len(scored) == 3 * len(intcoop.METHOD_NAMES)
    for base, novel, corrupted in zip(scored[0::3], scored[1::3], scored[2::3]):
        assert base[0] is test and novel[0] is test and (base[1], novel[1]) == (ds.base, ds.novel)
        assert corrupted[0] is shifted["grayscale"] and corrupted[1] == ds.base
