"""Chapter 00's helpers: what they read off each model (checked against the model's own
outputs computed here), and on the paper preset's device (``meta``: shapes only, no GPU)."""
import numpy as np
import pytest
import torch

from replbook import data, models, zoo


def test_load_times_puts_both_loads_on_the_device_it_is_given(monkeypatch):
    seen = []
    load = models.load

    def spy(name, **kwargs):
        seen.append(kwargs.get("device"))
        return load(name, **kwargs)

    monkeypatch.setattr(models, "load", spy)
    timing, loaded = zoo.load_times("tiny-llama", "smoke", "meta")
    assert seen == ["meta", "meta"] and {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert timing["params_M"] > 0 and timing["model"] == "tiny-llama"


def test_classify_computes_on_the_networks_device_and_reads_the_classes_on_the_host(monkeypatch):
    """The photo goes to the network's device (a photo left on the host never reaches the
    spy as ``meta``); the class probabilities are copied back to the host before they are
    read (a copy that meta refuses: it has no data)."""
    net = models.load("tiny-efficientnet", preset="smoke").model.eval().to("meta")
    seen = []
    forward = net.forward

    def spy(x):
        seen.append(x.device.type)
        return forward(x)

    monkeypatch.setattr(net, "forward", spy)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        zoo.classify(net, data.photo("chelsea"))
    assert seen == ["meta"]
    on_host = models.load("tiny-efficientnet", preset="smoke").model.eval()
    top = zoo.classify(on_host, data.photo("chelsea"))
    assert len(top) == 5 and all(0 <= p <= 1 for _, p in top)
    assert torch.tensor([p for _, p in top]).diff().le(0).all()  # likeliest first


# ----------------------------------------------------------------------------- what chapter 00 reads off each model


@pytest.fixture(scope="module")
def tiny_lm():
    return models.load("tiny-llama", preset="smoke")


def test_says_reads_the_start_of_a_completion_ignoring_spaces_and_case():
    assert zoo.says(" Paris, the city of light", "Paris") and zoo.says("\nparis.", "Paris")
    assert not zoo.says(" not Paris", "Paris") and not zoo.says(" Par", "Paris")


def test_the_next_token_distribution_is_the_last_positions_softmax(tiny_lm):
    top = zoo.next_token_distribution(tiny_lm, "The capital of France is", k=4)
    with torch.no_grad():
        ids = tiny_lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
        probs = tiny_lm.model(ids).logits[0, -1].float().softmax(-1)
    expected = probs.topk(4)
    assert [p for _, p in top] == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert [t for t, _ in top] == [tiny_lm.tokenizer.decode([int(i)]) for i in expected.indices]


def test_a_completion_is_the_greedy_continuation_without_the_prompt(tiny_lm):
    prompt = "The capital of France is"
    ids = tiny_lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(5):  # greedy by hand: the likeliest next token, five times
            ids = torch.cat([ids, tiny_lm.model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    n_prompt = len(tiny_lm.tokenizer(prompt).input_ids)
    expected = tiny_lm.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
    assert zoo.complete(tiny_lm, prompt, max_new_tokens=5) == expected
    assert zoo.complete(tiny_lm, prompt, max_new_tokens=5) == expected  # deterministic


def test_load_times_reads_the_cold_time_from_the_cache_when_the_first_load_was_cached(monkeypatch):
    """A first load from the cache: cold = the conversion time the cache recorded + a cached
    load. A first load that converted: cold = that load's own time."""
    from replbook.models import LoadedModel

    def fake(first_from, info):
        loads = iter([LoadedModel(None, torch.nn.Linear(2, 3), load_seconds=7.0, loaded_from=first_from, info=info),
                      LoadedModel(None, torch.nn.Linear(2, 3), load_seconds=0.5, loaded_from="cache")])
        monkeypatch.setattr(models, "load", lambda name, **kwargs: next(loads))

    fake("cache", {"convert_seconds": 60.0})
    assert zoo.load_times("m", "book")[0] == {"model": "m", "cold_s": 60.5, "cached_s": 0.5, "first_load": "cache",
                                              "params_M": 0.0}
    fake("converted now", {"convert_seconds": 60.0})
    assert zoo.load_times("m", "book")[0]["cold_s"] == 60.0
    fake("package", {})
    assert zoo.load_times("m", "book")[0]["cold_s"] == 7.0


def test_preprocess_resizes_the_short_side_crops_the_centre_and_normalises_as_tf_lite():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :100] = 255  # the left third white: outside the centre crop
    image[:, 150:, 0] = 255  # the right half red
    x = zoo.preprocess(image, size=64)
    assert x.shape == (1, 3, 64, 64)
    assert torch.allclose(x[0, :, :, 2:20], torch.tensor([-127 / 128, -127 / 128, -127 / 128])[:, None, None])
    assert torch.allclose(x[0, :, :, -20:-2], torch.tensor([1.0, -127 / 128, -127 / 128])[:, None, None])
    tall = zoo.preprocess(np.ascontiguousarray(image.transpose(1, 0, 2)), size=64)
    assert torch.allclose(tall[0], x[0].transpose(1, 2)), "rows are rows: height before width"


def test_classify_names_the_networks_likeliest_classes_in_order():
    net = models.load("tiny-efficientnet", preset="smoke").model.eval()
    photo = data.photo("coffee")
    with torch.no_grad():
        probs = net(zoo.preprocess(photo)).softmax(-1)[0]
    expected = probs.topk(3)
    names = zoo.imagenet_classes()
    top = zoo.classify(net, photo, k=3)
    assert [name for name, _ in top] == [names[int(i)] for i in expected.indices]
    assert [p for _, p in top] == pytest.approx(expected.values.tolist(), abs=1e-6)


def test_pair_similarities_are_the_cosines_of_each_pairs_two_sentences():
    vectors = {"a": [3.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 2.0], "d": [-1.0, 0.0]}

    class Encoder:
        def encode(self, sentences, convert_to_tensor, normalize_embeddings):
            out = torch.tensor([vectors[s] for s in sentences])
            return torch.nn.functional.normalize(out, dim=-1) if normalize_embeddings else out

    sims = zoo.pair_similarities(Encoder(), {"related": [("a", "b"), ("b", "c")], "unrelated": [("a", "d")]})
    assert sims == {"related": [pytest.approx(0.7071, abs=1e-4)] * 2, "unrelated": [-1.0]}
