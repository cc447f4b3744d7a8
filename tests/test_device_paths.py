"""The paper presets' GPU paths, run without a GPU. PyTorch's meta device stands in for
the GPU: a model moved there computes every shape but holds no numbers, and a tensor
left on the CPU beside it shows as a CPU result or a device error. Copying back to the
host (``Tensor.cpu``) cannot read a meta tensor, so the fixture below hands back zeros of
its shape and dtype instead: what these tests check is *where* each tensor is, never its
values (the CPU tests and the refactor proofs check those).

What they catch, each on the meta device and not on the CPU, where every move is a no-op:
chapter 09's ``decompose`` leaving its contributions on the device or feeding the model
host pixels, ``ablated_logits`` / ``predict_from`` / ``predict`` not bringing results
back, ``fit_probe`` installing the probe on the host; ``cliplike.OpenClip`` computing on
host inputs or handing its embeddings back on the device. (Chapter 03's prompt learners
have theirs in tests/test_intcoop.py.)"""
import numpy as np
import pytest
import torch

from replbook import vitdecomp
from replbook.cliplike import OpenClip

DEVICE = "meta"


@pytest.fixture
def fake_gpu(monkeypatch):
    """``Tensor.cpu`` of a meta tensor: zeros of its shape and dtype on the host."""
    real = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        if self.device.type == DEVICE:
            return torch.zeros(self.shape, dtype=self.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)


def _inputs_seen(module: torch.nn.Module, keyword: str | None = None) -> tuple[list[str], object]:
    """The device type of each call's first tensor input to ``module`` (recorded by a hook)."""
    seen = []

    def hook(m, args, kwargs):
        seen.append((kwargs[keyword] if keyword else args[0]).device.type)

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(params=vitdecomp.ARCHITECTURES)
def vit_on_device(request):
    model = vitdecomp.build_model(request.param, image_size=24, width=32, depth=2, heads=4, seed=0, num_labels=3)
    return model.eval().to(DEVICE)


def test_decompose_feeds_the_device_and_keeps_every_batch_on_the_host(vit_on_device, fake_gpu):
    seen, hook = _inputs_seen(vit_on_device, "pixel_values")
    try:
        decomposition = vitdecomp.decompose(vit_on_device, torch.randn(5, 3, 24, 24), batch=2)
    finally:
        hook.remove()
    assert seen == [DEVICE] * 3  # batches of 2, 2 and 1, each sent to the model's device
    assert decomposition.contributions.device.type == "cpu" and decomposition.representation.device.type == "cpu"
    assert decomposition.contributions.shape == (5, 1 + 2 * (4 + 1), decomposition.representation.shape[1])


def test_the_classifier_reads_host_sums_on_the_device_and_hands_back_host_results(vit_on_device, fake_gpu):
    decomposition = vitdecomp.decompose(vit_on_device, torch.randn(4, 3, 24, 24), batch=4)
    means = decomposition.contributions.mean(0)
    seen, hook = _inputs_seen(vit_on_device.classifier)
    try:
        logits = vitdecomp.ablated_logits(vit_on_device, decomposition, [1, 2], means)
        predicted = vitdecomp.predict_from(vit_on_device, decomposition)
    finally:
        hook.remove()
    assert seen == [DEVICE, DEVICE]
    assert logits.device.type == "cpu" and logits.shape == (4, 3)
    assert isinstance(predicted, np.ndarray) and predicted.shape == (4,)


def test_predict_runs_each_batch_on_the_device(vit_on_device, fake_gpu):
    seen, hook = _inputs_seen(vit_on_device, "pixel_values")
    try:
        predicted = vitdecomp.predict(vit_on_device, torch.randn(5, 3, 24, 24), batch=3)
    finally:
        hook.remove()
    assert seen == [DEVICE] * 2 and isinstance(predicted, np.ndarray) and predicted.shape == (5,)


def test_the_probe_trains_on_the_host_and_is_installed_on_the_models_device(vit_on_device, fake_gpu):
    representation = torch.randn(6, vit_on_device.classifier.in_features)
    vitdecomp.fit_probe(vit_on_device, representation, np.array([0, 1] * 3), steps=2, lr=0.1, seed=0)
    assert {p.device.type for p in vit_on_device.classifier.parameters()} == {DEVICE}
    assert vit_on_device.classifier.out_features == 2


@pytest.fixture(scope="module")
def clip_on_device():
    return OpenClip("tiny-open-clip", preset="smoke", device=DEVICE)


def test_open_clip_computes_on_its_device_and_hands_embeddings_back_on_the_host(clip_on_device, fake_gpu):
    clip = clip_on_device
    assert clip.feature_key.endswith(f"@{DEVICE}")  # a GPU's features are cached apart from the CPU's
    # token ids must reach the embedding table on its device (on a GPU, host ids fail; on
    # the meta device they pass silently, so a hook looks at them)
    ids_seen, ids_hook = _inputs_seen(clip.net.token_embedding)
    try:
        texts = clip.embed_texts(["a photo of a red truck", "a photo of a cat"])
        tokens = clip.token_embeddings(torch.tensor(clip.word_ids("a photo of a")))
    finally:
        ids_hook.remove()
    assert ids_seen == [DEVICE, DEVICE]
    assert texts.device.type == "cpu" and texts.shape == (2, clip.dim)
    seen, hook = _inputs_seen(clip.net.visual)
    try:
        features = clip.image_features(np.zeros((3, 32, 32, 3), np.uint8), batch=2)
    finally:
        hook.remove()
    assert seen == [DEVICE] * 2 and isinstance(features, np.ndarray) and len(features) == 3
    # the prompt learner's side stays on the device (it trains there)
    assert tokens.device.type == DEVICE
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    assert clip.encode_embeddings(tokens[None], mask).device.type == DEVICE
