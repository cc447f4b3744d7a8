"""Chapter 00 — the model zoo: sanity checks a reader can judge for every
offline model the book uses."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .models import efficientnet_input, imagenet_classes  # noqa: F401  (chapter 00's notebook and tests read them here)

PRESETS = {
    "smoke": {
        "language_models": ["tiny-llama"],
        "image_model": "tiny-efficientnet",
        "sentence_model": "tiny-bert-encoder",
        "photos": ["chelsea"],
        "max_new_tokens": 4,
        "seed": 0,
        "threads": 2,
        "device": "cpu",
    },
    "book": {
        "language_models": ["smollm2-135m", "gemma3-270m"],
        "image_model": "efficientnet-lite0",
        "sentence_model": "minilm-l6",
        "photos": ["chelsea", "coffee", "rocket"],
        "max_new_tokens": 6,
        "seed": 0,
        "threads": 2,
        "device": "cpu",
    },
    "paper": {
        "language_models": ["smollm2-135m-hub", "gemma3-270m-hub"],
        "image_model": "efficientnet-lite0",  # no hub original: the package is the model
        "sentence_model": "minilm-l6-hub",
        "photos": ["chelsea", "coffee", "rocket"],
        "max_new_tokens": 6,
        "seed": 0,
        "threads": 2,
        "device": "auto",  # the GPU when there is one (each model whole on it, float32)
    },
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from .config import data_name, device, integer, items, model

    return {
        "language_models": items(model("causal-lm")),
        "image_model": model("image-classifier"),
        "sentence_model": model("sentence-encoder"),
        "photos": items(data_name("PHOTOS")),
        "max_new_tokens": integer(1, 256),
        "seed": integer(0),
        "threads": integer(1),
        "device": device(),
    }

PROMPT = "The capital of France is"
# two worked examples first: the format a base model is trained on (see notes/small-llms-measured.md)
FEW_SHOT_PROMPT = "The capital of Japan is Tokyo. The capital of Italy is Rome. The capital of France is"
ANSWER = "Paris"


def says(completion: str, answer: str) -> bool:
    """Does a completion *start* with the answer (ignoring spaces and case)?"""
    return completion.strip().lower().startswith(answer.lower())

# related pairs share a meaning in different words; unrelated pairs share nothing
SENTENCE_PAIRS = {
    "related": [
        ("A man is playing a guitar.", "Someone is strumming a guitar."),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
        ("Stock markets fell sharply today.", "Share prices dropped steeply today."),
    ],
    "unrelated": [
        ("A man is playing a guitar.", "Share prices dropped steeply today."),
        ("The cat sleeps on the sofa.", "The recipe needs two cups of flour."),
        ("Stock markets fell sharply today.", "A kitten is napping on the couch."),
    ],
}


# ----------------------------------------------------------------------------- language models

@torch.no_grad()
def next_token_distribution(lm: models.LoadedModel, prompt: str = PROMPT, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after ``prompt`` and their probabilities."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.model.device)
    probs = lm.model(ids).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def complete(lm: models.LoadedModel, prompt: str = PROMPT, max_new_tokens: int = 6) -> str:
    """Greedy continuation of ``prompt`` (deterministic: no sampling)."""
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.model.device)
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def load_times(name: str, preset: str, device: str = "cpu") -> dict[str, float | str]:
    """Load a model twice through the registry onto ``device``: the first load may convert
    (cold); the second always reads the cache. The cold time of a cache made earlier is
    read from the cache's manifest, where the conversion recorded it."""
    first = models.load(name, preset=preset, device=device)
    first_seconds, first_load = first.info.get("convert_seconds", first.load_seconds), first.loaded_from
    del first  # the device holds one copy of a model, not two
    cached = models.load(name, preset=preset, device=device)
    cold = first_seconds + (cached.load_seconds if first_load == "cache" else 0.0)
    return {"model": name, "cold_s": round(float(cold), 1), "cached_s": round(cached.load_seconds, 2),
            "first_load": first_load, "params_M": round(cached.num_parameters / 1e6, 1)}, cached


# ----------------------------------------------------------------------------- image classifier

def preprocess(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """RGB uint8 HxWx3 -> 1x3xSxS, resized on the short side and centre-cropped,
    TF-Lite normalisation (x*255-127)/128 as EfficientNet-Lite was trained with."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x - 127.0) / 128.0


@torch.no_grad()
def classify(net: torch.nn.Module, image: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` likeliest ImageNet classes of ``image``, computed on ``net``'s device."""
    probs = net(preprocess(image).to(next(net.parameters()).device)).softmax(-1)[0].cpu()
    top = probs.topk(k)
    names = imagenet_classes()
    return [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices)]


# ----------------------------------------------------------------------------- sentence encoder

def pair_similarities(encoder, pairs: dict[str, list[tuple[str, str]]] = SENTENCE_PAIRS) -> dict[str, list[float]]:
    """Cosine similarity of each sentence pair, grouped as in ``pairs``."""
    out = {}
    for group, group_pairs in pairs.items():
        a = encoder.encode([p[0] for p in group_pairs], convert_to_tensor=True, normalize_embeddings=True)
        b = encoder.encode([p[1] for p in group_pairs], convert_to_tensor=True, normalize_embeddings=True)
        out[group] = [round(float(s), 4) for s in (a * b).sum(-1)]
    return out

