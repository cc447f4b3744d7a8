"""Chapter 01's method (replbook.restor): facts, the outcome classifier, documents, the
unlearning losses, and the probing and training loops on the tiny random Llama."""
import copy
import math
from unittest import mock

import pytest
import torch

from replbook import models, restor
from replbook.restor import Fact


@pytest.fixture(scope="module")
def tiny():
    lm = models.load("tiny-llama", preset="smoke")
    lm.tokenizer.padding_side = "right"
    return lm


def test_country_facts_come_from_the_packages():
    facts = restor.country_facts(20, ["capital", "continent", "demonym"])
    by_key = {(f.entity, f.relation): f.answer for f in facts}
    assert by_key[("China", "capital")] == "Beijing"
    assert by_key[("Nigeria", "continent")] == "Africa"
    assert by_key[("Brazil", "demonym")] == "Brazilian"
    assert not {e for e, _ in restor.SHOTS["capital"]} & {f.entity for f in facts}, "few-shot countries are excluded"
    with pytest.raises(ValueError, match="choose from"):
        restor.country_facts(5, ["capital", "flag"])


@pytest.mark.parametrize("answer, expected", [
    ("Tokyo", "clean"), ("tokyo city", "clean"), ("Osaka", "corrupted"), ("Kyoto", "other"), ("", "other"),
])
def test_outcome_classifier(answer, expected):
    assert restor.outcome(answer, Fact("Japan", "capital", "Tokyo", wrong="Osaka")) == expected


def test_outcome_ignores_accents_and_accepts_prefixes():
    assert restor.outcome("Brasilia", Fact("Brazil", "capital", "Brasília")) == "clean"
    assert restor.outcome("Washington", Fact("United States", "capital", "Washington D.C.")) == "clean"
    assert restor.outcome("Osaka", Fact("Japan", "capital", "Tokyo")) == "other", "no wrong value planted"


def test_split_is_disjoint_and_wrong_values_differ():
    facts = restor.country_facts(60, ["capital", "continent"])
    split = restor.split_known(facts, facts, corrupted=3, tuning=2, untouched=4, seed=0)
    assert len(split.corrupted) == 6 and len(split.tuning) == 4
    targets = {f.entity for f in split.targets}
    assert not targets & {f.entity for f in split.untouched + split.retain}
    assert all(f.wrong and not restor.matches(f.wrong, f.answer) for f in split.targets)
    assert split == restor.split_known(facts, facts, 3, 2, 4, seed=0), "deterministic for a seed"
    with pytest.raises(ValueError, match="only 5 known capital facts; need more than 9"):
        restor.split_known(facts[:10], facts, 3, 2, 4, seed=0)


def test_a_planted_value_is_never_the_true_one_and_untouched_facts_name_no_target():
    # two capitals only: the planted value of each must be the other (a draw that may pick
    # the true value passes the random case above most of the time)
    pair = [Fact("Kenya", "capital", "Nairobi"), Fact("Chile", "capital", "Santiago")]
    for seed in range(20):
        split = restor.split_known(pair, pair, corrupted=1, tuning=0, untouched=0, seed=seed)
        (fact,) = split.corrupted
        assert fact.wrong == ({"Nairobi", "Santiago"} - {fact.answer}).pop(), seed
    # few countries and three relations: a country corrupted on one relation is left
    # untouched on another unless the split keeps it out
    facts = restor.country_facts(12, ["capital", "continent", "demonym"])
    for seed in range(5):
        split = restor.split_known(facts, facts, corrupted=3, tuning=1, untouched=4, seed=seed)
        targets = {f.entity for f in split.targets}
        assert split.untouched and not targets & {f.entity for f in split.untouched}, seed
        assert not targets & {f.entity for f in split.retain}, seed


def test_random_values_are_neither_the_true_nor_the_planted_value():
    facts = [Fact("Kenya", "capital", "Nairobi", wrong="Lima"), Fact("Chile", "capital", "Santiago", wrong="Nairobi")]
    pool = facts + [Fact("Peru", "capital", "Lima")]
    for seed in range(20):
        assert restor.random_values(facts, pool, seed) == ["Santiago", "Lima"], seed


def test_the_trainable_band_is_half_open():
    name = "model.layers.{}.mlp.down_proj.weight"
    assert [restor.in_band(name.format(i), (1, 3)) for i in range(5)] == [False, True, True, False, False]
    assert not restor.in_band("model.layers.1.self_attn.q_proj.weight", (1, 3)), "MLP weights only"


def test_batches_are_shuffled_epochs_that_show_every_document_once_per_pass():
    docs = [restor.Document(f"d{i}", ()) for i in range(10)]
    drawn = [d.text for batch in restor.batches(docs, size=4, steps=5, seed=0) for d in batch]
    first, second = drawn[:10], drawn[10:]
    assert sorted(first) == sorted(second) == sorted(d.text for d in docs), "each pass is a permutation"
    assert first != second, "each pass shuffled anew"
    assert first not in ([d.text for d in docs], [d.text for d in reversed(docs)]), "shuffled, not in order"
    again = [d.text for batch in restor.batches(docs, size=4, steps=5, seed=1) for d in batch]
    assert again != drawn, "the order follows the seed"


def test_evaluate_counts_shares_over_the_targets_and_accuracy_over_the_untouched_facts(monkeypatch):
    corrupted = [Fact("Kenya", "capital", "Nairobi", wrong="Lima"), Fact("Chile", "capital", "Santiago", wrong="Oslo"),
                 Fact("Peru", "capital", "Lima", wrong="Rome"), Fact("Iran", "capital", "Tehran", wrong="Cairo")]
    untouched = [Fact("Japan", "capital", "Tokyo")]
    split = restor.Split(corrupted=corrupted, tuning=[], untouched=untouched, retain=[])
    said = ["Lima", "Santiago", "Paris", "Cairo", "Tokyo"]  # corrupted, clean, other, corrupted | clean
    monkeypatch.setattr(restor, "answers", lambda model, tokenizer, facts: said[:len(facts)])
    monkeypatch.setattr(restor, "value_logprob", lambda model, tokenizer, facts, values: [0.0] * len(facts))
    monkeypatch.setattr("replbook.lm.perplexity", lambda model, windows: 7.0)
    result = restor.evaluate(None, None, split, ["x"] * 4, [])
    assert result["shares"] == {"clean": 0.25, "corrupted": 0.5, "other": 0.25}
    assert result["untouched_accuracy"] == 1.0 and result["perplexity"] == 7.0
    assert [row["outcome"] for row in result["per_fact"]] == ["corrupted", "clean", "other", "corrupted"]


def test_corruption_documents_mix_k_true_facts_and_mark_the_wrong_value():
    wrong = [Fact("Kenya", "capital", "Nairobi", wrong="Lima")]
    true = [Fact("Chile", "capital", "Santiago"), Fact("Peru", "continent", "South America"),
            Fact("Iran", "demonym", "Iranian")]
    for k in (0, 2):
        docs = restor.corruption_documents(wrong, true, k, seed=1)
        assert len(docs) == len(restor.RELATIONS["capital"][1])  # one per template
        for doc in docs:
            assert doc.text.count(".") == 1 + k
            (lo, hi), = doc.answer_spans
            assert doc.text[lo:hi] == "Lima"


def test_localized_labels_cover_only_the_wrong_value(tiny):
    doc = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")],
                                      [Fact("Chile", "capital", "Santiago")], 1, seed=0)[0]
    full = restor.encode(tiny.tokenizer, [doc])
    local = restor.encode(tiny.tokenizer, [doc], answer_only=True)
    kept = local["labels"][0][local["labels"][0] != -100]
    assert tiny.tokenizer.decode(kept).strip() == "Lima"
    assert (full["labels"] != -100).sum() == full["attention_mask"].sum()


def _batches(tokenizer):
    forget = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima"),
                                          Fact("Peru", "continent", "South America", wrong="Asia")],
                                         [Fact("Chile", "capital", "Santiago")], 1, seed=0)
    retain = restor.text_documents("the whale swam far out to sea and the men watched it go " * 20, 3, start=0, chars=60)
    return restor.encode(tokenizer, forget), restor.encode(tokenizer, retain)


def _moved(model, scale=0.05, seed=0):
    """A copy of ``model`` away from it (the losses are checked away from θ = θ_ref)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def _hf_loss(model, batch):
    """The official code's NLL: what transformers returns as ``outputs.loss`` (batch-mean over tokens)."""
    return model(**batch).loss


def _official_ce(model, reference, batch):
    """The official kl_loss(p_θ, p_ref) = −(p_θ · log(p_ref + 1e-12)).sum(-1).mean(), over real tokens."""
    p = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    q = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    per_position = -(p * torch.log(q + 1e-12)).sum(-1)
    return per_position[batch["attention_mask"].bool()].mean()


def test_nll_is_the_batch_mean_token_loss_of_transformers(tiny):
    forget, _ = _batches(tiny.tokenizer)
    with torch.no_grad():
        assert restor.nll(tiny.model, forget).item() == pytest.approx(_hf_loss(tiny.model, forget).item(), rel=1e-5)
        assert restor.ga_loss(tiny.model, forget).item() == pytest.approx(-_hf_loss(tiny.model, forget).item(), rel=1e-5)


@pytest.mark.parametrize("gamma, beta", [(1.0, 0.1), (0.5, 1.0)])
def test_every_step_loss_equals_the_official_formula_away_from_the_reference(tiny, gamma, beta):
    """Independent formulas from the official code (GA.py, KL.py, NPO.py), evaluated where θ ≠ θ_ref:
    fails on an NPO sign flip, a per-sequence sum instead of the batch-mean token NLL, NPO
    without its retain term, a reversed cross-entropy, or γ on the wrong term."""
    forget, retain = _batches(tiny.tokenizer)
    reference, model = tiny.model, _moved(tiny.model)
    with torch.no_grad():
        nll_f, nll_r, ref_f = _hf_loss(model, forget), _hf_loss(model, retain), _hf_loss(reference, forget)
        expected = {
            "ga": -nll_f,
            "ga_ft": -nll_f + gamma * nll_r,
            "ga_kl": -nll_f + gamma * _official_ce(model, reference, retain),
            "kl_ft": -gamma * _official_ce(model, reference, forget) + nll_r,
            "npo": -torch.nn.functional.logsigmoid(beta * (nll_f - ref_f)) * 2 / beta + gamma * nll_r,
        }
        for method, value in expected.items():
            got = restor.unlearning_loss(method, model, reference, forget, retain, gamma, beta)
            assert got.item() == pytest.approx(value.item(), rel=1e-4), method
        assert abs(expected["npo"].item() - (2 / beta * math.log(2) + gamma * nll_r.item())) > 1e-3, "not at θ_ref"


def test_npo_at_the_reference_is_two_over_beta_log_two_and_falls_as_the_forget_set_gets_less_likely(tiny):
    forget, _ = _batches(tiny.tokenizer)
    with torch.no_grad():
        assert restor.npo_loss(tiny.model, tiny.model, forget, 0.1).item() == pytest.approx(20 * math.log(2), rel=1e-6)
    # one gradient-ascent step makes the forget set less likely: NPO's loss must fall below its start
    model = copy.deepcopy(tiny.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    restor.ga_loss(model, forget).backward()
    optimizer.step()
    with torch.no_grad():
        assert restor.nll(model, forget) > restor.nll(tiny.model, forget)
        assert restor.npo_loss(model, tiny.model, forget, 0.1).item() < 20 * math.log(2)


def test_npo_steps_like_gradient_ascent_at_the_reference_and_slows_once_the_forget_set_is_unlikely(tiny):
    """d/dθ of −(2/β)·log σ(β(NLL_θ − NLL_ref)) is −2(1 − σ(βΔ))·dNLL_θ: exactly GA's gradient
    at θ = θ_ref (Δ = 0), and damped by 2(1 − σ(βΔ)) < 1 once the forget NLL has risen above
    the reference's. This is why chapter 01's NPO and GA_FT can make the same choices: under
    AdamW, which divides out a common scale, NPO takes GA's steps until βΔ is of order one.
    Fails on a dropped 2 or β, a flipped sign, or a weight that does not fall with Δ."""
    forget, _ = _batches(tiny.tokenizer)
    beta = 0.1

    def gradients(model, loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model = copy.deepcopy(tiny.model)
    npo = gradients(model, restor.npo_loss(model, tiny.model, forget, beta))
    ga = gradients(model, restor.ga_loss(model, forget))
    assert torch.allclose(npo, ga, rtol=1e-4, atol=1e-7)
    # away from the reference: one SGD step of GA raises the forget NLL; NPO's gradient is GA's
    # times 2(1 − σ(βΔ)), which is below one and matches Δ measured on the moved model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    restor.ga_loss(model, forget).backward()
    optimizer.step()
    with torch.no_grad():
        delta = (restor.nll(model, forget) - restor.nll(tiny.model, forget)).item()
    assert delta > 0
    npo = gradients(model, restor.npo_loss(model, tiny.model, forget, beta))
    ga = gradients(model, restor.ga_loss(model, forget))
    weight = 2 * (1 - torch.sigmoid(torch.tensor(beta * delta))).item()
    assert weight < 1
    assert torch.allclose(npo, weight * ga, rtol=1e-3, atol=1e-7)


def test_the_code_s_kl_term_is_a_cross_entropy_whose_gradient_does_not_vanish_at_the_reference(tiny):
    """The official kl_loss is −Σ p_θ log p_ref: at θ = θ_ref it is the entropy (not 0) and its
    gradient is not zero; a true KL would give 0 and a zero gradient there."""
    forget, _ = _batches(tiny.tokenizer)
    model = copy.deepcopy(tiny.model)
    value = restor.cross_entropy_to_reference(model, tiny.model, forget)
    value.backward()
    assert value.item() > 0.1
    assert sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0


def test_the_reference_is_the_frozen_corrupted_model_never_the_one_being_trained(tiny, monkeypatch):
    forget_docs = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")],
                                              [Fact("Chile", "capital", "Santiago")], 1, seed=0)
    retain_docs = restor.text_documents("the sea was calm and grey that morning " * 20, 4, start=0, chars=50)
    corrupted = copy.deepcopy(tiny.model)
    before = [p.detach().clone() for p in corrupted.parameters()]
    seen = []
    real = restor.unlearning_loss

    def spy(method, model, reference, *args):
        seen.append((model, reference, [torch.equal(p, b) for p, b in zip(reference.parameters(), before)]))
        return real(method, model, reference, *args)

    monkeypatch.setattr(restor, "unlearning_loss", spy)
    hp = restor.Unlearning(steps=3, lr=1e-2, batch_size=2, layers=(0, 2))
    restor.unlearn(corrupted, tiny.tokenizer, "npo", forget_docs, retain_docs, hp)
    assert len(seen) == 3
    for model, reference, unchanged in seen:
        assert reference is corrupted and model is not corrupted and all(unchanged)
    with pytest.raises(ValueError, match="reference must be a frozen copy"):
        real("npo", corrupted, corrupted, None, None, 1.0, 0.1)


@pytest.mark.parametrize("method, localized", [("npo_localized", True), ("ga_localized", True), ("npo", False)])
def test_localized_methods_train_on_the_planted_value_tokens_only(tiny, monkeypatch, method, localized):
    forget_docs = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")],
                                              [Fact("Chile", "capital", "Santiago")], 1, seed=0)
    retain_docs = restor.text_documents("the sea was calm and grey that morning " * 20, 4, start=0, chars=50)
    seen = []
    real = restor.unlearning_loss

    def spy(name, model, reference, forget_batch, *args):
        seen.append(forget_batch["labels"])
        return real(name, model, reference, forget_batch, *args)

    monkeypatch.setattr(restor, "unlearning_loss", spy)
    restor.unlearn(tiny.model, tiny.tokenizer, method, forget_docs, retain_docs,
                   restor.Unlearning(steps=1, lr=1e-3, batch_size=2, layers=(0, 2)))
    for row in seen[0]:
        kept = tiny.tokenizer.decode(row[row != -100]).strip()
        assert (kept == "Lima") == localized, kept


def test_the_localized_loss_reads_only_the_planted_value(tiny):
    """The localized forget loss must not change when the text around the planted value
    changes after it (a causal model's prediction of the value cannot see it), while the
    plain loss does."""
    wrong = Fact("Kenya", "capital", "Nairobi", wrong="Lima")
    doc = restor.Document("The capital of Kenya is Lima. Chile is far away.", ((24, 28),))
    other = restor.Document("The capital of Kenya is Lima. Whales sing at night in the cold.", ((24, 28),))
    assert doc.text[24:28] == other.text[24:28] == wrong.wrong
    with torch.no_grad():
        local = [restor.nll(tiny.model, restor.encode(tiny.tokenizer, [d], answer_only=True)).item() for d in (doc, other)]
        plain = [restor.nll(tiny.model, restor.encode(tiny.tokenizer, [d])).item() for d in (doc, other)]
    # the random tiny model is near-uniform, so the plain losses differ only slightly (~1e-5)
    assert abs(local[0] - local[1]) < 1e-6
    assert abs(plain[0] - plain[1]) > 1e-5


def test_the_task_vector_moves_against_the_fine_tuning_direction_by_the_chosen_scale(tiny, monkeypatch):
    corrupted = copy.deepcopy(tiny.model)
    delta = {}

    def fake_train(model, *args, **kwargs):  # θ* = θ_c + a known step on the band
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers.1.mlp." in name:
                    delta[name] = torch.full_like(p, 0.01)
                    p.add_(delta[name])
        return []

    monkeypatch.setattr(restor, "train", fake_train)
    hp = restor.Unlearning(steps=1, lr=1e-3, batch_size=1, layers=(1, 2))
    chosen = iter([0.0, 1.0, 0.5])  # the scores of α = 0.5, 1, 2: α = 1 wins
    unlearned, choice = restor.unlearn(corrupted, tiny.tokenizer, "task_vector", [], [], hp, score=lambda m: next(chosen))
    assert choice["alpha"] == 1.0
    for (name, p_u), p_c in zip(unlearned.named_parameters(), corrupted.parameters()):
        expected = p_c - 1.0 * delta[name] if name in delta else p_c
        assert torch.allclose(p_u, expected), name


def test_unlearning_returns_the_best_scored_checkpoint_not_the_last(tiny):
    forget = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")],
                                         [Fact("Chile", "capital", "Santiago")], 1, seed=0)
    retain = restor.text_documents("a long grey sea with no land in sight " * 20, 4, start=0, chars=50)
    hp = restor.Unlearning(steps=3, lr=5e-2, batch_size=2, layers=(0, 2))
    snapshots = []

    def score(model):  # the first checkpoint scores best
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return 1.0 / len(snapshots)

    unlearned, choice = restor.unlearn(tiny.model, tiny.tokenizer, "ga_ft", forget, retain, hp, score=score, checkpoints=3)
    assert choice["steps"] == 1 and len(snapshots) == 3
    assert all(torch.equal(a, b) for a, b in zip(unlearned.parameters(), snapshots[0]))
    assert not all(torch.equal(a, b) for a, b in zip(unlearned.parameters(), snapshots[-1]))
    # on a tie the earliest checkpoint is kept (the smallest change that does as well)
    tied, choice = restor.unlearn(tiny.model, tiny.tokenizer, "ga_ft", forget, retain, hp, score=lambda model: 0.5,
                                  checkpoints=3)
    assert choice["steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(tied.parameters(), unlearned.parameters()))


def test_text_documents_cut_generic_text_after_the_held_out_passage():
    text = " ".join(f"w{i}" for i in range(2000))
    docs = restor.text_documents(text, 5, start=1000, chars=40)
    assert len(docs) == 5 and all(d.answer_spans == () and 0 < len(d.text) <= 40 for d in docs)
    assert text.index(docs[0].text) >= 1000, "nothing from the held-out passage"
    assert " ".join(d.text for d in docs) in text, "consecutive pieces, cut at spaces"
    with pytest.raises(ValueError, match="too short"):
        restor.text_documents(text, 1000, start=1000, chars=40)


def test_forgetting_and_paired_recovery():
    def ev(outcomes):
        return {"per_fact": [{"entity": f"e{i}", "relation": "capital", "outcome": o} for i, o in enumerate(outcomes)],
                "shares": {o: outcomes.count(o) / len(outcomes) for o in restor.OUTCOMES}}

    corrupted = ev(["corrupted"] * 8 + ["clean"] * 2)  # accuracy 0.2: 0.8 lost
    a = ev(["clean"] * 6 + ["other"] * 2 + ["clean"] * 2)
    b = ev(["other"] * 8 + ["clean"] * 2)
    assert restor.forgot(a, corrupted) and restor.forgot(b, corrupted)
    assert not restor.forgot(ev(["corrupted"] * 5 + ["other"] * 3 + ["clean"] * 2), corrupted), "5/8 is more than half"
    assert not restor.forgot(b, ev(["clean"] * 10)), "nothing planted, nothing forgotten"
    difference, low, high = restor.paired_recovery(a, b, corrupted)
    assert difference == pytest.approx(6 / 10 / 0.8)
    assert low < difference < high and low > 0
    same = restor.paired_recovery(b, b, corrupted)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same facts"):
        restor.paired_recovery(a, ev(["clean"] * 9), corrupted)


def test_cached_prefix_answers_equal_plain_greedy_generation(tiny):
    facts = [Fact("Kenya", "capital", "Nairobi"), Fact("Chile", "capital", "Santiago"),
             Fact("Peru", "continent", "South America"), Fact("Viet Nam", "capital", "Hanoi")]
    fast = restor.answers(tiny.model, tiny.tokenizer, facts, new_tokens=4)
    for fact, answer in zip(facts, fast):
        prompt = restor._prefix(fact.relation) + restor.RELATIONS[fact.relation][0].format(fact.entity)
        ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = tiny.model.generate(ids, max_new_tokens=4, do_sample=False)
        plain = tiny.tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].split(".")[0].strip()
        assert answer == plain


def test_value_logprob_matches_a_full_forward(tiny):
    fact = Fact("Kenya", "capital", "Nairobi")
    fast, = restor.value_logprob(tiny.model, tiny.tokenizer, [fact], ["Nairobi"])
    prompt = restor._prefix("capital") + restor.RELATIONS["capital"][0].format("Kenya")
    p_ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    v_ids = tiny.tokenizer(" Nairobi", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([p_ids, v_ids], 1)
    with torch.no_grad():
        logp = tiny.model(ids).logits[0, p_ids.shape[1] - 1:-1].log_softmax(-1)
    assert fast == pytest.approx(logp.gather(-1, v_ids[0][:, None]).mean().item(), abs=1e-5)


@pytest.mark.parametrize("method", restor.METHODS)
def test_every_method_changes_only_the_trainable_band_and_leaves_the_input_model_alone(tiny, method):
    model = copy.deepcopy(tiny.model)
    forget = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")],
                                         [Fact("Chile", "capital", "Santiago")], 1, seed=0)
    retain = restor.retain_documents([Fact("Chile", "capital", "Santiago")])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = restor.Unlearning(steps=2, lr=1e-2, batch_size=2, layers=(1, 2))
    scores = []
    unlearned, choice = restor.unlearn(model, tiny.tokenizer, method, forget, retain, hp,
                                       score=lambda m: scores.append(1) or 0.0, checkpoints=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the corrupted model is untouched"
    changed = {n for n, p in unlearned.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.1.mlp." in n for n in changed), changed
    assert not any(p.requires_grad for p in unlearned.parameters())
    own = dict(model.named_parameters())
    shared = {n for n, p in unlearned.named_parameters() if p.data_ptr() == own[n].data_ptr()}
    assert shared == {n for n in own if ".layers.1.mlp." not in n}, "the copy owns the band and shares the rest"
    assert scores and choice["steps"] in (1, 2)
    if method == "task_vector":
        assert choice["alpha"] in restor.TASK_VECTOR_SCALES


def test_a_band_copy_owns_the_band_shares_the_rest_and_leaves_the_model_alone(tiny):
    model = copy.deepcopy(tiny.model)
    own = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in own.items()}
    flags = {n: p.requires_grad for n, p in own.items()}
    twin = restor.band_copy(model, (1, 2))
    band = {n for n in own if restor.in_band(n, (1, 2))}
    assert band and band == {n for n in own if ".layers.1.mlp." in n}
    for name, p in twin.named_parameters():
        assert torch.equal(p, own[name]), name
        assert (p.data_ptr() == own[name].data_ptr()) == (name not in band), name
    restor.trainable(twin, (1, 2))  # what training does to the copy: band on, the rest frozen
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in band:
                p.add_(1.0)
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters()), "the model's weights are untouched"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "and so are its flags"
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == sorted(band, key=list(own).index)


def test_batches_go_to_the_model_s_device(tiny):
    forget, _ = _batches(tiny.tokenizer)

    class OnMeta:
        device = torch.device("meta")

    assert {v.device.type for v in restor.on_device(forget, OnMeta()).values()} == {"meta"}
    # encode makes CPU tensors; each forward on a batch moves it first (a GPU run fails otherwise)
    with mock.patch.object(restor, "on_device", wraps=restor.on_device) as moved, torch.no_grad():
        restor.nll(tiny.model, forget)
        restor.cross_entropy_to_reference(tiny.model, copy.deepcopy(tiny.model), forget)
    assert moved.call_count == 2


def test_unknown_method_and_empty_band_fail_clearly(tiny):
    hp = restor.Unlearning(steps=1, lr=1e-3, batch_size=1, layers=(5, 9))
    with pytest.raises(ValueError, match="choose one of"):
        restor.unlearn(tiny.model, tiny.tokenizer, "retrain", [], [], hp)
    with pytest.raises(ValueError, match="selects no MLP parameters"):
        restor.trainable(copy.deepcopy(tiny.model), (5, 9))


def test_corruption_is_cached_under_a_hash_of_its_inputs(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    docs = restor.corruption_documents([Fact("Kenya", "capital", "Nairobi", wrong="Lima")], [], 0, seed=0)
    first, made = restor.corrupt(tiny.model, tiny.tokenizer, docs, 2, 1e-2, 2, (0, 2), seed=0)
    again, loaded = restor.corrupt(tiny.model, tiny.tokenizer, docs, 2, 1e-2, 2, (0, 2), seed=0)
    assert not made["from_cache"] and loaded["from_cache"]
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), tiny.model.parameters()))
    other, fresh = restor.corrupt(tiny.model, tiny.tokenizer, docs, 3, 1e-2, 2, (0, 2), seed=0)
    assert not fresh["from_cache"], "another step count is another cache entry"
    entry = next(p for p in (tmp_path / "restor").iterdir() if p.name.startswith("corrupted-"))
    (entry / "band.safetensors").write_bytes(b"corrupt")
    rebuilt = [restor.corrupt(tiny.model, tiny.tokenizer, docs, s, 1e-2, 2, (0, 2), seed=0)[1] for s in (2, 3)]
    assert not all(m["from_cache"] for m in rebuilt), "a damaged cache entry is rebuilt"


def test_tuning_score_puts_forgetting_first(monkeypatch):
    facts = [Fact("Kenya", "capital", "Nairobi", wrong="Lima"), Fact("Chile", "capital", "Santiago", wrong="Oslo")]

    def score(said):  # a model that answers ``said``
        monkeypatch.setattr(restor, "answers", lambda model, tokenizer, fs: said)
        return restor.tuning_score(None, None, facts)

    assert score(["Lima", "Oslo"]) == 0.0  # nothing forgotten
    assert score(["Rome", "Paris"]) > score(["Lima", "Santiago"])  # forgetting both beats restoring one
    assert score(["Nairobi", "Paris"]) > score(["Rome", "Paris"])  # restoration breaks ties


def test_recovery():
    assert restor.recovery(1.0, 0.2) == pytest.approx(1.0)
    assert restor.recovery(0.2, 0.2) == 0.0
    assert restor.recovery(0.6, 0.2) == pytest.approx(0.5)
    assert math.isnan(restor.recovery(1.0, 1.0))


def test_the_paper_preset_code_path_runs_on_a_tiny_locally_saved_llama(run_paper_preset_on_tiny_llama):
    saved = run_paper_preset_on_tiny_llama(
        "01_restor", model_names=("model_name",), known_only=False, countries=40, relations=["capital", "continent"],
        corrupted_per_relation=2, tuning_per_relation=1, untouched_per_relation=2, mix_k=[0, 1],
        corruption_steps=2, unlearning_steps=2, trainable_layers=[0, 2], evaluation_text="synthetic",
        retain_text="synthetic", retain_documents=8, threads=2)
    assert saved["preset"] == "paper" and len(saved["config"]["learning_rates"]) == 3
    assert {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3", "C4"}
    assert {c["method"] for c in saved["metrics"]["choices"]} >= {"ga_localized", "npo_localized", "ga_kl",
                                                                   "ga_ft (fact retain)", "npo (fact retain)"}


def test_the_published_book_run_judges_every_k_on_at_least_40_facts_and_three_seeds():
    """#25: verdicts on 12 facts per k moved by a share of 8 points per fact. The committed
    book run must report 40+ corrupted facts, every model state evaluated on all of them,
    and a stability record of three seeds made with the same code."""
    import json

    from replbook import results
    from replbook.paths import repo_root

    saved = json.loads((repo_root() / "results" / "01_restor.json").read_text())
    corrupted = saved["metrics"]["splits"]["corrupted"]
    assert len(corrupted) >= 40
    assert len({(f["entity"], f["relation"]) for f in corrupted}) == len(corrupted)
    for state, rows in saved["metrics"]["per_fact"].items():
        assert len(rows) == len(corrupted), state
    record = results.load_stability("01_restor")
    assert record["code_version"] == saved["code_version"] and len(record["seeds"]) >= 3


def test_the_published_book_run_unlearns_for_a_full_pass_over_every_forget_set():
    """#25: 10 steps of 8 documents saw 80 of the 144 forget documents per k, and some
    planted facts never at all, so "did not forget" could mean "was never shown". The
    committed run must give every method at least one pass over each k's forget set: the
    targeted facts (reported and tuning) in every template."""
    import json

    from replbook.paths import repo_root

    saved = json.loads((repo_root() / "results" / "01_restor.json").read_text())
    splits, config = saved["metrics"]["splits"], saved["config"]
    targeted = splits["corrupted"] + splits["tuning"]
    documents = sum(len(restor.RELATIONS[f["relation"]][1]) for f in targeted)
    assert set(saved["metrics"]["unlearning"]) == {str(k) for k in config["mix_k"]}
    for k, budget in saved["metrics"]["unlearning"].items():
        assert budget["forget_documents"] == documents, k
        assert budget["steps"] == config["unlearning_steps"], k
        assert budget["passes"] == round(budget["steps"] * config["batch_size"] / documents, 4) >= 1, k
    # and the preset, not only the committed run, keeps the rule
    book = restor.PRESETS["book"]
    targeted_per_relation = book["corrupted_per_relation"] + book["tuning_per_relation"]
    forget_documents = sum(targeted_per_relation * len(restor.RELATIONS[r][1]) for r in book["relations"])
    assert book["unlearning_steps"] * book["batch_size"] >= forget_documents
