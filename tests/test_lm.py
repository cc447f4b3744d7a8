"""replbook.lm, the evaluation chapters 04 and 08 share: the token windows a perplexity is
taken over, and the perplexity itself, checked on a tokenizer and a model whose answers
are known in closed form."""
import math

import pytest
import torch

from replbook import lm


class Letters:
    """Token id = position of the letter in the alphabet + 2; BOS is 1 when it has one."""

    def __init__(self, bos: int | None = 1):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) - ord("a") + 2 for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return type("Encoding", (), {"input_ids": torch.tensor([ids])})()


TEXT = "".join(chr(ord("a") + i % 26) for i in range(2000))


def test_windows_are_consecutive_and_start_at_the_offset():
    windows = lm.token_windows(Letters(bos=None), TEXT, 10, 4, offset_chars=3)
    expected = Letters(bos=None)(TEXT[3:43]).input_ids[0]
    assert torch.equal(torch.cat(windows), expected) and [len(w) for w in windows] == [10] * 4


def test_windows_that_start_with_bos_continue_the_text_without_a_gap():
    windows = lm.token_windows(Letters(), TEXT, 10, 3, start_with_bos=True)
    assert all(len(w) == 10 and w[0] == 1 for w in windows)
    assert torch.equal(torch.cat([w[1:] for w in windows]), Letters(bos=None)(TEXT[:27]).input_ids[0])
    with pytest.raises(ValueError, match="no BOS token"):
        lm.token_windows(Letters(bos=None), TEXT, 10, 3, start_with_bos=True)
    with pytest.raises(ValueError, match="text too short: 9 tokens for 3 windows of 10"):
        lm.token_windows(Letters(), TEXT[:9], 10, 3, start_with_bos=True)


class FixedGuess(torch.nn.Module):
    """A 'language model' that predicts the same next-token distribution everywhere."""

    def __init__(self, probabilities: torch.Tensor):
        super().__init__()
        self.log_probabilities = probabilities.log()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    @property
    def device(self):
        return self.anchor.device

    def forward(self, ids):
        logits = self.log_probabilities.expand(*ids.shape, -1)
        return type("Output", (), {"logits": logits})()


def test_perplexity_is_exp_of_the_mean_next_token_loss_over_every_window():
    probabilities = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.6])
    model = FixedGuess(probabilities)
    windows = [torch.tensor([0, 2, 3, 4]), torch.tensor([1, 4, 4])]  # the targets: 2 3 4 | 4 4
    targets = [2, 3, 4, 4, 4]
    expected = math.exp(-sum(math.log(probabilities[t]) for t in targets) / len(targets))
    assert lm.perplexity(model, windows) == pytest.approx(expected, rel=1e-6)
