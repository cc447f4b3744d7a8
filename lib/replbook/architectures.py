"""The paper preset's hub models as architectures: their public configuration numbers
(hidden size, layers, heads, vocabulary, image size — as each model's ``config.json`` on
the hub states them), so that a model can be built from its config without the hub.

Two uses (issue #29):

- **How big** (:func:`parameter_count`): the model built on PyTorch's ``meta`` device
  (Accelerate's ``init_empty_weights``: shapes, no memory), its parameters counted
  exactly — the basis of every chapter's resource card;
- **A dry run at full width** (:func:`build`): the same model with random weights,
  optionally at reduced depth (``layers=1``), so a paper preset's code path can run on a
  CPU without downloading tens of gigabytes.

Each entry names its source. A test holds every count to the size its model card
publishes (within 1%), so a wrong number here fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Architecture:
    """``family`` decides the builder; ``config`` holds the public numbers (the keys of the
    family's transformers/diffusers config); ``parts`` lists the components of a pipeline
    (Stable Diffusion: UNet, VAE, text encoder), each an Architecture of its own."""

    hub_id: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"  # the precision the paper ran it in
    source: str = ""
    parts: tuple[str, ...] = ()
    # (shortest edge, centre crop) of the image processor, where it does not feed the model at
    # the configuration's ``image_size`` (the repository's preprocessor_config.json): DINOv2's
    # positions are learned at 518 px, but its processor crops 224 px. Serving 518 made chapter
    # 07's dry run embed 1,370 tokens an image instead of 257 (3.5 GB more)
    processor: tuple[int, int] | None = None


def _llama(hidden, intermediate, layers, heads, kv_heads, vocab, positions, **extra) -> dict:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": positions, **extra}


_CLIP_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "patch_size": 14, "image_size": 224}
_CLIP_L14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}
_VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "patch_size": 16, "image_size": 224}

ARCHITECTURES: dict[str, Architecture] = {a.hub_id: a for a in [
    Architecture("meta-llama/Llama-2-7b-hf", "llama", _llama(4096, 11008, 32, 32, 32, 32000, 4096),
                 "float16", "Touvron et al. 2023, Table 1; config.json"),
    Architecture("meta-llama/Llama-2-13b-hf", "llama", _llama(5120, 13824, 40, 40, 40, 32000, 4096),
                 "float16", "Touvron et al. 2023, Table 1; config.json"),
    Architecture("meta-llama/Llama-2-70b-hf", "llama", _llama(8192, 28672, 80, 64, 8, 32000, 4096),
                 "float16", "Touvron et al. 2023 (grouped-query attention, 8 KV heads); config.json"),
    Architecture("meta-llama/Meta-Llama-3-8B", "llama",
                 _llama(4096, 14336, 32, 32, 8, 128256, 8192, rope_theta=500000.0), "bfloat16",
                 "Llama 3 model card; config.json"),
    Architecture("facebook/opt-66b", "opt",
                 {"hidden_size": 9216, "ffn_dim": 36864, "num_hidden_layers": 64, "num_attention_heads": 72,
                  "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 9216},
                 "float16", "Zhang et al. 2022, Table 1; config.json"),
    Architecture("HuggingFaceTB/SmolLM2-135M-Instruct", "llama",
                 _llama(576, 1536, 30, 9, 3, 49152, 8192, tie_word_embeddings=True), "bfloat16",
                 "SmolLM2 config.json"),
    Architecture("google/gemma-3-270m", "gemma3",
                 {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768},
                 "bfloat16", "Gemma 3 config.json (270m)"),
    Architecture("sentence-transformers/all-MiniLM-L6-v2", "bert",
                 {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12,
                  "vocab_size": 30522, "max_position_embeddings": 512}, "float32", "config.json"),
    Architecture("llava-hf/llava-1.5-7b-hf", "llava",
                 {"text_config": _llama(4096, 11008, 32, 32, 32, 32064, 4096),
                  "vision_config": {**_CLIP_L14_VISION, "image_size": 336, "projection_dim": 768},
                  "image_token_index": 32000, "projector_hidden_act": "gelu"},
                 "float16", "Liu et al. 2023 (LLaVA-1.5: Vicuna-7B, CLIP ViT-L/14 at 336 px, 2-layer MLP); config.json"),
    Architecture("openai/clip-vit-large-patch14", "clip",
                 # config.json repeats the projection width in each tower's config, and a tower
                 # loaded alone (CLIPVisionModelWithProjection) reads it from there
                 {"text_config": {**_CLIP_L14_TEXT, "projection_dim": 768},
                  "vision_config": {**_CLIP_L14_VISION, "projection_dim": 768}, "projection_dim": 768},
                 "float32", "Radford et al. 2021, Table 20; config.json"),
    Architecture("timm/vit_base_patch16_clip_224.openai", "clip",
                 {"text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                                  "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77},
                  "vision_config": _VIT_B16, "projection_dim": 512},
                 "float32", "Radford et al. 2021, Table 20 (ViT-B/16)"),
    Architecture("facebook/dinov2-base", "dinov2",
                 {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                  "patch_size": 14, "image_size": 518}, "float32", "Oquab et al. 2023; config.json",
                 processor=(256, 224)),
    Architecture("facebook/deit-base-patch16-224", "vit", _VIT_B16, "float32", "Touvron et al. 2021; config.json"),
    Architecture("facebook/dino-vitb16", "vit", _VIT_B16, "float32", "Caron et al. 2021; config.json"),
    # Stable Diffusion: a pipeline of parts (each an entry below)
    Architecture("CompVis/stable-diffusion-v1-4", "pipeline", dtype="float16", source="model card",
                 parts=("CompVis/stable-diffusion-v1-4/unet", "CompVis/stable-diffusion-v1-4/vae",
                        "openai/clip-vit-large-patch14/text")),
    Architecture("CompVis/stable-diffusion-v1-4/unet", "sd-unet",
                 {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64, "layers_per_block": 2},
                 "float16",
                 "unet/config.json (the diffusers defaults are SD 1.x's UNet)"),
    Architecture("CompVis/stable-diffusion-v1-4/vae", "sd-vae",
                 {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
                  "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                  "sample_size": 512}, "float16", "vae/config.json"),
    Architecture("openai/clip-vit-large-patch14/text", "clip-text", _CLIP_L14_TEXT, "float16",
                 "SD 1.x's text encoder: CLIP ViT-L/14's text tower"),
    Architecture("stabilityai/stable-diffusion-2-1", "pipeline", dtype="float16", source="model card",
                 parts=("stabilityai/stable-diffusion-2-1/unet", "CompVis/stable-diffusion-v1-4/vae",
                        "stabilityai/stable-diffusion-2-1/text")),
    Architecture("stabilityai/stable-diffusion-2-1/unet", "sd-unet",
                 {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                  "sample_size": 96, "layers_per_block": 2}, "float16", "unet/config.json"),
    Architecture("stabilityai/stable-diffusion-2-1/text", "clip-text",
                 {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                  "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}, "float16",
                 "text_encoder/config.json (OpenCLIP ViT-H/14's text tower, its last layer dropped)"),
]}


def architecture(name: str) -> Architecture:
    """The entry for a hub id, or for a registry name whose spec has that hub id."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    from . import models

    spec = models.REGISTRY.get(name)
    if spec is not None and spec.hub_id in ARCHITECTURES:
        return ARCHITECTURES[spec.hub_id]
    raise ValueError(f"model={name!r}: no architecture recorded; known: {', '.join(sorted(ARCHITECTURES))}")


def _with_depth(config: dict, layers: int | None) -> dict:
    if layers is None:
        return dict(config)
    out = dict(config)
    # a transformer's layers; a Stable Diffusion UNet's or VAE's resnet (and attention)
    # layers per resolution block
    for key in ("num_hidden_layers", "layers_per_block"):
        if key in out:
            out[key] = min(out[key], layers)
    for sub in ("text_config", "vision_config"):
        if sub in out:
            out[sub] = _with_depth(out[sub], layers)
    return out


# the transformers config class of each plain family (its numbers are the class's keyword
# arguments); the composite families nest configs and are built in config_of
PLAIN_CONFIGS = {"llama": "LlamaConfig", "opt": "OPTConfig", "gemma3": "Gemma3TextConfig", "bert": "BertConfig",
                 "clip-text": "CLIPTextConfig", "dinov2": "Dinov2Config", "vit": "ViTConfig"}
# diffusers models: their config is the keyword arguments themselves
DIFFUSERS_FAMILIES = ("sd-unet", "sd-vae")
# the model class built from a config, where the Auto classes do not pick it: diffusers
# models, and composites whose Auto class would be a different head
MODEL_CLASSES = {"sd-unet": "UNet2DConditionModel", "sd-vae": "AutoencoderKL",
                 "llava": "LlavaForConditionalGeneration", "clip": "CLIPModel", "clip-text": "CLIPTextModel"}
# built with their language-model head (the rest: AutoModel, the bare encoder)
CAUSAL_FAMILIES = ("llama", "opt", "gemma3")


def config_of(name: str, layers: int | None = None):
    """The transformers/diffusers config object (or, for diffusers models, the keyword
    arguments) of ``name``, at most ``layers`` transformer layers deep when given."""
    import transformers

    arch = architecture(name)
    numbers = _with_depth(arch.config, layers)
    family = arch.family
    if family in PLAIN_CONFIGS:
        return getattr(transformers, PLAIN_CONFIGS[family])(**numbers)
    if family in DIFFUSERS_FAMILIES:
        return numbers
    if family == "llava":
        return transformers.LlavaConfig(text_config=transformers.LlamaConfig(**numbers["text_config"]),
                                        vision_config=transformers.CLIPVisionConfig(**numbers["vision_config"]),
                                        **{k: v for k, v in numbers.items() if not k.endswith("_config")})
    if family == "clip":
        return transformers.CLIPConfig(text_config=numbers["text_config"], vision_config=numbers["vision_config"],
                                       projection_dim=numbers["projection_dim"])
    raise ValueError(f"{name!r}: family {family!r} is a pipeline; build its parts")


def build(name: str, layers: int | None = None, device: str = "meta", dtype: str | None = None):
    """``name`` built from its config with random weights (``device="cpu"``) or as shapes
    only (``device="meta"``, no memory), at most ``layers`` layers deep when given. A
    pipeline returns a dict of its parts."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    arch = architecture(name)
    if arch.family == "pipeline":
        return {part.rsplit("/", 1)[-1]: build(part, layers, device, dtype) for part in arch.parts}
    config = config_of(name, layers)
    torch_dtype = getattr(torch, dtype or "float32")

    def make():
        if arch.family in DIFFUSERS_FAMILIES:
            import diffusers
            return getattr(diffusers, MODEL_CLASSES[arch.family])(**config)
        if arch.family in MODEL_CLASSES:
            return getattr(transformers, MODEL_CLASSES[arch.family])(config)
        auto = transformers.AutoModelForCausalLM if arch.family in CAUSAL_FAMILIES else transformers.AutoModel
        return auto.from_config(config)

    if device != "meta":
        return make().to(torch_dtype)
    with init_empty_weights():
        model = make()
    if hasattr(model, "tie_weights"):  # tying is skipped under init_empty_weights (transformers 5)
        model.tie_weights()
    return model


@lru_cache(maxsize=None)
def parameter_count(name: str, layers: int | None = None) -> int:
    """Exact number of parameters of ``name`` (all parts of a pipeline), from its config on
    the meta device; tied weights (e.g. SmolLM2's embedding and output) counted once."""
    built = build(name, layers, device="meta")
    parts = built.values() if isinstance(built, dict) else [built]
    total = 0
    for model in parts:
        seen = set()
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def weight_bytes(name: str, dtype: str | None = None) -> int:
    """Bytes of ``name``'s weights in ``dtype`` (default: the precision the paper ran it in)."""
    dtype = dtype or architecture(name).dtype
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r}: choose from {', '.join(BYTES)}")
    return parameter_count(name) * BYTES[dtype]
