"""Chapter 10: the scene generator, the segmenter, the token builder, the encoders and the
metrics of replbook.semtokens."""
import json

import numpy as np
import pytest
import torch

from replbook import config, results, semtokens
from replbook.images import to_tensor


def _instance_colour(image, instances, k):
    """The palette colour nearest to the brightest half of an instance's pixels (stripes
    are a darker shade of the same colour)."""
    pixels = image[instances == k].astype(float)
    bright = pixels[pixels.sum(1) >= np.median(pixels.sum(1))].mean(0)
    return min(semtokens.COLOURS, key=lambda c: np.linalg.norm(bright - np.array(semtokens.COLOURS[c])))


def _centre(instances, k):
    ys, xs = np.nonzero(instances == k)
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("held_out", [True, False])
def test_captions_match_the_rendered_scene(held_out):
    scenes = semtokens.make_scenes(60, held_out, seed=7)
    for scene in scenes:
        assert scene.held_out == held_out
        image, instances = semtokens.render(scene)
        assert image.shape == (64, 64, 3) and instances.max() == 2
        words = scene.caption.split()
        # the caption names each object's attributes in the order it mentions them
        first, second = (scene.objects[1], scene.objects[0]) if scene.flipped else scene.objects
        assert " ".join(words[1:5]) == first.words() and " ".join(words[-4:]) == second.words()
        for k, obj in enumerate(scene.objects, start=1):
            assert _instance_colour(image, instances, k) == obj.colour
        # the relation: the canonical subject (object 0) is left of / above object 1 in the pixels
        (x0, y0), (x1, y1) = _centre(instances, 1), _centre(instances, 2)
        if scene.predicate == "left of":
            assert x0 < x1 - 8 and abs(y0 - y1) < abs(x0 - x1)
        else:
            assert y0 < y1 - 8 and abs(x0 - x1) < abs(y0 - y1)
        # the phrase: "right of" / "below" only when the caption names object 1 first
        inverse = any(p in scene.caption for p in ("to the right of", "below"))
        assert inverse == scene.flipped
        # large objects cover more pixels than small ones of the same shape (unoccluded: object 1)
        assert (instances == 2).sum() > (60 if scene.objects[1].size == "large" else 0)


def test_swapped_captions_and_the_mirror_scene():
    scene = semtokens.Scene((semtokens.Obj("red", "circle", "small", "solid", 16, 32),
                             semtokens.Obj("blue", "square", "large", "striped", 48, 32)), "left of", False, (230, 230, 230), 0)
    assert scene.caption == "a small red solid circle to the left of a large blue striped square"
    assert scene.relation_swapped == "a large blue striped square to the left of a small red solid circle"
    assert scene.attribute_swapped == "a small blue solid circle to the left of a large red striped square"
    mirror = scene.mirrored()
    # the relation swap is what the mirror image shows
    assert mirror.caption == scene.relation_swapped
    _, instances = semtokens.render(mirror)
    assert _centre(instances, 1)[0] < _centre(instances, 2)[0]  # the square is now on the left
    flipped = semtokens.Scene(scene.objects, "above", True, (230, 230, 230), 0)
    assert flipped.caption == "a large blue striped square below a small red solid circle"


def test_segmenter_finds_the_objects():
    scenes = semtokens.make_scenes(100, None, seed=3)
    images, oracle = semtokens.render_all(scenes)
    found = semtokens.segment_all(images)
    quality = semtokens.segmentation_quality(found, oracle)
    assert quality["right instance count"] >= 0.85 and quality["mean best IoU"] >= 0.9
    assert semtokens.segmentation_quality(oracle, oracle) == {"right instance count": 1.0, "mean best IoU": 1.0}


def test_segmentation_quality_counts_extra_instances_as_wrong_and_scores_iou_over_the_union():
    oracle = np.zeros((1, 8, 8), dtype=np.int64)
    oracle[0, :4, :4], oracle[0, 4:, 4:] = 1, 2  # two 16-pixel objects
    found = oracle.copy()
    found[0, :4, 4:6] = 1  # object 1 found 8 pixels too wide: IoU 16 / 24, not 16 / 16
    found[0, 6:, :2] = 3  # and a stray third instance
    quality = semtokens.segmentation_quality(found, oracle)
    assert quality == {"right instance count": 0.0, "mean best IoU": pytest.approx((16 / 24 + 1.0) / 2)}


def test_a_diagonal_pair_is_left_of_not_above():
    # centres equally far apart on both axes: the horizontal predicate wins the tie
    assert semtokens.canonical_relation((0, 0, 2, 2), (4, 4, 6, 6)) == ("left of", True)
    assert semtokens.canonical_relation((4, 0, 6, 2), (0, 4, 2, 6)) == ("left of", False)
    assert semtokens.canonical_relation((0, 0, 2, 2), (1, 4, 3, 6)) == ("above", True)


def test_token_builder():
    scenes = semtokens.make_scenes(8, None, seed=5)
    images, oracle = semtokens.render_all(scenes)
    tokens = semtokens.build_tokens(images, oracle, semtokens.oracle_graphs(scenes))
    assert tokens.crops.shape == (8, 4, 4, semtokens.CROP, semtokens.CROP)
    assert tokens.tangible_valid.sum(1).tolist() == [2] * 8 and tokens.relation_valid.sum(1).tolist() == [1] * 8
    for i, scene in enumerate(scenes):
        for k in range(2):
            x, y = _centre(oracle[i], k + 1)
            box_centre = tokens.geometry[i, k, :2].numpy() * 64
            assert np.abs(box_centre - [x, y]).max() < 3  # box centre near the mask's centroid
            assert tokens.crops[i, k, 3].mean() > 0.2  # the mask channel covers the crop
        onehot = tokens.relations[i, 0, :len(semtokens.PREDICATES)].tolist()
        assert onehot == [float(scene.predicate == p) for p in semtokens.PREDICATES]
        assert (tokens.subject[i, 0], tokens.object[i, 0]) == (0, 1)
    assert tokens.crops[:, 2:].abs().sum() == 0 and not tokens.tangible_valid[:, 2:].any()
    # the relation rule on the oracle's masks agrees with the scene graph
    ruled = semtokens.build_tokens(images, oracle)
    assert torch.equal(ruled.relations[:, 0], tokens.relations[:, 0])
    assert torch.equal(ruled.subject[:, 0], tokens.subject[:, 0])


def test_pair_types_link_each_relation_to_its_subject_and_object():
    scenes = semtokens.make_scenes(2, None, seed=1)
    images, oracle = semtokens.render_all(scenes)
    tokens = semtokens.build_tokens(images, oracle, [("above", 1, 0), ("left of", 0, 1)])
    types, valid = semtokens.pair_types(tokens)
    names = semtokens.PAIR_TYPES
    relation = 1 + 4  # the first relation token's position after CLS and 4 tangible slots
    assert names[types[0, relation, 1 + 1]] == "relation → subject" and names[types[0, relation, 1 + 0]] == "relation → object"
    assert names[types[0, 1 + 1, relation]] == "subject → relation"
    assert names[types[1, relation, 1 + 0]] == "relation → subject"
    assert names[types[0, 0, 3]] == "cls → token" and names[types[0, 2, 0]] == "token → cls"
    assert names[types[0, 2, 2]] == "self" and names[types[0, 1, 2]] == "tangible ↔ tangible"
    assert valid[0].tolist() == [True, True, True, False, False, True] + [False] * 5
    bias = semtokens.StructureBias(heads=2)(types, valid)
    assert bias.shape == (2, 2, 11, 11) and (bias[:, :, :, 3] < -1e3).all() and (bias[:, :, :, 1] == 0).all()
    frozen = semtokens.StructureBias(heads=2, learned=False)
    assert not frozen.table.requires_grad


def _backward_ops(tensor):
    """The names of the autograd nodes behind ``tensor``."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def test_additive_weights_are_the_tables_lookup_with_a_deterministic_backward():
    """Retraining an encoder from one seed must give the same weights. Indexing the table
    (``table[types]``) computes the same forward, but its backward adds each pair's gradient
    into the table in a thread-dependent order (two 4-epoch retrainings differed at the 7th
    decimal, rarely enough that no small repeat test sees it), so the backward is pinned to
    ``F.embedding``'s, which sums in a fixed order."""
    _, _, tokens = _small_tokens()
    types, valid = semtokens.pair_types(tokens)
    layer = semtokens.StructureBias(heads=3)
    with torch.no_grad():
        layer.table.copy_(torch.randn(len(semtokens.PAIR_TYPES), 3, generator=torch.Generator().manual_seed(0)))
    bias = layer(types, valid)
    expected = layer.table.detach()[types].permute(0, 3, 1, 2)
    keys = valid[:, None, None, :].expand_as(bias)
    assert torch.equal(bias[keys], expected[keys]) and (bias[~keys] == -1e4).all()
    ops = _backward_ops(bias)
    assert "EmbeddingBackward0" in ops and not any(op.startswith("Index") for op in ops), ops
    # and the backward is the lookup's gradient: each table entry receives the sum of the
    # upstream gradient over the pairs of its type with a valid key. An F.embedding with a
    # padding_idx (one row never learns), scale_grad_by_freq or sparse gradients passes the
    # checks above and fails here
    upstream = torch.randn(bias.shape, generator=torch.Generator().manual_seed(1))
    bias.backward(upstream)
    per_pair = (upstream * keys).permute(0, 2, 3, 1).reshape(-1, 3).double()
    expected_grad = torch.zeros(len(semtokens.PAIR_TYPES), 3, dtype=torch.float64).index_add_(0, types.reshape(-1), per_pair)
    assert layer.table.grad.layout == torch.strided
    assert torch.allclose(layer.table.grad.double(), expected_grad, atol=1e-5)
    assert (expected_grad != 0).all(), "every pair type must occur, or a row's gradient goes unchecked"


def test_two_trainings_from_one_seed_are_bit_identical():
    """The semantic-token encoder with learned additive weights (the variant whose backward
    was not reproducible), trained twice from seed 0: every weight equal, not just close."""
    _, _, tokens = _small_tokens(48, seed=3)
    data = semtokens.TrainingSet(tokens, _random_texts(48))
    validation = semtokens.TrainingSet(tokens[:16], _random_texts(48)[:16])
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = semtokens.DualEncoder(semtokens.TokenEncoder(16, 1, 2, 8), 8, 8, queries=2)
        semtokens.train(model, data, validation, lr=1e-2, batch=16, seed=0, max_epochs=2, patience=2)
        weights.append(model.state_dict())
    assert weights[0]["image.bias.table"].any(), "the additive weights must have learned something"
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def _small_tokens(n=16, seed=0):
    scenes = semtokens.make_scenes(n, None, seed=seed)
    images, oracle = semtokens.render_all(scenes)
    return scenes, images, semtokens.build_tokens(images, oracle, semtokens.oracle_graphs(scenes))


@pytest.mark.parametrize("intangible, additive", [(True, True), (False, True), (True, False)])
def test_attention_maps_reproduce_the_encoder(intangible, additive):
    torch.manual_seed(0)
    _, _, tokens = _small_tokens()
    encoder = semtokens.TokenEncoder(32, 2, 2, 16, intangible=intangible, additive=additive).eval()
    with torch.no_grad():
        encoder.bias.table.normal_()  # structure that matters
        maps, output = semtokens.attention_maps(encoder, tokens)
        assert torch.allclose(output, encoder(tokens), atol=1e-5)
    assert len(maps) == 2 and maps[0].shape[:2] == (16, 2)
    assert torch.allclose(maps[0].sum(-1), torch.ones(16, 2, maps[0].shape[-1]), atol=1e-5)
    assert maps[0][:, :, :, 3].max() < 1e-6  # padding gets no attention


def test_encoders_are_the_same_transformer_and_eval_matches_training_mode():
    torch.manual_seed(0)
    _, images, tokens = _small_tokens()
    patch, semantic = semtokens.PatchEncoder(32, 2, 2, 16), semtokens.TokenEncoder(32, 2, 2, 16)
    shapes = lambda m: [p.shape for p in m.backbone.parameters()]  # noqa: E731
    assert shapes(patch) == shapes(semantic)
    with torch.no_grad():
        semantic.bias.table.normal_()
        trained_mode = semantic.train()(tokens)
        # torch's fused inference path must not be taken (it returned NaN with this mask)
        assert torch.allclose(semantic.eval()(tokens), trained_mode, atol=1e-5)
    assert patch(to_tensor(images)).shape == (16, 16)
    with pytest.raises(ValueError, match="patch=7 must divide image_size=64"):
        semtokens.PatchEncoder(32, 2, 2, 16, patch=7)


def test_recall_swap_and_winoground_on_known_examples():
    similarity = torch.tensor([[0.9, 0.1, 0.95], [0.2, 0.8, 0.1], [0.3, 0.3, 0.3]])
    recall = semtokens.recall_at(similarity, ks=(1, 2))
    # rows: image 0 prefers caption 2 (miss at 1, hit at 2); image 1 hit; image 2 ties (counts against)
    assert recall["image→text R@1"] == pytest.approx(1 / 3) and recall["image→text R@2"] == pytest.approx(2 / 3)
    # columns: caption 0 → image 0 (hit), caption 1 → image 1 (hit), caption 2 → image 0 beats image 2 (miss)
    assert recall["text→image R@1"] == pytest.approx(2 / 3)
    e = torch.eye(3)
    assert semtokens.swap_accuracy(e, e, torch.roll(e, 1, 0)) == 1.0
    assert semtokens.swap_accuracy(e, e, e) == 0.0  # a tie is wrong
    i0, i1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert semtokens.winoground_scores(i0, i1, i0, i1) == {"text score": 1.0, "image score": 1.0, "group score": 1.0}
    both = torch.tensor([[0.8, 0.6]])
    assert semtokens.winoground_scores(both, both, i0, i1)["group score"] == 0.0
    # image 1 prefers caption 0 too: the text score needs *both* images to pick their own
    # caption, the image score both captions their own image (here they do), the group both
    leaning = torch.tensor([[0.9, 0.44]])
    assert semtokens.winoground_scores(i0, leaning, i0, i1) == {"text score": 0.0, "image score": 1.0,
                                                                "group score": 0.0}


def test_shuffle_trigrams_changes_the_order_keeps_the_words():
    rng = np.random.default_rng(0)
    caption = "a man riding a horse on a sandy beach at dawn"
    shuffled = semtokens.shuffle_trigrams(caption, rng)
    assert shuffled != caption and sorted(shuffled.split()) == sorted(caption.split())
    assert semtokens.shuffle_trigrams("a dog", rng) == "a dog"
    # two trigrams can only be swapped: a negative that came back in the caption's own order
    # would be the positive, so every draw must change it
    pair = "a man riding a black horse"
    assert all(semtokens.shuffle_trigrams(pair, np.random.default_rng(seed)) == "a black horse a man riding"
               for seed in range(20))


def _random_texts(n, seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    return semtokens.TextStates(torch.randn(n, 6, dim, generator=g).half(), torch.ones(n, 6, dtype=torch.bool))


def test_training_lowers_the_loss_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    cfg = config.resolve(semtokens.PRESETS, "smoke", n_train=64, n_test=16, max_epochs=4, patience=4, batch=16,
                         seeds=[0])
    scenes, images, tokens = _small_tokens(64, seed=2)
    data = semtokens.TrainingSet(tokens, _random_texts(64))
    validation = semtokens.TrainingSet(tokens[:32], _random_texts(64)[:32])
    model, facts = semtokens.trained_model("no additive weights", cfg, 0, data, validation, "fingerprint")
    assert facts["training"] == "trained now" and facts["losses"][-1] < facts["losses"][0]
    assert not model.image.bias.table.any()  # frozen at zero
    again, facts_again = semtokens.trained_model("no additive weights", cfg, 0, data, validation, "fingerprint")
    assert facts_again["training"] == "cached"
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.rglob("*.tmp*")), "no half-written cache entries"
    # a damaged entry is trained again, never loaded (paths.cached_torch checks its checksum)
    (entry,) = [p for p in tmp_path.rglob("*.pt") if p.stat().st_size > 10_000]
    data_bytes = bytearray(entry.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    entry.write_bytes(bytes(data_bytes))
    rebuilt, facts_rebuilt = semtokens.trained_model("no additive weights", cfg, 0, data, validation, "fingerprint")
    assert facts_rebuilt["training"] == "trained now"
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_data_and_segmenter_fail_clearly():
    with pytest.raises(config.ParameterError, match="data='/nowhere' is not allowed.*COCO folder holding annotations"):
        config.resolve(semtokens.PRESETS, "smoke", data="/nowhere")  # refused before anything loads
    cfg = config.Config({**config.resolve(semtokens.PRESETS, "smoke"), "data": "/nowhere"})
    with pytest.raises(ValueError, match="data='/nowhere': use 'scenes' or the path of a COCO folder"):
        semtokens.load_data(cfg)  # and, past the rules, by the loader itself
    with pytest.raises(ValueError, match=r"segmenter='sam': choose from \('threshold', 'maskrcnn', 'maskrcnn-untrained'\)"):
        semtokens.segment_images(np.zeros((1, 64, 64, 3), np.uint8), "sam")


def test_paper_preset_runs_on_a_tiny_coco_folder(tmp_path, results_tmp):
    """The paper preset's code path — COCO-format loading, Mask R-CNN, the relation rule,
    trigram-shuffled negatives — on a tiny COCO-format folder of rendered scenes with an
    untrained Mask R-CNN and the tiny text encoder."""
    import papermill

    from replbook import dryrun
    from replbook.paths import repo_root

    root = dryrun.fake_coco(32, 8, root=tmp_path / "coco")  # the dry run's COCO-layout folder of rendered scenes
    notebook = repo_root() / "notebooks" / "10_semantic_tokens.ipynb"
    papermill.execute_notebook(
        str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(notebook.parent), progress_bar=False,
        parameters={"preset": "paper", "data": str(root), "n_train": 24, "n_val": 8, "n_test": 8, "width": 16, "depth": 1,
                    "heads": 2, "embed_dim": 16, "patch": 16, "image_size": 64, "max_epochs": 1, "batch": 8,
                    "text_model": "tiny-bert-encoder", "segmenter": "maskrcnn-untrained", "seeds": [0, 1], "threads": 2})
    saved = json.loads((results_tmp / "10_semantic_tokens.json").read_text())
    assert saved["preset"] == "paper" and [v["claim"] for v in saved["verdicts"]] == ["C1", "C2", "C3"]
    assert {r["variant"] for r in saved["metrics"]["per_run"]} == set(semtokens.VARIANTS) - {"semantic (oracle masks)"}
    assert "word order swap" in saved["metrics"]["per_run"][0]


def test_text_states_match_each_caption_encoded_alone():
    from replbook import models

    encoder = models.load("tiny-bert-encoder", preset="smoke").model
    captions = ["a red circle above a blue square", "a cat",
                "a small green striped cross to the left of a large red solid triangle"]
    states = semtokens.text_states(encoder, captions, length=80, batch=2)
    with torch.no_grad():
        for i, caption in enumerate(captions):
            alone = encoder[0].auto_model(**encoder[0].tokenizer([caption], return_tensors="pt")).last_hidden_state[0]
            n = len(alone)
            assert states.mask[i, :n].all() and not states.mask[i, n:].any()
            assert torch.allclose(states.states[i, :n].float(), alone, atol=2e-2)  # stored as float16


# ----------------------------------------------------------------------------- doors closed on plausible bugs


def test_crops_hold_only_their_instance():
    """The tangible token's crop is masked: outside its instance (mask channel 0) the RGB
    channels are 0, though the random background is light; an unmasked crop fails."""
    _, _, tokens = _small_tokens()
    rgb, mask = tokens.crops[:, :2, :3], tokens.crops[:, :2, 3:]
    outside = (mask == 0).expand_as(rgb)
    assert outside.float().mean() > 0.05, "the test needs crops with background in their box"
    assert rgb[outside].abs().max() == 0
    assert rgb[(mask > 0.99).expand_as(rgb)].mean() > 0.2  # the instance's own pixels are kept


def test_relation_tokens_carry_the_union_box_of_subject_and_object():
    scenes, _, tokens = _small_tokens()
    n_predicates = len(semtokens.PREDICATES)
    for i in range(len(scenes)):
        s, o = int(tokens.subject[i, 0]), int(tokens.object[i, 0])
        boxes = []
        for k in (s, o):  # (x0, y0, x1, y1) from the tangible token's centre and size
            cx, cy, w, h = tokens.geometry[i, k, :4].tolist()
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        expected = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        assert torch.allclose(tokens.relations[i, 0, n_predicates:], expected, atol=1e-5), i


def test_the_patch_vit_knows_where_each_patch_is():
    """Shuffling the patches of an image changes the patch ViT's output (learned position
    embeddings); without them a transformer with a class token is blind to the order."""
    torch.manual_seed(0)
    _, images, _ = _small_tokens(2)
    encoder = semtokens.PatchEncoder(32, 2, 2, 16).eval()
    x = to_tensor(images)
    grid = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (N, 3, 8, 8, 8, 8): patch rows, patch columns
    shuffled = grid.flip(2).flip(3).permute(0, 1, 2, 4, 3, 5).reshape(x.shape)  # patches in reverse order
    with torch.no_grad():
        moved = (encoder(x) - encoder(shuffled)).abs().max()
        assert moved > 1e-3 * encoder(x).abs().max()


def test_additive_weights_change_what_the_encoder_computes():
    torch.manual_seed(0)
    _, _, tokens = _small_tokens()
    encoder = semtokens.TokenEncoder(32, 2, 2, 16).eval()
    with torch.no_grad():
        before = encoder(tokens)
        encoder.bias.table[semtokens.PAIR_TYPES.index("relation → subject")] = 4.0
        after = encoder(tokens)
        maps, _ = semtokens.attention_maps(encoder, tokens)
    assert (before - after).abs().max() > 1e-3
    relation, subject = 1 + 4, 1 + 0  # positions after CLS and 4 tangible slots
    assert (maps[0][:, :, relation, subject] > 0.5).all()  # exp(4) of the mass goes to the subject


def _dual_encoder_and_batch(n=6, dim=8):
    torch.manual_seed(0)
    _, _, tokens = _small_tokens(n)
    model = semtokens.DualEncoder(semtokens.TokenEncoder(16, 1, 2, 8), dim, 8, queries=2)
    return model, tokens, _random_texts(n, 1, dim), _random_texts(n, 2, dim)


def test_contrastive_loss_is_symmetric_and_hard_negatives_join_image_to_text():
    model, tokens, texts, swapped = _dual_encoder_and_batch()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(5.0))
        images, captions, wrong = model.embed_images(tokens), model.embed_texts(texts), model.embed_texts(swapped)
        logits = 5.0 * images @ captions.T
        labels = torch.arange(len(logits))
        ce = torch.nn.functional.cross_entropy
        assert abs(ce(logits, labels) - ce(logits.T, labels)) > 1e-3, "the test needs the directions to differ"
        assert torch.allclose(model.loss(tokens, texts), (ce(logits, labels) + ce(logits.T, labels)) / 2, atol=1e-6)
        with_negatives = (ce(torch.cat([logits, 5.0 * images @ wrong.T], 1), labels) + ce(logits.T, labels)) / 2
        assert torch.allclose(model.loss(tokens, texts, [swapped]), with_negatives, atol=1e-6)


def test_training_stops_at_the_plateau_and_keeps_the_best_epoch(monkeypatch):
    """Scripted validation losses: improving at epochs 1 and 2, then 2.5, 1.9995 (less than
    MIN_IMPROVEMENT better) and 2.2: with patience 3 training stops after epoch 5 and
    returns the weights of epoch 2."""
    model, tokens, texts, swapped = _dual_encoder_and_batch(16)
    data = semtokens.TrainingSet(tokens, texts, {"relation": swapped})
    script = iter([3.0, 2.0, 2.5, 1.9995, 2.2, 1.0, 0.5])
    states = []

    def scripted(model, validation, batch):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(script)

    monkeypatch.setattr(semtokens, "validation_loss", scripted)
    history = semtokens.train(model, data, data, 1e-2, 8, 0, max_epochs=10, patience=3)
    assert (history["epochs"], history["best_epoch"], history["hit_the_cap"]) == (5, 2, False)
    assert history["validation_losses"] == [3.0, 2.0, 2.5, 1.9995, 2.2]
    kept = model.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], states[-1][k]) for k in kept)  # training did move on
    script = iter([3.0, 2.0, 1.0])
    capped = semtokens.train(model, data, data, 1e-2, 8, 0, max_epochs=2, patience=3)
    assert (capped["epochs"], capped["best_epoch"], capped["hit_the_cap"]) == (2, 2, True)


def test_the_rate_warms_up_over_the_first_epoch_and_halves_after_each_epoch_without_a_new_best(monkeypatch):
    """The same scripted losses: 2 steps an epoch, so the rate is lr/2 then lr in epoch 1,
    lr in epochs 2 and 3 (both follow an improvement), lr/2 in epoch 4 (epoch 3 did not
    improve) and lr/4 in epoch 5 (epoch 4 improved by less than MIN_IMPROVEMENT). The
    additive weights' group runs at ADDITIVE_LR times each. Fails if halving never happens,
    happens after improving epochs, or the warm-up is skipped."""
    model, tokens, texts, swapped = _dual_encoder_and_batch(16)
    data = semtokens.TrainingSet(tokens, texts, {"relation": swapped})
    script = iter([3.0, 2.0, 2.5, 1.9995, 2.2])
    monkeypatch.setattr(semtokens, "validation_loss", lambda model, validation, batch: next(script))
    rates = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            rates.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    semtokens.train(model, data, data, 1e-2, 8, 0, max_epochs=10, patience=3)
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert [r[0] for r in rates] == pytest.approx([1e-2 * x for x in expected])
    assert [r[-1] for r in rates] == pytest.approx([1e-2 * semtokens.ADDITIVE_LR * x for x in expected])


def test_validation_runs_in_eval_mode(monkeypatch):
    """A model left in training mode is switched to eval before its validation loss (no
    dropout or other training-only behaviour in the number that picks the best epoch)."""
    model, tokens, texts, swapped = _dual_encoder_and_batch(12)
    data = semtokens.TrainingSet(tokens, texts, {"attribute": swapped})
    modes = []
    loss = model.loss
    monkeypatch.setattr(model, "loss", lambda *args: modes.append(model.training) or loss(*args))
    model.train()
    semtokens.validation_loss(model, data, 6)
    assert modes == [False, False]


def test_validation_loss_is_the_training_loss_in_fixed_batches():
    model, tokens, texts, swapped = _dual_encoder_and_batch(12)
    data = semtokens.TrainingSet(tokens, texts, {"attribute": swapped})
    with torch.no_grad():
        whole = float(model.loss(tokens, texts, [swapped]))
        halves = (float(model.loss(tokens[:6], texts[:6], [swapped[:6]]))
                  + float(model.loss(tokens[6:], texts[6:], [swapped[6:]]))) / 2
    assert semtokens.validation_loss(model, data, 12) == pytest.approx(whole, abs=1e-6)
    assert semtokens.validation_loss(model, data, 6) == pytest.approx(halves, abs=1e-6)


def test_every_variant_trains_with_the_configured_hard_negatives_and_learns_its_additive_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    cfg = config.resolve(semtokens.PRESETS, "smoke", n_train=64, n_val=16, n_test=16, max_epochs=2, patience=2,
                         batch=16, seeds=[0], negatives=["attribute"])
    data = semtokens.load_data(cfg)
    assert len(data["validation"].captions) == 16 and semtokens.test_splits(data) == ["held-out combinations",
                                                                                   "seen combinations"]
    assert not (data["validation"].images[:16] == data["train"].images[:16]).all((1, 2, 3)).any()  # own draw
    prepared = semtokens.prepare(cfg, data, progress=False)
    seen = []
    real_train = semtokens.train

    def spy(model, data, validation, *args, **kwargs):
        seen.append((list(data.negatives), list(validation.negatives), len(data), len(validation)))
        return real_train(model, data, validation, *args, **kwargs)

    monkeypatch.setattr(semtokens, "train", spy)
    for variant in semtokens.variants_for(cfg):
        model, _ = semtokens.trained_variant(variant, cfg, 0, prepared)
        if variant in ("semantic (segmenter masks)", "semantic (oracle masks)", "no intangible tokens"):
            assert model.image.bias.table.abs().max() > 0, f"{variant}: the additive weights never learned"
    assert seen == [(["attribute"], ["attribute"], 64, 16)] * len(semtokens.variants_for(cfg))
    # the ablations are the headline (segmenter) model's, the oracle only its own variant
    segmenter = prepared.inputs["semantic (segmenter masks)"]["train"]
    for ablation in ("no intangible tokens", "no additive weights"):
        assert torch.equal(prepared.inputs[ablation]["train"].crops, segmenter.crops)
    assert semtokens.reference_variant(semtokens.variants_for(cfg)) == "semantic (segmenter masks)"


def test_hard_negatives_the_data_lacks_are_refused_before_anything_loads():
    with pytest.raises(config.ParameterError, match="negatives.*relation and attribute negatives"):
        config.resolve(semtokens.PRESETS, "smoke", negatives=["word order"])
    with pytest.raises(config.ParameterError, match="batch must not exceed n_train"):
        config.resolve(semtokens.PRESETS, "smoke", n_train=32, batch=64)
    assert config.resolve(semtokens.PRESETS, "smoke", negatives=[]).negatives == []


def test_the_text_head_reads_word_order():
    """With a transformer layer and learned positions the text head tells a caption's
    token states from the same states in reverse order; bare attention pooling
    (``layers=0``) cannot: it is blind to order by construction."""
    torch.manual_seed(0)
    texts = _random_texts(4, dim=16)
    reversed_texts = semtokens.TextStates(texts.states.flip(1), texts.mask)
    with torch.no_grad():
        for layers, blind in [(1, False), (0, True)]:
            head = semtokens.TextProjection(16, 8, queries=2, layers=layers, width=16, heads=2)
            moved = (head(texts) - head(reversed_texts)).abs().max()
            assert (moved < 1e-5) == blind, (layers, moved)


def test_paired_gain_is_better_minus_worse_paired_by_seed():
    import pandas as pd

    rows = [{"split": "test", "seed": seed, "variant": variant, "R@1": value}
            for seed, (good, base) in enumerate([(0.5, 0.4), (0.7, 0.5), (0.6, 0.3)])
            for variant, value in (("semantic", good), ("patches", base))]
    rows.append({"split": "other", "seed": 0, "variant": "semantic", "R@1": 0.0})  # another split: left out
    rows.append({"split": "other", "seed": 0, "variant": "patches", "R@1": 1.0})
    gain, low, high = semtokens.paired_gain(pd.DataFrame(rows), "semantic", "patches", "R@1", "test")
    assert gain == pytest.approx(0.2) and low < 0.2 < high
    assert (gain, low, high) == pytest.approx(results.mean_interval([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("encoder", ["patch ViT", "semantic"])
def test_checkpointed_blocks_give_the_same_outputs_and_gradients_and_keep_no_block_activations(encoder):
    """The paper preset's activation checkpointing (``checkpoint_blocks``) is a memory
    setting only: the same outputs and gradients as the plain pass, while autograd keeps
    (outside the blocks' recomputation) less than half of what the plain pass keeps."""
    _, images, tokens = _small_tokens(8)
    outputs, gradients, kept = {}, {}, {}
    for checkpoint_blocks in (False, True):
        torch.manual_seed(0)
        if encoder == "patch ViT":
            model, inputs = semtokens.PatchEncoder(32, 3, 2, 16, checkpoint_blocks=checkpoint_blocks), to_tensor(images)
        else:
            model, inputs = semtokens.TokenEncoder(32, 3, 2, 16, checkpoint_blocks=checkpoint_blocks), tokens
            with torch.no_grad():
                model.bias.table.normal_()
        sizes = []

        def keep(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = model.train()(inputs)
        out.square().sum().backward()
        outputs[checkpoint_blocks] = out.detach()
        gradients[checkpoint_blocks] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        kept[checkpoint_blocks] = sum(sizes)
    assert torch.equal(outputs[True], outputs[False])
    assert gradients[True].keys() == gradients[False].keys() and len(gradients[True]) > 10
    for name, gradient in gradients[False].items():
        assert torch.allclose(gradients[True][name], gradient, rtol=1e-5, atol=1e-7), name
    assert kept[True] < kept[False] / 2, kept


def test_every_encoder_is_built_with_the_runs_checkpoint_setting():
    for checkpoint_blocks in (False, True):
        cfg = config.Config({**semtokens.PRESETS["smoke"], "checkpoint_blocks": checkpoint_blocks})
        for variant in semtokens.VARIANTS:
            assert semtokens.build_encoder(variant, cfg).backbone.checkpoint_blocks is checkpoint_blocks, variant
    assert semtokens.PRESETS["paper"]["checkpoint_blocks"] and not semtokens.PRESETS["book"]["checkpoint_blocks"]


def test_mask_rcnn_is_sent_to_the_run_device_and_each_image_with_it(monkeypatch):
    import torchvision.models.detection as detection

    sent_to, seen = [], []

    class Detector(torch.nn.Module):  # stands in for Mask R-CNN: one full-image instance per image
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def to(self, device):
            sent_to.append(str(device))
            return super().to(device)

        def forward(self, images):
            seen.append(images[0].device == self.weight.device)
            return [{"scores": torch.tensor([0.9]), "masks": torch.ones(1, 1, *images[0].shape[1:])}]

    monkeypatch.setattr(detection, "maskrcnn_resnet50_fpn_v2", lambda **kwargs: Detector())
    found = semtokens.segment_images(np.zeros((2, 16, 16, 3), np.uint8), "maskrcnn-untrained", device="cpu")
    assert sent_to == ["cpu"] and seen == [True, True] and (found == 1).all()
