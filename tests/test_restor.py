"""Chapter 01's method (replbook.restor): facts, the outcome classifier, documents, the
unlearning losses, and the probing and training loops on the tiny random Llama."""
import copy
import math

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


def test_ga_is_the_negative_of_the_fine_tuning_loss(tiny):
    batch = restor.encode(tiny.tokenizer, restor.retain_documents([Fact("Chile", "capital", "Santiago")]))
    with torch.no_grad():
        assert restor.ga_loss(tiny.model, batch) == pytest.approx(-restor.nll(tiny.model, batch).item())
        assert restor.nll(tiny.model, batch) == pytest.approx(tiny.model(**batch).loss.item(), rel=1e-5)


def test_npo_loss_at_the_reference_is_two_over_beta_log_two(tiny):
    batch = restor.encode(tiny.tokenizer, restor.retain_documents(
        [Fact("Chile", "capital", "Santiago"), Fact("Peru", "continent", "South America")]))
    for beta in (0.1, 1.0):
        with torch.no_grad():
            loss = restor.npo_loss(tiny.model, tiny.model, batch, beta)
        assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_kl_to_itself_is_zero_and_positive_to_another_model(tiny):
    batch = restor.encode(tiny.tokenizer, restor.retain_documents([Fact("Chile", "capital", "Santiago")]))
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert restor.kl_to_reference(tiny.model, tiny.model, batch).item() == pytest.approx(0.0, abs=1e-6)
        assert restor.kl_to_reference(tiny.model, other, batch).item() > 0


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
    assert scores and choice["steps"] in (1, 2)
    if method == "task_vector":
        assert choice["alpha"] in restor.TASK_VECTOR_SCALES


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
        corruption_steps=2, unlearning_steps=2, trainable_layers=[0, 2], evaluation_text="synthetic", threads=2)
    assert saved["preset"] == "paper" and len(saved["config"]["learning_rates"]) == 3
    assert {v["claim"] for v in saved["verdicts"]} == {"C1", "C2", "C3", "C4"}
    assert {c["method"] for c in saved["metrics"]["choices"]} >= {"ga_localized", "npo_localized"}
