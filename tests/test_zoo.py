"""Chapter 00's helpers on the paper preset's device (``meta``: shapes only, no GPU needed)."""
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
