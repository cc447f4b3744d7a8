"""Chapter 09's method: RepDecompose is exact for both architectures, CompAlign and
CompAttribute do what they claim on constructed inputs, the data has the stated
correlation."""
import numpy as np
import pytest
import torch

from replbook import vitdecomp


@pytest.fixture(scope="module", params=vitdecomp.ARCHITECTURES)
def small_model(request):
    model = vitdecomp.build_model(request.param, image_size=24, width=32, depth=2, heads=4, seed=0, num_labels=3)
    with torch.no_grad():  # non-trivial LayerScale, LayerNorm affine parameters and biases (the output
        for name, p in model.named_parameters():  # projection's is split over the heads: a whole one per head is wrong)
            if "lambda1" in name or "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_the_contributions_sum_to_the_representation(small_model):
    pixels = torch.randn(6, 3, 24, 24)
    decomposition = vitdecomp.decompose(small_model, pixels, batch=4)
    assert decomposition.contributions.shape == (6, 1 + 2 * (4 + 1), decomposition.representation.shape[1])
    print(f"{type(small_model).__name__}: max abs error {decomposition.max_abs_error:.2e}")
    assert decomposition.max_abs_error < 1e-5
    with torch.no_grad():  # the representation is what the classifier reads
        assert torch.allclose(small_model.classifier(decomposition.representation),
                              small_model(pixel_values=pixels).logits, atol=1e-5)
    assert decomposition.names[:6] == ["embed", "L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.MLP"]


def test_decompose_runs_the_model_a_batch_at_a_time_and_keeps_the_result_on_the_host(small_model):
    """decompose_batch sets what a batch holds on the device (the paper preset's 16 DINOv2
    images instead of 256: ~13 GB instead of ~209): 7 images in batches of 3 go through the
    model as 3, 3 and 1, and decompose as they do in one batch (to float rounding)."""
    pixels = torch.randn(7, 3, 24, 24)
    seen = []
    hook = small_model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(len(kwargs["pixel_values"])),
                                                 with_kwargs=True)
    try:
        parts = vitdecomp.decompose(small_model, pixels, batch=3)
    finally:
        hook.remove()
    assert seen == [3, 3, 1]
    whole = vitdecomp.decompose(small_model, pixels, batch=7)
    assert parts.contributions.device.type == "cpu" and parts.representation.device.type == "cpu"
    assert torch.allclose(parts.contributions, whole.contributions, atol=1e-6)
    assert torch.allclose(parts.representation, whole.representation, atol=1e-6)


def test_mean_ablation_with_a_components_own_values_changes_nothing(small_model):
    decomposition = vitdecomp.decompose(small_model, torch.randn(5, 3, 24, 24))
    with torch.no_grad():
        logits = small_model.classifier(decomposition.representation)
        means = decomposition.contributions.mean(0)
        assert torch.allclose(vitdecomp.ablated_logits(small_model, decomposition, [], means), logits)
        ablated = vitdecomp.ablated_logits(small_model, decomposition, [1, 3], means)
        rep = decomposition.representation - decomposition.contributions[:, [1, 3]].sum(1) + means[[1, 3]].sum(0)
        assert torch.allclose(ablated, small_model.classifier(rep), atol=1e-5)


def test_unsupported_models_and_architectures_say_what_is_supported():
    with pytest.raises(ValueError, match="supports ViTForImageClassification and Dinov2ForImageClassification"):
        vitdecomp.component_names(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="choose one of: vit, dinov2"):
        vitdecomp.build_model("swin", 24, 32, 2, 4, 0)


def test_compalign_recovers_a_linear_readout():
    generator = torch.Generator().manual_seed(0)
    contributions = torch.randn(600, 3, 8, generator=generator)
    truth = torch.linalg.qr(torch.randn(3, 16, 8, generator=generator))[0].transpose(1, 2)  # 3 orthogonal 8->16 maps
    targets = torch.nn.functional.normalize(torch.einsum("ncd,cde->ne", contributions, truth), dim=-1)
    align = vitdecomp.fit_compalign(contributions, targets, steps=400, lr=2e-2, orthogonality_weight=0.1, seed=0)
    assert vitdecomp.alignment_cosine(align, contributions, targets) > 0.97
    with torch.no_grad():
        align.maps.copy_(truth)
    assert float(align.orthogonality().detach()) < 1e-6
    with torch.no_grad():  # "a rotation up to scale": a uniformly scaled rotation is not penalised
        align.maps.copy_(3 * truth)
    assert float(align.orthogonality().detach()) < 1e-6
    with torch.no_grad():  # a map that stretches one direction is
        align.maps.copy_(truth * torch.tensor([1.0] * 7 + [3.0])[:, None])
    assert float(align.orthogonality().detach()) > 0.5


def test_the_orthogonality_term_is_part_of_the_fit():
    """λ·orth is in the loss: fitting a readout whose maps are far from rotations, the maps
    fitted with λ > 0 are closer to rotations than those fitted with λ = 0 (same seed, same
    batches); a fit that drops the term gives the same maps for both."""
    generator = torch.Generator().manual_seed(2)
    contributions = torch.randn(400, 2, 8, generator=generator)
    skewed = torch.randn(2, 8, 16, generator=generator) * torch.linspace(0.2, 3.0, 8)[:, None]
    targets = torch.nn.functional.normalize(torch.einsum("ncd,cde->ne", contributions, skewed), dim=-1)
    fitted = {weight: vitdecomp.fit_compalign(contributions, targets, steps=150, lr=2e-2,
                                              orthogonality_weight=weight, seed=0).orthogonality().item()
              for weight in (0.0, 1.0)}
    assert fitted[1.0] < 0.5 * fitted[0.0], fitted


def test_component_scores_rank_the_component_that_carries_the_feature():
    generator = torch.Generator().manual_seed(0)
    basis = vitdecomp.orthonormal_basis(torch.randn(2, 10, generator=generator))
    feature = torch.randn(400, 2, generator=generator) @ basis * 5  # lives in the feature's span
    noise = torch.randn(400, 3, 10, generator=generator)
    noise = noise - (noise @ basis.T) @ basis  # orthogonal to the span
    mapped = torch.stack([noise[:, 0], feature, noise[:, 1], noise[:, 2]], 1)
    mapped[:, 0] += 3 * basis[0]  # a constant inside the span: no correlation, once centred over the images
    scores = vitdecomp.component_scores(mapped, basis)
    assert scores[1] == pytest.approx(1.0, abs=1e-5) and scores.abs().max() == scores[1]
    assert abs(float(scores[0])) < 0.05
    assert vitdecomp.top_components(scores, 1) == [1]


def test_component_scores_average_over_the_basis_directions():
    # CompAttribute averages the correlation over the text basis's directions: a component
    # that carries all of the total along one of two directions and nothing along the other
    # scores 1/2, not 1 (a maximum over directions would rank it with a full carrier)
    generator = torch.Generator().manual_seed(1)
    basis = torch.eye(10)[:2]  # axis directions: "nothing along the other" is exactly zero, not rounding noise
    along_first = torch.randn(500, 1, generator=generator) * basis[0]
    along_second = torch.randn(500, 1, generator=generator) * basis[1]
    mapped = torch.stack([along_first, along_second, along_first + along_second], 1)
    scores = vitdecomp.component_scores(mapped, basis)
    assert scores[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    assert float(scores[2]) == pytest.approx(1.0, abs=1e-5)


def test_the_official_granularity_sums_the_early_layers_into_one_component(small_model):
    decomposition = vitdecomp.decompose(small_model, torch.randn(5, 3, 24, 24))
    coarse = vitdecomp.lump_early_layers(decomposition, 1)
    assert coarse.names == ["before L1", "L1.H0", "L1.H1", "L1.H2", "L1.H3", "L1.MLP"]
    early = [i for i, n in enumerate(decomposition.names) if n == "embed" or n.startswith("L0.")]
    assert torch.allclose(coarse.contributions[:, 0], decomposition.contributions[:, early].sum(1))
    assert torch.equal(coarse.contributions[:, 1:], decomposition.contributions[:, len(early):])
    assert torch.allclose(coarse.contributions.sum(1), decomposition.representation, atol=1e-5)
    for first in (-1, 2):
        with pytest.raises(ValueError, match=f"first_layer={first}"):
            vitdecomp.lump_early_layers(decomposition, first)
    # ViT-B's block 7 of 12, scaled and rounded to the nearest layer (3 x 7/12 = 1.75 -> 2, 5 x 7/12 = 2.9 -> 3)
    assert [vitdecomp.official_first_layer(d) for d in (12, 4, 2, 3, 5)] == [7, 2, 1, 2, 3]


def test_the_official_ranking_prefers_a_purely_spurious_component_to_one_that_also_carries_the_core():
    """Score for location minus score for object: a component carrying both ranks below one
    carrying location alone, although its location score is higher (the location-only ranking
    picks it)."""
    generator = torch.Generator().manual_seed(0)
    span = vitdecomp.orthonormal_basis(torch.randn(4, 12, generator=generator))
    location, core = span[:2], span[2:]
    n = 500
    where, what = torch.randn(n, 2, generator=generator), torch.randn(n, 2, generator=generator)
    only_location = (where + 0.5 * torch.randn(n, 2, generator=generator)) @ location  # a little less in step
    both = 1.5 * where @ location + what @ core
    only_core = torch.randn(n, 2, generator=generator) @ core
    mapped = torch.stack([only_core, both, only_location], 1)
    ranking = vitdecomp.spurious_minus_core(mapped, location, core)
    assert vitdecomp.top_components(ranking, 1) == [2]
    assert vitdecomp.top_components(vitdecomp.component_scores(mapped, location), 1) == [1]  # the variant's pick


def test_chance_agreement_is_that_of_random_neighbours_other_than_the_query():
    labels = np.array([0, 0, 1, 1])
    assert vitdecomp.chance_agreement(labels) == pytest.approx(1 / 3)  # not 1/2: a query is not its own neighbour
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    embeddings = torch.as_tensor(rng.normal(size=(600, 16)), dtype=torch.float32)
    assert vitdecomp.retrieval_agreement(embeddings, labels, k=5) == pytest.approx(vitdecomp.chance_agreement(labels), abs=0.03)
    hits = vitdecomp.retrieval_hits(embeddings, labels, k=5)
    assert hits.shape == (600,) and set(np.unique(hits * 5)) <= set(range(6))


def test_the_margin_interval_pairs_the_queries():
    """Both retrievals share each query's difficulty; only a paired interval sees a small,
    steady margin through it."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, 400)
    own, other = difficulty + 0.02, difficulty
    mean, low, high = vitdecomp.paired_interval(own, other, seed=0)
    assert mean == pytest.approx(0.02) and low == pytest.approx(0.02) and high == pytest.approx(0.02)
    mean, low, high = vitdecomp.paired_interval(own + rng.normal(0, 0.05, 400), other, seed=0)
    assert 0 < low < mean < high and high - low < 0.03
    assert vitdecomp.paired_interval(own, other, seed=1)[1:] == vitdecomp.paired_interval(own, other, seed=1)[1:]


def test_retrieval_agreement():
    labels = np.array([0, 0, 1, 1, 2, 2])
    exact = torch.nn.functional.one_hot(torch.as_tensor(labels)).float()
    assert vitdecomp.retrieval_agreement(exact, labels, k=1) == 1.0
    assert vitdecomp.retrieval_agreement(exact + 0.01 * torch.randn(6, 3), labels, k=1) == 1.0


def test_the_waterbirds_like_set_has_the_stated_correlation_and_balanced_test_groups():
    pretrain, train, test = vitdecomp.waterbirds_like(n_train=600, n_test=100, agreement=0.95, size=48, seed=0)
    assert train.images.shape == (600, 48, 48, 3) and test.images.shape == (200, 48, 48, 3)
    assert abs((train.backgrounds == train.labels).mean() - 0.95) < 0.03
    assert abs((pretrain.backgrounds == pretrain.labels).mean() - 0.5) < 0.08
    assert np.bincount(test.groups, minlength=4)[[0, 1]].tolist() == [np.sum(test.labels == 0) // 2] * 2
    assert np.array_equal(train.images[:, 8:40, 8:40], pretrain.images[:, 8:40, 8:40]), "same photos, other backgrounds"
    water, land = test.images[test.backgrounds == 1, :4].mean((0, 1, 2)), test.images[test.backgrounds == 0, :4].mean((0, 1, 2))
    assert water[2] > land[2] and land[1] > land[2], "water is blue, land is green"


def test_the_paper_preset_code_path_runs_on_tiny_saved_models(tmp_path, results_tmp):
    """The paper preset with its hub backbones replaced by tiny ViT and DINOv2 models saved
    with save_pretrained, and OpenAI's CLIP by a tiny random open_clip model."""
    import json

    import papermill
    from transformers import ViTConfig, ViTForImageClassification

    from replbook import models
    from replbook.paths import repo_root

    vit_folder = tmp_path / "tiny-vit"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                        image_size=32, patch_size=8)).save_pretrained(vit_folder)
    dinov2_folder = str(models._tiny_dir("tiny-dinov2"))
    notebook = repo_root() / "notebooks" / "09_vit_decompose.ipynb"
    papermill.execute_notebook(
        str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(notebook.parent),
        progress_bar=False, parameters={
            "preset": "paper", "architectures": [str(vit_folder), dinov2_folder], "clip": "tiny-open-clip",
            "n_train": 120, "n_test": 40, "n_align": 60, "align_steps": 3, "probe_steps": 5, "top_k": 2,
            "random_sets": 3, "threads": 2})
    saved = json.loads((results_tmp / "09_vit_decompose.json").read_text())
    assert saved["preset"] == "paper" and {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3"}
    assert [m["architecture"] for m in saved["metrics"]["models"]] == [str(vit_folder), dinov2_folder]
    assert all(row["relative"] <= 1e-4 for row in saved["metrics"]["exactness"])


def test_offline_presets_refuse_hub_backbones():
    from replbook import config

    cfg = config.resolve(vitdecomp.PRESETS, "smoke")
    with pytest.raises(ValueError, match="runs offline. Use preset='paper', a saved folder, or one of: vit, dinov2"):
        vitdecomp.load_classifier("facebook/dinov2-base", cfg, None)


def test_a_damaged_trained_vit_in_the_cache_is_trained_again_not_served(tmp_path, monkeypatch, capsys):
    """Chapter 09's ViTs trained here are cached; a flipped byte in the weights must be found
    (sha256 on load) and the model trained again to the same weights, never loaded altered."""
    from replbook import config

    cfg = config.resolve(vitdecomp.PRESETS, "smoke")
    pretrain, _, _ = vitdecomp.waterbirds_like(n_train=64, n_test=8, agreement=0.95, size=cfg.image_size, seed=0)
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "cache"))  # after the photos: they come from the real cache
    model, _ = vitdecomp.load_classifier("vit", cfg, pretrain, progress=False)
    first = [t.clone() for t in model.state_dict().values()]  # a loaded model may map the file itself
    [weights] = (tmp_path / "cache" / "vitdecomp").glob("vit-*/model.safetensors")
    model, _ = vitdecomp.load_classifier("vit", cfg, pretrain, progress=False)
    again = [t.clone() for t in model.state_dict().values()]
    assert "building it again" not in capsys.readouterr().out, "an intact entry was trained again"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0x01  # inside the last tensor's values: still a loadable file, one weight altered
    weights.write_bytes(bytes(blob))
    rebuilt, _ = vitdecomp.load_classifier("vit", cfg, pretrain, progress=False)
    assert "fails its sha256 (damaged); building it again" in capsys.readouterr().out
    for a, b, c in zip(first, again, rebuilt.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
