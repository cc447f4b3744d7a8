"""replbook.architectures: the paper models' public configurations build models of the
published sizes, at full or reduced depth, without the hub (issue #29)."""
import importlib

import pytest

from replbook import architectures, models, paths

# the sizes the papers and model cards publish (parameters); a wrong hidden size, layer
# count, vocabulary, grouped-query setting or untied embedding misses these by far more than 1%
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6.74e9,        # Touvron et al. 2023 (6,738,415,616 on the hub)
    "meta-llama/Llama-2-13b-hf": 13.02e9,
    "meta-llama/Llama-2-70b-hf": 68.98e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "facebook/opt-66b": 65.7e9,               # Zhang et al. 2022: 66B nominal, 65.7B counted
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134.5e6,
    "google/gemma-3-270m": 268e6,             # 170M embedding + 100M transformer
    "sentence-transformers/all-MiniLM-L6-v2": 22.7e6,
    "llava-hf/llava-1.5-7b-hf": 7.06e9,
    "openai/clip-vit-large-patch14": 427.6e6,
    "timm/vit_base_patch16_clip_224.openai": 149.6e6,
    "facebook/dinov2-base": 86.6e6,
    "facebook/deit-base-patch16-224": 86.4e6,  # DeiT-B: 86M (+ the HF pooler)
    "facebook/dino-vitb16": 86.4e6,
    "CompVis/stable-diffusion-v1-4": 1.066e9,  # UNet 859.5M + VAE 83.7M + CLIP-L text 123.1M
    "stabilityai/stable-diffusion-2-1": 1.290e9,  # UNet 865.9M + VAE 83.7M + OpenCLIP-H text 340.4M
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_architecture_builds_the_published_size(name):
    assert architectures.parameter_count(name) == pytest.approx(PUBLISHED[name], rel=0.01)


def test_every_architecture_is_checked_against_a_published_size():
    whole = {n for n, a in architectures.ARCHITECTURES.items() if not any(n in b.parts for b in architectures.ARCHITECTURES.values())}
    assert whole == set(PUBLISHED)


def test_reduced_depth_keeps_the_width_and_removes_whole_layers():
    """count(L layers) = count(1) + (L − 1) × one layer, for every model with layers."""
    for name in ("meta-llama/Llama-2-70b-hf", "facebook/opt-66b", "google/gemma-3-270m"):
        one, two = architectures.parameter_count(name, 1), architectures.parameter_count(name, 2)
        layers = architectures.architecture(name).config["num_hidden_layers"]
        assert architectures.parameter_count(name) == one + (layers - 1) * (two - one)
    # LLaVA: both towers cut (CLIP-L 24 layers, the LM 32)
    assert architectures.parameter_count("llava-hf/llava-1.5-7b-hf", 1) < 0.1 * architectures.parameter_count(
        "llava-hf/llava-1.5-7b-hf")


def test_a_reduced_model_runs_on_the_cpu_with_random_weights():
    import torch

    model = architectures.build("HuggingFaceTB/SmolLM2-135M-Instruct", layers=1, device="cpu")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 1
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the hub model is


def test_weight_bytes_follow_the_dtype():
    n = architectures.parameter_count("meta-llama/Llama-2-7b-hf")
    assert architectures.weight_bytes("meta-llama/Llama-2-7b-hf") == 2 * n  # fp16, as released
    assert architectures.weight_bytes("meta-llama/Llama-2-7b-hf", "float32") == 4 * n
    with pytest.raises(ValueError, match="dtype='fp8': choose from float32"):
        architectures.weight_bytes("meta-llama/Llama-2-7b-hf", "fp8")


def test_registry_names_resolve_and_unknown_models_are_refused():
    assert architectures.architecture("llama2-70b").hub_id == "meta-llama/Llama-2-70b-hf"
    with pytest.raises(ValueError, match="model='gpt-5': no architecture recorded"):
        architectures.architecture("gpt-5")


def _hub_models(value):
    """The hub models a preset value names: registry names of hub models, or hub ids."""
    names = value if isinstance(value, (list, tuple)) else [value]
    for name in names:
        if not isinstance(name, str):
            continue
        spec = models.REGISTRY.get(name)
        if spec is not None and spec.source == "hub":
            yield name
        elif spec is None and name.count("/") == 1 and not name.startswith(("/", ".")) and " " not in name:
            yield name


def test_every_hub_model_a_paper_preset_names_has_an_architecture():
    """So every chapter's paper models can be sized and built without the hub."""
    named = set()
    for notebook in sorted(paths.repo_root().glob("notebooks/[0-9][0-9]_*.ipynb")):
        module = paths.chapter_module(notebook)
        module = importlib.import_module(f"replbook.{module}") if isinstance(module, str) else module
        for value in module.PRESETS["paper"].values():
            named |= set(_hub_models(value))
    assert len(named) >= 14
    for name in sorted(named):
        architectures.architecture(name)


def test_a_depth_beyond_the_model_is_the_whole_model_and_pipelines_are_cut_per_block():
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert architectures.parameter_count(name, 1000) == architectures.parameter_count(name)
    assert architectures.config_of(name, 1000).num_hidden_layers == 30
    # Stable Diffusion: the UNet's and VAE's resnet layers per block are cut too, not only the text tower
    sd = "CompVis/stable-diffusion-v1-4"
    unet_one = architectures.parameter_count(f"{sd}/unet", 1)
    assert unet_one < 0.8 * architectures.parameter_count(f"{sd}/unet")
    assert architectures.parameter_count(sd, 1) == (unet_one + architectures.parameter_count(f"{sd}/vae", 1)
                                                    + architectures.parameter_count("openai/clip-vit-large-patch14/text", 1))


def test_a_clip_tower_built_alone_projects_to_the_published_width():
    """CLIP's config repeats the projection width in each tower; a tower loaded alone
    (as chapter 09's paper preset loads the vision tower) reads it from there."""
    import transformers
    from accelerate import init_empty_weights

    config = architectures.config_of("openai/clip-vit-large-patch14")
    with init_empty_weights():
        vision = transformers.CLIPVisionModelWithProjection(config.vision_config)
        text = transformers.CLIPTextModelWithProjection(config.text_config)
    assert vision.visual_projection.out_features == text.text_projection.out_features == 768


def test_the_paper_precision_sets_the_bytes_and_a_cpu_build_its_dtype():
    import torch

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"  # released in bfloat16
    assert architectures.weight_bytes(name) == 2 * architectures.parameter_count(name)
    assert architectures.weight_bytes(name, "int8") == architectures.parameter_count(name)
    model = architectures.build(name, layers=1, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
