"""Chapter 07 (DREW): the code, the watermarks, the edits and the retrieval rule."""
import sys
import types

import numpy as np
import pytest
import torch

from replbook import data, drew, models


@pytest.fixture(scope="module")
def code():
    return drew.ClusterCode("bch-31-6")


@pytest.fixture(scope="module")
def photos():
    """Three real photos at 128 px (watermarks need texture; random images are not photos)."""
    return drew.prepare_images(np.stack([drew.prepare_images(data.photo(n)[None, :300, :300], 300)[0]
                                         for n in data.PHOTOS]), 128)


# ----------------------------------------------------------------------------- the code

def test_the_code_corrects_up_to_t_errors_with_the_papers_confidence(code):
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, code.n_clusters, 200)
    words = code.codewords(clusters)
    assert code.t == 7 and words.shape == (200, 31)
    for errors in range(code.t + 1):
        received = words.copy()
        for row in received:
            row[rng.choice(code.n, errors, replace=False)] ^= 1
        decoded, confidence = code.decode(received)
        assert (decoded == clusters).all(), f"{errors} errors were not corrected"
        assert np.allclose(confidence, 1 - 2 * errors / code.n)


def test_beyond_t_errors_the_confidence_is_low(code):
    """Minimum distance 15: with e > t errors any other key is at least 15 - e away, so
    t + 1 errors decode (if at all) at confidence <= 1 - 2t/n, t + 1 and t + 2 stay under
    the gate, and more errors pass it about as rarely as random words do."""
    rng = np.random.default_rng(1)
    threshold = code.threshold_for(0.01)
    clusters = rng.integers(0, code.n_clusters, 2000)
    for errors in range(code.t + 1, code.t + 9):
        received = code.codewords(clusters)
        for row in received:
            row[rng.choice(code.n, errors, replace=False)] ^= 1
        decoded, confidence = code.decode(received)
        if errors == code.t + 1:
            assert (confidence <= 1 - 2 * code.t / code.n + 1e-12).all()
        if errors <= code.t + 2:
            assert (confidence < threshold).all()
        assert (confidence >= threshold).mean() <= 0.02
        assert not ((confidence >= threshold) & (decoded == clusters)).any(), "too many errors to land home"


def test_a_word_the_decoder_cannot_correct_gets_confidence_zero(code):
    """The gate must never trust a decoding the BCH decoder itself flags as failed, whatever
    the distance to the cluster it returns happens to be."""
    import galois

    words = np.random.default_rng(2).integers(0, 2, (3000, code.n)).astype(np.uint8)
    _, n_errors = code.bch.decode(galois.GF2(words ^ code.mask), errors=True)
    failed = np.asarray(n_errors) < 0
    assert failed.sum() > 100, "random words: most lie outside every radius-t ball"
    _, confidence = code.decode(words)
    assert (confidence[failed] == 0).all() and (confidence[~failed] > 0).all()


def test_degenerate_words_are_not_keys(code):
    """A destroyed watermark often reads as all zeros or all ones: the mask keeps them off the keys."""
    _, confidence = code.decode(np.array([[0] * 31, [1] * 31], dtype=np.uint8))
    assert (confidence < code.threshold_for(0.01)).all()


def test_raw_bits_are_the_cluster_index_and_the_false_accept_rate_is_the_ball_count(code):
    clusters = np.arange(code.n_clusters)
    assert (code.raw_clusters(code.codewords(clusters)) == clusters).all()
    # d <= 5 admitted at 1 - 10/31: 64 keys x |B(31, 5)| / 2^31
    assert code.threshold_for(0.01) == pytest.approx(1 - 10 / 31)
    assert code.random_word_false_accept(1 - 10 / 31) == pytest.approx(64 * 206368 / 2 ** 31)
    # however low the gate, a word more than t = 7 bits from every key is never decoded: the
    # ball stops at radius t (3,572,224 words), not at the radius the threshold would allow
    assert code.random_word_false_accept(-1.0) == pytest.approx(64 * 3572224 / 2 ** 31)
    rng = np.random.default_rng(2)
    _, confidence = code.decode(rng.integers(0, 2, (20000, 31)))
    observed = (confidence >= code.threshold_for(0.01)).mean()
    assert observed == pytest.approx(code.random_word_false_accept(code.threshold_for(0.01)), abs=0.003)


def test_bad_code_and_payload_fail_clearly(code):
    with pytest.raises(ValueError, match="code='bch-7'; choose one of: bch-31-6"):
        drew.ClusterCode("bch-7")
    with pytest.raises(ValueError, match="needs 63 bits; this watermark carries 32"):
        drew.payload(drew.ClusterCode("bch-63-10"), np.array([0]), 32)
    with pytest.raises(ValueError, match="cluster indices must lie in"):
        code.codewords(np.array([64]))


# ----------------------------------------------------------------------------- watermarks and edits

@pytest.mark.parametrize("name", ["rivagan", "dwtdctsvd"])
def test_watermark_round_trip_on_clean_photos(name, photos, code):
    mark = drew.watermark(name)
    bits = drew.payload(code, np.array([3, 17, 60]), mark.payload_bits)
    marked = mark.embed(photos, bits)
    assert marked.shape == photos.shape and marked.dtype == np.uint8
    assert np.abs(marked.astype(int) - photos.astype(int)).mean() < 3, "the watermark must be invisible-ish"
    decoded, confidence = code.decode(mark.extract(marked))
    assert (decoded == [3, 17, 60]).all() and (confidence >= code.threshold_for(0.01)).all()


def test_unknown_watermark_and_edit_list_the_choices():
    with pytest.raises(ValueError, match="watermark 'stegano'; choose one of: rivagan, dwtdctsvd"):
        drew.watermark("stegano")
    with pytest.raises(ValueError, match="edit 'warp'; choose one of: none, rotate"):
        drew.apply_edit("warp", np.zeros((1, 8, 8, 3), np.uint8), seed=0)


def test_trustmark_glue_writes_and_reads_bit_strings(monkeypatch):
    """The paper preset's TrustMark adapter, against a stand-in with TrustMark's interface
    (its real weights download on first use, which the tests cannot do)."""
    class FakeTrustMark:
        def __init__(self, use_ECC, verbose, model_type, device):
            assert use_ECC is False and model_type == "Q"
            self.stored, self.device = {}, device

        def encode(self, image, secret, MODE):
            assert MODE == "binary" and set(secret) <= {"0", "1"} and len(secret) == 100
            out = image.copy()
            self.stored[out.tobytes()] = secret
            return out

        def decode(self, image, MODE):
            return self.stored.get(image.tobytes(), "0" * 100), True, -1

    monkeypatch.setitem(sys.modules, "trustmark", types.SimpleNamespace(TrustMark=FakeTrustMark))
    mark = drew.watermark("trustmark")
    # always an explicit device: left empty, the package would take a GPU the run was told not to use
    assert mark.tm.device == "cpu" and drew.watermark("trustmark", "cuda").tm.device == "cuda"
    code63 = drew.ClusterCode("bch-63-10")
    images = drew.synthetic_images(3, 32, 0)
    bits = drew.payload(code63, np.array([5, 900, 1023]), mark.payload_bits)
    assert bits.shape == (3, 100)
    decoded, confidence = code63.decode(mark.extract(mark.embed(images, bits)))
    assert (decoded == [5, 900, 1023]).all() and (confidence == 1).all()


SAMPLED_EDITS = ("rotate", "blur", "jitter", "combo")


def test_edits_keep_shape_and_follow_the_seed(photos):
    for edit in drew.EDITS:
        once, twice = drew.apply_edit(edit, photos, seed=4), drew.apply_edit(edit, photos, seed=4)
        assert once.shape == photos.shape and once.dtype == np.uint8 and (once == twice).all(), edit
        other_seed = drew.apply_edit(edit, photos, seed=5)
        # a sampled edit redraws its strengths with the seed; a fixed one does not move
        assert (other_seed != once).any() if edit in SAMPLED_EDITS else (other_seed == once).all(), edit
    assert (drew.apply_edit("none", photos, seed=0) == photos).all()
    assert (drew.apply_edit("flip", photos, seed=0) == photos[:, :, ::-1]).all()


def test_sampled_edits_draw_a_strength_per_query_in_the_official_ranges():
    """The official create_queries.py: RandomRotation(±int(90 · 0.25)), GaussianBlur(5) with σ in
    [0.1, 2], ColorJitter(1, 0.5, 1, 0.1) in a random order. A single draw for the whole batch, or
    the torchvision defaults (blur σ 0.1–2 on the wrong kernel, jitter without order), fail here."""
    n = 400
    angles = np.array([s["degrees"] for s in drew.edit_strengths("rotate", n, seed=0)])
    assert drew.MAX_DEGREES == 22 and np.abs(angles).max() <= 22 and angles.min() < -18 and angles.max() > 18
    assert len(np.unique(angles)) == n
    sigmas = np.array([s["sigma"] for s in drew.edit_strengths("blur", n, seed=0)])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and sigmas.min() < 0.3 and sigmas.max() > 1.8
    jitters = drew.edit_strengths("jitter", n, seed=0)
    for key, (low, high) in {"brightness": (0, 2), "contrast": (0.5, 1.5), "saturation": (0, 2),
                             "hue": (-0.1, 0.1)}.items():
        values = np.array([j[key] for j in jitters])
        assert values.min() >= low and values.max() <= high and np.ptp(values) > 0.8 * (high - low), key
    orders = {tuple(j["order"]) for j in jitters}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) > 12
    # the stream is the edit's own: another edit, or more queries, do not shift a query's draw
    assert drew.edit_strengths("combo", 5, seed=0) != drew.edit_strengths("rotate", 5, seed=0)
    assert drew.edit_strengths("rotate", 5, seed=0) == drew.edit_strengths("rotate", n, seed=0)[:5]
    assert all(s == {} for e in ("none", "crop", "flip", "stretch", "jpeg") for s in drew.edit_strengths(e, 3, 0))


def test_each_query_gets_its_own_draw_and_every_watermark_the_same(photos):
    """Copies of one image come back differently edited (one draw per query), and query i gets
    the i-th draw whatever the images are, so each watermark's copy of a query is edited alike."""
    import torchvision.transforms.v2.functional as TF

    copies = np.repeat(photos[:1], 6, axis=0)
    rotated = drew.apply_edit("rotate", copies, seed=0)
    assert len({r.tobytes() for r in rotated}) == 6
    angles = [s["degrees"] for s in drew.edit_strengths("rotate", 6, seed=0)]
    for image, angle, got in zip(copies, angles, rotated):
        want = TF.rotate(torch.from_numpy(image).permute(2, 0, 1)[None], angle)[0].permute(1, 2, 0).numpy()
        assert (got == want).all()
    other_mark = np.repeat(photos[1:2], 6, axis=0)
    for edit in SAMPLED_EDITS:
        first, second = drew.apply_edit(edit, copies, seed=0), drew.apply_edit(edit, other_mark, seed=0)
        # query i's edit depends on i and the seed, not on the other images of the batch
        assert (drew.apply_edit(edit, copies[:1], seed=0) == first[:1]).all(), edit
        assert (drew.apply_edit(edit, np.concatenate([copies[:3], other_mark[3:]]), seed=0)[3:] == second[3:]).all()


def test_jitter_applies_its_four_adjustments_in_the_drawn_order(photos):
    import torchvision.transforms.v2.functional as TF

    draws = drew.edit_strengths("jitter", 2, seed=3)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    got = drew.apply_edit("jitter", photos[:2], seed=3)
    assert draws[0]["order"] != draws[1]["order"], "the test needs two different orders"
    for image, draw, out in zip(photos[:2], draws, got):
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        for which in draw["order"]:
            x = adjust[which](x, draw[names[which]])
        assert (out == x[0].permute(1, 2, 0).numpy()).all()


def test_run_queries_edits_with_its_own_seed(monkeypatch):
    seen = []
    real = drew.apply_edit
    monkeypatch.setattr(drew, "apply_edit", lambda name, images, *, seed: seen.append(seed) or real(name, images, seed=seed))
    code, clusters, embedder, reference = _toy_reference(64)
    query_ids = np.arange(0, 64, 4)
    drew.run_queries(reference, query_ids, {"fake": _ReadsBits(code, clusters[query_ids])}, code, {"noisy": embedder},
                     ("rotate", "blur"), 0.5, seed=11, progress=False)
    assert seen == [11, 11]


def test_combo_is_the_official_chain():
    """Central 7/8 of the rows (severity 0.25), horizontal flip, rotation, resized back."""
    import torchvision.transforms.v2.functional as TF

    image = drew.synthetic_images(1, 64, seed=2)
    degrees = drew.edit_strengths("combo", 1, seed=7)[0]["degrees"]
    x = torch.from_numpy(image).permute(0, 3, 1, 2)
    want = TF.resize(TF.rotate(TF.horizontal_flip(TF.center_crop(x, [56, 64])), degrees), [64, 64], antialias=True)
    assert (drew.apply_edit("combo", image, seed=7) == want.permute(0, 2, 3, 1).numpy()).all()


# ----------------------------------------------------------------------------- retrieval

@pytest.fixture(scope="module")
def toy_index():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(256, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    clusters = drew.assign_clusters(256, 3, seed=0)
    queries = embeddings + rng.normal(scale=0.35, size=embeddings.shape).astype(np.float32)  # edited copies
    return embeddings, clusters, queries, drew.Index(embeddings, clusters)


def test_clusters_are_equal_and_random():
    clusters = drew.assign_clusters(256, 3, seed=0)
    assert np.bincount(clusters).tolist() == [32] * 8
    assert not (clusters == drew.assign_clusters(256, 3, seed=1)).all()
    with pytest.raises(ValueError, match="multiple of the 8 clusters"):
        drew.assign_clusters(100, 3, seed=0)


def test_oracle_cluster_retrieval_is_at_least_full_search(toy_index):
    embeddings, clusters, queries, index = toy_index
    truth = np.arange(len(queries))
    full = index.search_all(queries) == truth
    oracle = index.search_within(queries, clusters) == truth
    assert full.mean() < 1, "the toy must have misses for the test to mean anything"
    assert (oracle >= full).all() and oracle.mean() > full.mean()
    within = index.search_within(queries, clusters)
    assert (clusters[within] == clusters).all(), "cluster search returns only members"


def test_drew_falls_back_below_the_threshold_and_trusts_above(toy_index):
    embeddings, clusters, queries, index = toy_index
    wrong = (clusters + 1) % 8
    low, high = np.zeros(len(queries)), np.ones(len(queries))
    assert (drew.retrieve(index, queries, wrong, low, 0.5) == index.search_all(queries)).all()
    assert (drew.retrieve(index, queries, wrong, high, 0.5) == index.search_within(queries, wrong)).all()
    # the gate reads the threshold it is given: a confidence of 0.6 passes τ = 0.5, not τ = 0.9
    # (a gate capped at the official 0.5 would trust it at 0.9 too)
    mid = np.full(len(queries), 0.6)
    assert (drew.retrieve(index, queries, wrong, mid, 0.9) == index.search_all(queries)).all()
    assert (drew.retrieve(index, queries, wrong, mid, 0.5) == index.search_within(queries, wrong)).all()
    # "confidence ≥ τ" (Algorithm 1): a decoding exactly at the threshold is trusted
    assert (drew.retrieve(index, queries, wrong, mid, 0.6) == index.search_within(queries, wrong)).all()


def test_a_decoded_cluster_with_no_members_finds_nothing_rather_than_searching_everything(toy_index):
    embeddings, clusters, queries, index = toy_index
    nowhere = np.full(len(queries), 99)  # no reference image carries cluster 99
    assert (index.search_within(queries, nowhere) == -1).all()
    assert (drew.retrieve(index, queries, nowhere, np.ones(len(queries)), 0.5) == -1).all()


def test_gate_curve_and_paired_gain():
    import pandas as pd

    rows = pd.DataFrame({"embedder": "e", "watermark": "w", "confidence": [1.0, 0.6, 0.0, 1.0],
                         "decoded_cluster": [1, 2, 3, 4], "true_cluster": [1, 0, 3, 4],
                         "in decoded cluster": [True, False, True, True], "baseline": [False, True, True, False]})
    curve = drew.gate_curve(rows, np.array([0.5, 0.9, 2.0])).set_index("threshold")
    assert curve.loc[0.5, "coverage"] == 0.75 and curve.loc[0.5, "precision"] == pytest.approx(2 / 3)
    assert curve.loc[0.5, "false_accepts"] == 1 and curve.loc[0.5, "DREW"] == 0.75
    assert curve.loc[0.9, "precision"] == 1 and curve.loc[2.0, "DREW"] == rows.baseline.mean()
    gain, low, high = drew.paired_gain(np.array([1, 1, 1, 0] * 25), np.array([0, 1, 1, 0] * 25), seed=0)
    assert gain == pytest.approx(25) and low < 25 < high and low > 0
    # the interval is the two-sided percentile bootstrap: its 2.5th and 97.5th percentiles
    better, worse = np.array([1, 1, 1, 0, 0] * 8), np.array([0, 1, 0, 1, 0] * 8)
    diff = better - worse
    boots = diff[np.random.default_rng(4).integers(0, len(diff), (2000, len(diff)))].mean(1)
    expected = 100 * np.quantile(boots, [0.025, 0.975])
    assert drew.paired_gain(better, worse, seed=4)[1:] == pytest.approx(tuple(expected))


def test_reference_images_sources():
    assert drew.reference_images("synthetic", 4, 32, 0).shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="images='imagenet'; choose one of: cifar10, synthetic, folder:<path>"):
        drew.reference_images("imagenet", 4, 32, 0)


def test_folder_images_are_read_and_squared(tmp_path):
    from PIL import Image

    for i, size in enumerate([(40, 30), (30, 50)]):
        Image.fromarray(np.full((size[1], size[0], 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    images = drew.reference_images(f"folder:{tmp_path}", 2, 32, 0)
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="no .png"):
        drew.reference_images(f"folder:{tmp_path / 'empty'}", 1, 32, 0)


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-clip-vision"])
def test_hub_style_image_encoders_embed_from_a_saved_folder(name):
    folder = str(models._tiny_dir(name))
    embed = drew.Embedder(folder, "paper")
    out = embed(drew.synthetic_images(5, 64, 0))
    assert embed.kind == "image-encoder" and out.shape[0] == 5
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-efficientnet", "tiny-dinov2"])
def test_embedders_compute_on_their_device_and_hand_embeddings_to_the_host(name, monkeypatch):
    """The paper preset's device: the model and each batch of images on it (``meta``: shapes
    only, no GPU needed), the embeddings copied back to the host for FAISS (a copy that
    meta refuses: it has no data). An input left on the host, or a model left there, fails
    before that copy; embeddings left on the device would never reach the copy."""
    source = name if name == "tiny-efficientnet" else str(models._tiny_dir(name))
    embed = drew.Embedder(source, "smoke" if name == "tiny-efficientnet" else "paper", device="meta")
    model = embed.loaded.model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    seen = []
    forward = model.extract_features if embed.kind == "image-classifier" else model.forward

    def spy(*args, **kwargs):
        seen.extend(t.device.type for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "extract_features" if embed.kind == "image-classifier" else "forward", spy)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        embed(drew.synthetic_images(3, 64, 0))
    assert seen == ["meta"]
    cpu = drew.Embedder(source, "smoke" if name == "tiny-efficientnet" else "paper")
    assert cpu(drew.synthetic_images(3, 64, 0)).shape[0] == 3


def test_the_paper_preset_code_path_runs_on_tiny_local_models(tmp_path, results_tmp):
    """The paper preset with both hub-style embedders replaced by tiny saved models, and
    RivaGAN standing in for TrustMark (whose weights cannot be fetched offline)."""
    import json

    import papermill

    from replbook.paths import repo_root

    notebook = repo_root() / "notebooks" / "07_drew.ipynb"
    papermill.execute_notebook(
        str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(notebook.parent),
        progress_bar=False, parameters={
            "preset": "paper", "embedders": [str(models._tiny_dir("tiny-dinov2")), str(models._tiny_dir("tiny-clip-vision"))],
            "watermarks": ["rivagan"], "ecc": "bch-31-6", "images": "synthetic", "n_reference": 128,
            "n_queries": 8, "image_size": 64, "edits": ["none", "rotate"], "threads": 2})
    saved = json.loads((results_tmp / "07_drew.json").read_text())
    assert saved["preset"] == "paper" and {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}
    assert {row["embedder"] for row in saved["metrics"]["accuracy"]} == {
        str(models._tiny_dir("tiny-dinov2")), str(models._tiny_dir("tiny-clip-vision"))}


class _NoisyEmbedder:
    """Embeds an image as its pixels plus fresh noise on every call, so that a query misses
    its own reference often enough for DREW to have something to fix."""

    def __init__(self, noise: float):
        self.noise, self.rng = noise, np.random.default_rng(0)

    def __call__(self, images, progress=None):
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        flat = flat + self.noise * self.rng.standard_normal(flat.shape).astype(np.float32)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)


class _ReadsBits:
    """A watermark whose reads are chosen by the test: the true keys for the first half of
    the queries; another cluster's key, read cleanly, for the third quarter (a confident
    wrong read); random words for the rest (a mark destroyed by the edit)."""
    payload_bits = 32

    def __init__(self, code, clusters):
        self.code, self.clusters = code, clusters

    def extract(self, images):
        n = len(images)
        bits = drew.payload(self.code, self.clusters[:n], self.payload_bits)
        other = (self.clusters[n // 2:3 * n // 4] + 1) % self.code.n_clusters
        bits[n // 2:3 * n // 4] = drew.payload(self.code, other, self.payload_bits)
        bits[3 * n // 4:] = np.random.default_rng(1).integers(0, 2, bits[3 * n // 4:].shape)
        return bits


def _toy_reference(n: int):
    """A BCH(31, 6) code, ``n`` synthetic images in its clusters, a noisy embedder and its index."""
    code = drew.ClusterCode("bch-31-6")
    images = drew.synthetic_images(n, 16, seed=0)
    clusters = drew.assign_clusters(n, code.k, seed=0)
    embedder = _NoisyEmbedder(noise=0.6)
    reference = drew.Reference(clusters, {"fake": images}, {("fake", "noisy"): drew.Index(embedder(images), clusters)})
    return code, clusters, embedder, reference


def test_run_queries_searches_the_decoded_cluster_never_the_true_one():
    """DREW's search reads only what the watermark says: where the read is a random word,
    a search of the true cluster (a leak of the truth into DREW) would match the oracle."""
    code, clusters, embedder, reference = _toy_reference(128)
    query_ids = np.arange(0, 128, 2)
    mark = _ReadsBits(code, clusters[query_ids])
    tau = code.threshold_for(0.01)
    rows = drew.run_queries(reference, query_ids, {"fake": mark}, code, {"noisy": embedder}, ("none",), tau,
                            seed=0, progress=False)
    assert rows["baseline"].mean() < rows["oracle cluster"].mean(), "the toy must leave DREW something to fix"
    assert np.array_equal(rows["DREW"].to_numpy(), drew.gated_top1(rows, tau))
    destroyed = rows.index >= len(query_ids) // 2
    wrongly_trusted = destroyed & (rows.confidence >= tau) & (rows.decoded_cluster != rows.true_cluster)
    fell_back = destroyed & (rows.confidence < tau)
    assert fell_back.any() and wrongly_trusted.sum() >= len(query_ids) // 4
    assert (rows.loc[fell_back, "DREW"] == rows.loc[fell_back, "baseline"]).all()
    assert not rows.loc[wrongly_trusted, "DREW"].any(), "a wrong cluster cannot hold the query's own image"
    intact = ~destroyed
    assert (rows.loc[intact, "decoded_cluster"] == rows.loc[intact, "true_cluster"]).all()
    assert (rows.loc[intact, "DREW"] == rows.loc[intact, "oracle cluster"]).all()


def test_the_watermarked_references_are_verified_on_every_load(tmp_path, monkeypatch, capsys, code):
    """The watermarked reference set is cached (RivaGAN: ~55 ms an image); a flipped byte in
    it must be found on load and the set watermarked again, never served altered."""
    class CountingMark(drew.Watermark):
        name = "counting"
        calls = 0

        def embed(self, images, bits):
            type(self).calls += 1
            out = images.copy()
            out[:, 0, 0, 0] = bits[:, 0]
            return out

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    images, clusters = drew.synthetic_images(4, 16, 0), np.array([0, 1, 2, 3])
    first = drew.watermark_all(images, clusters, code, CountingMark(), progress=False)
    again = drew.watermark_all(images, clusters, code, CountingMark(), progress=False)
    assert CountingMark.calls == 1 and np.array_equal(first, again), "an intact entry was watermarked again"
    [stored] = tmp_path.glob("drew/counting-*/marked.npy")
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 0x01  # one pixel of the last image: still a loadable array
    stored.write_bytes(bytes(blob))
    rebuilt = drew.watermark_all(images, clusters, code, CountingMark(), progress=False)
    assert "fails its sha256 (damaged); building it again" in capsys.readouterr().out
    assert CountingMark.calls == 2 and np.array_equal(rebuilt, first)
    # another set of the same bytes in another shape is another entry, not this one
    drew.watermark_all(images.reshape(4, 32, 8, 3), clusters, code, CountingMark(), progress=False)
    assert CountingMark.calls == 3


def test_rivagan_reads_and_writes_frames_exactly_as_before_the_shared_scaling():
    """RivaGAN's frames come from replbook.images now, and its marked frames go back to images
    through images.to_uint8: both must be the bits its own numpy code gave (chapter 07's
    watermarked set did not change)."""
    images = drew.synthetic_images(3, 32, 1)
    frames = drew.RivaGAN._frames(images)
    assert frames.dtype == np.float32 and frames.shape == (3, 3, 1, 32, 32)
    assert np.array_equal(frames, (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)[:, :, None])
    # the way back: RivaGAN's marked frames (float32, a little outside [-1, 1] too) to uint8
    # images, as its numpy code wrote them: clip, scale, round half to even
    marked = np.random.default_rng(0).normal(0, 0.7, (3, 3, 1, 32, 32)).astype(np.float32)
    marked[0, 0, 0, 0, :4] = [-1.0, 1.0, 1 / 255 - 1, 3 / 255 - 1]  # the ends, and values near a half
    former = ((np.clip(marked[:, :, 0], -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(drew.to_uint8(torch.from_numpy(marked[:, :, 0])), former)
