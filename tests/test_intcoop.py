"""Chapter 03's prompt learners: the prompt is built as written, gradients reach the
context and nothing else, the attribute mixture is what it claims to be."""
import numpy as np
import pytest
import torch

from replbook import intcoop

CLASSES = ["cat", "truck", "frog"]


def test_the_initial_prompt_is_the_hand_written_one(clip_like):
    learner = intcoop.PromptLearner(clip_like, CLASSES, ["red", "green"])
    with torch.no_grad():
        assert torch.allclose(learner.features([0, 1, 2]),
                              clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES]), atol=1e-5)
        assert torch.allclose(learner.features([2], attribute=1), clip_like.embed_texts(["a photo of a green frog"]),
                              atol=1e-5)


def test_context_receives_gradients_and_the_text_encoder_stays_frozen(clip_like):
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green"])
    before = {n: p.detach().clone() for n, p in clip_like.bert.named_parameters()}
    context_before = method.prompts.context.detach().clone()
    images = torch.nn.functional.normalize(torch.randn(6, 384), dim=-1)
    data = intcoop.FewShot(images, np.array([0, 1, 2, 0, 1, 2]), np.array([0, 1, 0, 1, 0, 1]))
    loss = method.loss(images, torch.tensor([0, 1, 2, 0, 1, 2]), [0, 1, 2], torch.tensor(data.attributes))
    loss.backward()
    assert method.prompts.context.grad is not None and method.prompts.context.grad.abs().sum() > 0
    assert method.attribute_head.weight.grad is not None
    assert all(not p.requires_grad for p in clip_like.bert.parameters())
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        "prompts.context", "attribute_head.weight", "attribute_head.bias"}
    intcoop.train(method, data, [0, 1, 2], steps=2, lr=1e-2, seed=0)
    assert not torch.equal(method.prompts.context, context_before)
    assert all(torch.equal(p, before[n]) for n, p in clip_like.bert.named_parameters())


def test_a_certain_attribute_gives_that_attributes_prompt(clip_like):
    method = intcoop.IntCoOp(clip_like, CLASSES, ["red", "green"])
    with torch.no_grad():
        method.attribute_head.weight.zero_()
        method.attribute_head.bias.copy_(torch.tensor([30.0, -30.0]))  # q(x) = one-hot "red"
        images = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
        expected = method.scale * images @ method.prompts.features([0, 1, 2], attribute=0).T
        assert torch.allclose(method.logits(images, [0, 1, 2]), expected, atol=1e-4)


def test_training_learns_a_separable_toy_and_accuracy_reindexes(clip_like):
    texts = clip_like.embed_texts([f"a photo of a {c}" for c in CLASSES])
    # images near the wrong class's text: the zero-shot rule fails, training must fix it
    labels = np.array([0, 1, 2] * 4)
    images = torch.nn.functional.normalize(texts[(labels + 1) % 3] + 0.01 * torch.randn(12, texts.shape[1]), dim=-1)
    data = intcoop.FewShot(images, labels, np.zeros(12, dtype=np.int64))
    method = intcoop.CoOp(clip_like, CLASSES)
    before = intcoop.accuracy(method, data, [0, 1, 2])
    losses = intcoop.train(method, data, [0, 1, 2], steps=60, lr=2e-2, seed=0)
    assert losses[-1] < losses[0] and intcoop.accuracy(method, data, [0, 1, 2]) > before
    assert intcoop.accuracy(method, data, [2, 0]) == intcoop.accuracy(method, intcoop.FewShot(
        images[labels != 1], labels[labels != 1], data.attributes[labels != 1]), [2, 0])


def test_harmonic_mean():
    assert intcoop.harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert intcoop.harmonic_mean(0.0, 0.0) == 0.0 and intcoop.harmonic_mean(1.0, 0.0) == 0.0
