"""Chapter 02's method (replbook.skillslices): the corpus, answering by log-likelihood,
the rationale parser, skill clusters and slices, relevance, leave-one-out accuracy and
routing on hand-made examples with known answers."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from replbook import models, skillslices as sk
from replbook.skillslices import Annotation, Instance


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny-llama", preset="smoke")


def one_hot_embed(vocabulary: dict[str, list[float]]):
    """A toy sentence encoder: fixed vectors per string, L2-normalized."""
    def embed(texts):
        rows = np.array([vocabulary[t] for t in texts], dtype=float)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return embed


# ----------------------------------------------------------------------------- corpus


def test_corpus_has_every_task_the_answer_among_distinct_choices_and_is_deterministic():
    tasks = ["addition", "spelling backward", "syllogisms", "capitals"]
    corpus = sk.build_corpus(tasks, per_task=6, n_choices=4, seed=0)
    assert [x.uid for x in corpus] == [x.uid for x in sk.build_corpus(tasks, 6, 4, seed=0)]
    assert {x.task for x in corpus} == set(tasks) and len(corpus) == 24
    for x in corpus:
        assert len(set(c.lower() for c in x.choices)) == len(x.choices) >= 2
        assert all(isinstance(c, str) for c in x.choices)
    addition = [x for x in corpus if x.task == "addition"]
    for x in addition:  # "Calculate a + b." → the right sum is the marked choice
        a, b = (int(v) for v in x.question.removeprefix("Calculate ").rstrip(".").split(" + "))
        assert x.correct_choice == str(a + b)
    for x in (x for x in corpus if x.task == "spelling backward"):
        word = x.question.rsplit(": ", 1)[1]
        assert x.correct_choice == word[::-1] and word in x.choices, "the unreversed word is a wrong choice"
    assert {x.correct_choice for x in corpus if x.task == "syllogisms"} <= {"Yes", "No"}
    with pytest.raises(ValueError, match="choose from"):
        sk.build_corpus(["addition", "astrology"], 2, 4, 0)


def test_corpus_round_trips_through_jsonl(tmp_path):
    corpus = sk.build_corpus(["continents", "weekdays"], 3, 4, seed=1)
    sk.save_corpus(corpus, tmp_path / "c.jsonl")
    assert sk.load_corpus(tmp_path / "c.jsonl") == corpus


def test_choice_logprobs_equal_a_plain_forward_pass(tiny):
    model, tok = tiny.model, tiny.tokenizer
    corpus = [Instance("a-0", "addition", "Calculate 2 + 2.", ["4", "22", "five"], 0),
              Instance("a-1", "addition", "Calculate 10 + 1.", ["11", "3"], 0)]
    scores = sk.choice_logprobs(model, tok, corpus, batch=3)
    for x, s in zip(corpus, scores):
        for j, choice in enumerate(x.choices):
            prompt = tok(sk.ANSWER_PROMPT.format(question=x.question)).input_ids
            full = tok(sk.ANSWER_PROMPT.format(question=x.question) + " " + choice).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].log_softmax(-1)
            k = len(prompt) if full[:len(prompt)] == prompt else len(prompt) - 1
            expected = sum(float(logits[t - 1, full[t]]) for t in range(k, len(full)))
            assert s[j, 0] == pytest.approx(expected, abs=1e-4)
            assert s[j, 1] == len(choice) + 1
    assert sk.pick(np.array([[-4.0, 2.0], [-5.0, 10.0]])) == 1, "per character, the long choice wins"
    assert sk.pick(np.array([[-4.0, 2.0], [-5.0, 10.0]]), normalise=False) == 0


def test_choice_logprobs_compute_on_the_models_device(monkeypatch):
    """The paper preset's device: every batch of token ids goes where the model is
    (``meta``: shapes only, no GPU needed), and the log-probabilities are read back as host
    floats, which meta refuses (it has no data). Ids left on the host, or positions and
    targets built there, fail before that read."""
    on_meta = models.load("tiny-llama", preset="smoke", device="meta")
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    body = on_meta.model.get_decoder()
    seen = []

    def spy(input_ids, attention_mask):
        # the decoder itself reads a mask value (.item()), which meta cannot: its hidden
        # states are stood in for, on the device its inputs came on
        seen.extend(t.device.type for t in (input_ids, attention_mask))
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, on_meta.model.config.hidden_size,
                                                             device=input_ids.device))

    monkeypatch.setattr(body, "forward", spy)
    corpus = [Instance("a-0", "addition", "Calculate 2 + 2.", ["4", "22"], 0)]
    with pytest.raises(RuntimeError, match="meta tensor"):  # float(logprob): meta has no value to read
        sk.choice_logprobs(on_meta.model, on_meta.tokenizer, corpus)
    assert seen and set(seen) == {"meta"}


def test_answers_rationales_and_embeddings_load_their_models_on_the_runs_device(monkeypatch, tmp_path):
    """``auto`` is resolved (config.run_device) before any model loads, and scores made on
    one device are cached apart from another's: a GPU's sums are not the CPU's."""
    from replbook import config, paths

    loads, keys = [], []

    class Loaded:
        model = tokenizer = None
        spec = models.ModelSpec("fake", "causal-lm", "tiny", "a stand-in")

    monkeypatch.setattr(models, "load", lambda name, **kw: loads.append(kw["device"]) or Loaded())
    monkeypatch.setattr(paths, "cached_torch", lambda kind, key, build: (keys.append(key), build())[1:] + (False,))
    monkeypatch.setattr(sk, "choice_logprobs", lambda *a, **kw: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    corpus = sk.build_corpus(["addition"], 2, 2, seed=0)
    sk.answer_scores("tiny-llama", corpus, "smoke", device="auto", progress=False)
    sk.answer_scores("tiny-llama", corpus, "smoke", device="cpu", progress=False)
    sk.sentence_embedder("tiny-bert-encoder", "smoke", device="auto")
    assert loads == ["cuda", "cpu", "cuda"]
    assert keys[0] != keys[1] and keys[0].endswith("cuda") and keys[1].endswith("cpu")

    written = []
    monkeypatch.setattr(sk, "write_rationales", lambda model, *a, **kw: written.append(model) or [])
    monkeypatch.setattr(sk, "annotation_file", lambda cfg: tmp_path / "notes.json")
    cfg = config.resolve(sk.PRESETS, "smoke", task_mix="all", device="auto")
    sk.annotate(cfg, progress=False)
    assert loads[-1] == "cuda" and written


def test_rationales_are_generated_on_the_models_device(tiny, monkeypatch):
    """The prompts' token ids go to the writer's device before generating (a meta
    device stands in for a GPU: the spy sees where the ids are)."""
    seen = []

    class Elsewhere(torch.nn.Module):
        device = torch.device("meta")
        config = tiny.model.config

        def generate(self, **kwargs):
            seen.extend(t.device.type for t in kwargs.values() if isinstance(t, torch.Tensor))
            raise RuntimeError("stop after the first batch")

    corpus = [Instance("t-0", "addition", "Calculate 1 + 1.", ["2", "0"], 0)]
    with pytest.raises(RuntimeError, match="stop after"):
        sk.write_rationales(Elsewhere(), tiny.tokenizer, corpus, max_new_tokens=2, progress=False)
    assert seen and set(seen) == {"meta"}


# ----------------------------------------------------------------------------- rationales


@pytest.mark.parametrize("rationale, skills", [
    (" adding numbers): 1 + 5 = 6.\nStep 2 (skill: Checking the Answer.): ok\nAnswer: 6", ["adding numbers", "checking the answer"]),
    (" counting letters): two.\nAnswer: 2\n\nQuestion: next\nStep 1 (skill: invented): x", ["counting letters"]),
    (" reverse): a\nStep 2 (skill: reverse): b\nQuestion: q\nStep 1 (skill: other): c", ["reverse"]),
    ("Step 1 (skill: knowing  capitals ): Paris", ["knowing capitals"]),
    (" ", []),
    ("I do not know.", []),
])
def test_parse_skills(rationale, skills):
    assert sk.parse_skills(rationale) == skills


def test_rationale_prompt_ends_inside_step_one_and_shots_avoid_the_tasks_skills():
    prompt = sk.rationale_prompt("Calculate 1 + 1.")
    assert prompt.endswith("Question: Calculate 1 + 1.\nStep 1 (skill:")
    shot_skills = set(sk.parse_skills(sk.RATIONALE_SHOTS))
    assert shot_skills and not shot_skills & {d for *_, d in sk.TASKS.values()}


def test_write_rationales_returns_one_annotation_per_instance(tiny):
    corpus = [Instance(f"t-{i}", "addition", f"Calculate {i} + 1.", [str(i + 1), "0"], 0) for i in range(3)]
    out = sk.write_rationales(tiny.model, tiny.tokenizer, corpus, max_new_tokens=4, batch=2, progress=False)
    assert [a.uid for a in out] == ["t-0", "t-1", "t-2"]
    assert all(a.skills == sk.parse_skills(a.rationale) for a in out)


# ----------------------------------------------------------------------------- clusters and slices


VECTORS = {"adding numbers": [1, 0, 0], "adding two numbers": [1, 0.05, 0], "addition": [1, 0.4, 0],
           "spelling": [0, 1, 0], "reverse": [0, 0, 1]}


def test_clusters_merge_near_duplicates_only():
    clusters = sk.cluster_skills(list(VECTORS) + ["adding numbers"], one_hot_embed(VECTORS))
    c = clusters.cluster_of
    assert c["adding numbers"] == c["adding two numbers"]  # cosine 0.9988 ≥ 0.95
    assert c["addition"] != c["adding numbers"]  # cosine 0.93 < 0.95
    assert len({c["spelling"], c["reverse"], c["adding numbers"]}) == 3
    assert set(clusters.names) <= set(VECTORS) and len(clusters.names) == len(set(c.values()))


def test_slices_keep_clusters_with_enough_instances_largest_first():
    per_instance = [{0}, {0, 1}, {1}, {0}, {2}]
    found = sk.slices(per_instance, min_size=2)
    assert list(found) == [0, 1]
    assert found[0].tolist() == [0, 1, 3] and found[1].tolist() == [1, 2]


def test_relevance_points_each_instance_to_its_own_task():
    vocabulary = {sk.TASKS["addition"][3]: [1, 0, 0], sk.TASKS["capitals"][3]: [0, 1, 0],
                  "summing": [0.9, 0.1, 0], "geography": [0.1, 0.9, 0.1], "nonsense": [0, 0, 1]}
    corpus = [Instance("a", "addition", "q", ["1"], 0), Instance("b", "capitals", "q", ["1"], 0),
              Instance("c", "capitals", "q", ["1"], 0), Instance("d", "addition", "q", ["1"], 0)]
    notes = [Annotation("a", "", ["summing"]), Annotation("b", "", ["nonsense", "geography"]),
             Annotation("c", "", ["summing"]), Annotation("d", "", [])]
    assert sk.relevance(notes, corpus, one_hot_embed(vocabulary)).tolist() == [True, True, False, False]
    # the best match over all skills decides, not "any skill whose nearest task is right": a
    # capitals instance whose strongest skill reads as addition does not point to capitals
    vocabulary["places"] = [0.05, 0.3, 0.9]
    mixed = corpus + [Instance("e", "capitals", "q", ["1"], 0)]
    notes = notes + [Annotation("e", "", ["summing", "places"])]
    assert sk.relevance(notes, mixed, one_hot_embed(vocabulary)).tolist()[-1] is False


def test_relevance_takes_each_task_s_best_skill_not_its_skills_on_average():
    # a capitals instance with one skill that is capitals' own description and two that lean
    # to addition: by the best skill per task it points to capitals (1 > 0.9); averaged (or
    # summed) over its skills it would point to addition (0.6 > 0.4)
    lean = [0.9, 0.1, float(np.sqrt(1 - 0.81 - 0.01))]
    vocabulary = {sk.TASKS["addition"][3]: [1, 0, 0], sk.TASKS["capitals"][3]: [0, 1, 0],
                  "naming capitals": [0, 1, 0], "counting up": lean, "adding up": lean}
    corpus = [Instance("a", "capitals", "q", ["1"], 0)]
    notes = [Annotation("a", "", ["naming capitals", "counting up", "adding up"])]
    assert sk.relevance(notes, corpus, one_hot_embed(vocabulary), ["addition", "capitals"]).tolist() == [True]


@pytest.mark.parametrize("rounding", [-1e-7, 0.0, 1e-7])
def test_a_tie_with_another_task_is_not_relevant_whichever_way_rounding_breaks_it(rounding):
    """Skills that are two tasks' own descriptions word for word tie at cosine 1; which task
    an argmax picks then depends on the CPU's last bit, so a tie is never a hit."""
    vocabulary = {sk.TASKS["addition"][3]: [1, 0, 0], sk.TASKS["multiplication"][3]: [0, 1, 0],
                  "both": [1, 1 + rounding, 0], "mostly multiplying": [0.5, 1, 0]}
    corpus = [Instance("a", "multiplication", "q", ["1"], 0), Instance("b", "multiplication", "q", ["1"], 0),
              Instance("c", "addition", "q", ["1"], 0)]
    notes = [Annotation("a", "", ["both"]), Annotation("b", "", ["mostly multiplying"]),
             Annotation("c", "", [sk.TASKS["addition"][3], sk.TASKS["multiplication"][3]])]
    assert sk.relevance(notes, corpus, one_hot_embed(vocabulary)).tolist() == [False, True, False]


def test_the_question_only_floor_uses_the_same_nearest_description_rule():
    vocabulary = {sk.TASKS["addition"][3]: [1, 0], sk.TASKS["capitals"][3]: [0, 1],
                  "What is 2 plus 3?": [0.9, 0.1], "What is the capital of Peru?": [0.2, 0.8], "Name it.": [0.7, 0.3]}
    corpus = [Instance("a", "addition", "What is 2 plus 3?", ["5"], 0),
              Instance("b", "capitals", "What is the capital of Peru?", ["Lima"], 0),
              Instance("c", "capitals", "Name it.", ["Lima"], 0)]
    assert sk.question_relevance(corpus, one_hot_embed(vocabulary)).tolist() == [True, True, False]
    # a tie is a miss here too, whichever way rounding breaks it
    for rounding in (-1e-7, 1e-7):
        vocabulary["Which one?"] = [1, 1 + rounding]
        tied = [Instance("d", "addition", "Which one?", ["5"], 0), Instance("e", "capitals", "Which one?", ["Lima"], 0)]
        assert sk.question_relevance(tied, one_hot_embed(vocabulary)).tolist() == [False, False]


# ----------------------------------------------------------------------------- routing


def test_leave_one_out_accuracy():
    correct = np.array([1, 1, 0, 1])
    rows = np.array([0, 1, 2])
    assert sk.leave_one_out_accuracy(correct, rows, 0) == pytest.approx(1 / 2)
    assert sk.leave_one_out_accuracy(correct, rows, 2) == pytest.approx(1.0)
    assert sk.leave_one_out_accuracy(correct, rows, 3) == pytest.approx(2 / 3), "not in the slice: plain accuracy"


def test_routing_on_a_hand_made_example():
    # cluster A = instances 0–3, cluster B = 3–5; model 0 is right on 0–2, model 1 on 3–5
    correct = np.array([[1, 1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1, 0]])
    per_instance = [{0}, {0}, {0}, {0, 1}, {1}, {1}, {7}]
    chosen = sk.route(correct, per_instance, min_cluster=3, fallback=1)
    # 0–2: A's leave-one-out accuracies 2/3 vs 1/3 → model 0; 4–5: B's 0 vs 1 → model 1;
    # 3: A says 1 vs 0 (weight 1/4), B says 0 vs 1 (weight 1/3) → model 1 (0.43 vs 0.57);
    # 6: its only cluster is too small → the fallback
    assert chosen.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert sk.route(correct, per_instance, min_cluster=5, fallback=0).tolist() == [0] * 7


def test_routing_leaves_the_routed_instance_out_of_its_slices():
    # one cluster {0, 1, 2}; with instance 0 left out, model 1 is right on both others and model 0
    # on one, so model 1 answers it; counting instance 0 itself would tie them at 2/3, and the
    # tie (2/3 each on the other instances too) would go to model 0
    correct = np.array([[1, 1, 0, 1], [0, 1, 1, 0]])
    chosen = sk.route(correct, [{0}, {0}, {0}, set()], min_cluster=3, fallback=0)
    assert chosen[0] == 1


@pytest.mark.parametrize("better", [0, 1])
def test_routing_ties_go_to_the_model_better_on_the_other_instances(better):
    # both models are right on the same share of the one cluster {0, 1, 2, 3}; outside it, model
    # ``better`` is right more often, so it takes every tied instance
    cluster = np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
    outside = np.array([[1, 1, 1], [0, 0, 0]]) if better == 0 else np.array([[0, 0, 0], [1, 1, 1]])
    correct = np.concatenate([np.array([[1, 1, 0, 0], [1, 1, 0, 0]]), outside], axis=1)
    per_instance = [{0}] * 4 + [set()] * 3
    chosen = sk.route(correct, per_instance, min_cluster=4, fallback=better)
    assert chosen[:4].tolist() == [better] * 4
    assert cluster.sum(1).tolist() == [2, 2]


# ----------------------------------------------------------------------------- C2's premise: the task mix


def answers(per_task: dict[str, tuple[list[int], list[int]]]):
    """(correct, task_of) from each task's answers of model 0 and model 1."""
    correct = np.concatenate([np.array(pair) for pair in per_task.values()], axis=1)
    task_of = [t for t, (a, _) in per_task.items() for _ in a]
    return correct, task_of


def test_the_balanced_mix_is_the_largest_set_within_the_tolerance_not_the_closest():
    # all three tasks: gap (4 - 3) / 30 = 0.033, within 0.05; {x, y}: gap 0 but smaller
    correct, task_of = answers({"x": ([1] * 5 + [0] * 5, [0] * 5 + [1] * 5),
                                "y": ([1] * 5 + [0] * 5, [1] * 5 + [0] * 5),
                                "z": ([1] * 4 + [0] * 6, [1] * 3 + [0] * 7)})
    assert sk.balanced_mix(correct, task_of, tolerance=0.05, min_tasks=2) == ["x", "y", "z"]
    # at a tighter tolerance only the pairs qualify; among them the smallest gap: {x, y} (0)
    assert sk.balanced_mix(correct, task_of, tolerance=0.02, min_tasks=2) == ["x", "y"]
    # a gap exactly at the tolerance is within it (exact fractions: 1/30 is not rounded away)
    assert sk.balanced_mix(correct, task_of, tolerance=1 / 30, min_tasks=2) == ["x", "y", "z"]


def test_the_balanced_mix_weighs_tasks_by_their_instances_and_respects_min_tasks():
    # a: model 0 ahead by 2 of 2 instances (gap +1.0 per task); b: behind by 2 of 20 (−0.1).
    # Over instances {a, b} is balanced (0 / 22); a mean of per-task gaps (+0.45) is not
    correct, task_of = answers({"a": ([1, 1], [0, 0]),
                                "b": ([0] * 2 + [1] * 18, [1] * 20),
                                "c": ([1] * 5 + [0] * 5, [0] * 10)})
    # (per-task means would make {b, c} the closest pair: (−0.1 + 0.5) / 2 = 0.2 < 0.45)
    assert sk.balanced_mix(correct, task_of, tolerance=0.0, min_tasks=2) == ["a", "b"]
    # no set of 3 is within the tolerance, so min_tasks=3 falls back to the smallest gap of size 3
    assert sk.balanced_mix(correct, task_of, tolerance=0.0, min_tasks=3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="min_tasks=4"):
        sk.balanced_mix(correct, task_of, tolerance=0.0, min_tasks=4)


def test_when_no_mix_is_within_the_tolerance_the_smallest_gap_then_the_largest_set_wins():
    # every task and every union of them: model 0 ahead by 2 of 10 (gap 0.2 > tolerance), so
    # the gaps tie and the fallback must take the largest set, as the docstring says
    correct, task_of = answers({t: ([1] * 2 + [0] * 8, [0] * 10) for t in ("x", "y", "z")})
    assert sk.balanced_mix(correct, task_of, tolerance=0.1, min_tasks=1) == ["x", "y", "z"]
    # a strictly smaller gap still beats a larger set
    correct, task_of = answers({"x": ([1] * 2 + [0] * 8, [0] * 10), "y": ([1] * 2 + [0] * 8, [0] * 10),
                                "z": ([1] + [0] * 9, [0] * 10)})
    assert sk.balanced_mix(correct, task_of, tolerance=0.05, min_tasks=1) == ["z"]


def test_the_balanced_mix_uses_the_absolute_gap():
    # {p, q, r}: model 1 ahead by 0.3 — a signed comparison would take it as "within 0.1";
    # {p, r}: model 0 ahead by exactly 0.05
    correct, task_of = answers({"p": ([1] * 10, [1] * 10),
                                "q": ([0] * 10, [1] * 10),
                                "r": ([1] + [0] * 9, [0] * 10)})
    assert sk.balanced_mix(correct, task_of, tolerance=0.1, min_tasks=2) == ["p", "r"]
    assert sk.balanced_mix(correct, task_of, tolerance=0.5, min_tasks=2) == ["p", "q", "r"]


def test_choose_tasks_decides_on_a_design_corpus_of_another_seed(monkeypatch):
    """The evaluation corpus's own answers must not choose its mix: the models are asked a
    corpus drawn with the design seed, and the chosen tasks are then drawn with the run's."""
    from replbook import config

    cfg = config.resolve(sk.PRESETS, "smoke", seed=3, models=["tiny-llama", "gemma3-270m"], device="auto")
    asked = []

    def fake_scores(model_name, corpus, preset, device="cpu", **_):
        assert device == cfg.device, "the design corpus is answered on the run's device"
        asked.append([x.question for x in corpus])
        # model 0 right on everything, model 1 only on capitals: the balanced mix must leave
        # out the tasks where they differ … unless min_tasks forces them in
        scores = [np.array([[0.0, 1.0]] * len(x.choices)) for x in corpus]
        for row, x in zip(scores, corpus):
            right = model_name == cfg.models[0] or x.task == "capitals"
            row[x.answer if right else (x.answer + 1) % len(x.choices), 0] = 1.0
        return scores, True

    monkeypatch.setattr(sk, "answer_scores", fake_scores)
    mix = sk.choose_tasks(cfg, progress=False)
    evaluation = sk.chapter_corpus(cfg, mix)
    assert mix.design_seed == 3 + sk.DESIGN_SEED_OFFSET and mix.rule == "balanced"
    assert len(asked) == 2 and asked[0] == asked[1]
    design_questions = set(asked[0])
    assert {x.question for x in evaluation if x.task != "capitals"}.isdisjoint(design_questions)
    # no pair is within the tolerance (every other task has gap 1), so the smallest gap of
    # min_tasks = 2 (the smoke preset's): capitals with the first other candidate
    assert mix.tasks == ["addition", "capitals"] and mix.design_gap == 0.5
    assert mix.design_accuracy["capitals"] == [1.0, 1.0]
    assert {x.task for x in evaluation} == set(mix.tasks)
    # "all" asks every candidate and scores nothing
    asked.clear()
    assert sk.choose_tasks(config.resolve(sk.PRESETS, "smoke", task_mix="all"), progress=False).tasks == list(cfg.tasks)
    assert not asked


def test_relevance_competes_with_every_candidate_task_not_only_the_asked_ones():
    # the skill is nearer "multiplication" than "addition": relevant among {addition} alone,
    # not when multiplication (a candidate left out of the mix) competes
    vocabulary = {sk.TASKS["addition"][3]: [1, 0, 0], sk.TASKS["multiplication"][3]: [0, 1, 0],
                  "combining numbers": [0.5, 0.9, 0.1]}
    embed = one_hot_embed(vocabulary)
    instance = Instance("addition-0", "addition", "1 + 2 = ?", ["3", "4"], 0)
    note = Annotation("addition-0", "", ["combining numbers"])
    assert sk.relevance([note], [instance], embed).tolist() == [True]
    assert sk.relevance([note], [instance], embed, ["addition", "multiplication"]).tolist() == [False]


# ----------------------------------------------------------------------------- committed annotations


def test_annotations_round_trip_and_refuse_another_corpus(tmp_path, monkeypatch):
    from replbook import config

    monkeypatch.setattr(sk, "annotation_file", lambda cfg: tmp_path / f"{cfg.preset}.json")
    cfg = config.resolve(sk.PRESETS, "smoke")
    sk.annotate(cfg, progress=False)
    corpus = sk.build_corpus(cfg.tasks, cfg.per_task, cfg.n_choices, cfg.seed)
    notes, provenance = sk.load_annotations(cfg, corpus)
    assert [a.uid for a in notes] == [x.uid for x in corpus]
    assert provenance["rationale_model"] == "tiny-llama" and provenance["date"] and "{question}" in provenance["prompt"]
    with pytest.raises(ValueError, match="replbook annotate --preset smoke"):
        sk.load_annotations(config.resolve(sk.PRESETS, "smoke", per_task=3), corpus[:9])
    with pytest.raises(FileNotFoundError, match="replbook annotate --preset book"):
        sk.load_annotations(config.resolve(sk.PRESETS, "book"), corpus)

    # issue #23: a rationale damaged on disk changes the skills parsed from it; it is refused
    saved = json.loads((tmp_path / "smoke.json").read_text())
    saved["annotations"][0]["rationale"] += " Step 9 (skill: a skill nobody wrote):"
    (tmp_path / "smoke.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="do not match their sha256.*replbook annotate --preset smoke"):
        sk.load_annotations(cfg, corpus)


def test_the_committed_annotations_match_their_checksum():
    saved = json.loads((sk.ANNOTATIONS_DIR / "02_skill_slices.book.json").read_text())
    assert saved["annotations_sha256"] == sk.annotations_checksum(saved["annotations"])
    assert sk.annotations_checksum(saved["annotations"][1:]) != saved["annotations_sha256"]


def test_hidden_tradeoffs_find_reversed_and_large_gaps():
    # model a is ahead overall by 0.05; b is ahead on slice 1 on every instance
    correct = np.array([[1] * 10 + [0] * 10 + [1, 0] * 5, [0] * 10 + [1] * 10 + [1, 0] * 5])
    members = {0: np.arange(0, 10), 1: np.arange(10, 20), 2: np.arange(20, 30)}
    gaps = {g["cluster"]: g for g in sk.slice_gaps(correct, members)}
    assert gaps[0]["gap"] == 1.0 and gaps[1]["gap"] == -1.0 and gaps[2]["gap"] == 0.0
    found = sk.hidden_tradeoffs(list(gaps.values()), aggregate_gap=0.05)
    assert [g["cluster"] for g in found["reversed"]] == [1]
    assert sorted(g["cluster"] for g in found["large"]) == [0, 1]
    assert 2 not in [g["cluster"] for g in found["significant"]]
    # with no overall leader nothing is "reversed"; "large" still needs the floor of 0.10
    level = sk.hidden_tradeoffs(list(gaps.values()), aggregate_gap=0.0)
    assert level["reversed"] == [] and sorted(g["cluster"] for g in level["large"]) == [0, 1]
    small = {"cluster": 5, "instances": 400, "gap": 0.05, "low": 0.01, "high": 0.09}
    assert sk.hidden_tradeoffs([small], aggregate_gap=0.0)["large"] == [], "0.05 is under the floor"
    middle = dict(small, gap=0.12, low=0.05, high=0.19)
    assert sk.hidden_tradeoffs([middle], aggregate_gap=0.01)["large"] == [middle], "0.12 ≥ max(3 × 0.01, 0.10)"
    assert sk.hidden_tradeoffs([middle], aggregate_gap=0.05)["large"] == [], "0.12 < 3 × 0.05"


def test_paper_preset_runs_on_tiny_models(tmp_path, results_tmp):
    """The paper preset's code path (rationales regenerated, hub models replaced by the
    tiny random ones) end to end on a tiny corpus."""
    import json

    import papermill

    from replbook.paths import repo_root

    notebook = repo_root() / "notebooks" / "02_skill_slices.ipynb"
    small = {"tasks": ["addition", "capitals", "syllogisms"], "min_tasks": 2, "per_task": 3,
             "models": ["tiny-llama", "tiny-llama"],
             "rationale_model": "tiny-llama", "rationale_tokens": 6, "sentence_model": "tiny-bert-encoder",
             "min_slice": 1, "route_min_cluster": 2}
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               cwd=str(notebook.parent), progress_bar=False, parameters={"preset": "paper", **small})
    saved = json.loads((results_tmp / "02_skill_slices.json").read_text())
    assert saved["preset"] == "paper" and saved["config"]["rationales"] == "regenerate"
    assert [v["claim"] for v in saved["verdicts"]] == ["C1", "C2", "C3"]
