"""Chapter 06, first step: causal tracing, ROME-style rank-one editing and the LLaVA-style
wrapper of replbook.mllmtrace, on the registry's tiny random Llama."""
import numpy as np
import pytest
import torch

from replbook import mllmtrace


@pytest.fixture
def prompt(tiny_llama):
    """Two prompts' input embeddings, a 3-token constraint in each, and answer tokens."""
    model, tok = tiny_llama.model.eval(), tiny_llama.tokenizer
    ids = tok(["The flag of Spain is", "The flag of Japan is"], return_tensors="pt").input_ids
    embeds = model.get_input_embeddings()(ids).detach()
    positions = torch.zeros(ids.shape, dtype=torch.bool)
    positions[:, 4:7] = True
    answers = torch.tensor([65, 66])
    return model, embeds, positions, answers


@pytest.mark.parametrize("kind", ["layer", "mlp", "attn"])
def test_restoring_nothing_gives_the_corrupted_run(prompt, kind):
    model, embeds, positions, answers = prompt
    corrupted = mllmtrace.noise_corrupt(embeds, positions, 3 * float(embeds.std()), seed=0)
    clean_outputs = mllmtrace.record(model, embeds, kind)
    none = mllmtrace.restored_probability(model, corrupted, clean_outputs, kind, [], positions, answers)
    assert torch.equal(none, mllmtrace.answer_probability(model, corrupted, answers))


def test_restoring_every_layer_at_every_corrupted_position_gives_the_clean_run(prompt):
    model, embeds, positions, answers = prompt
    corrupted = mllmtrace.noise_corrupt(embeds, positions, 3 * float(embeds.std()), seed=0)
    clean = mllmtrace.answer_probability(model, embeds, answers)
    assert not torch.allclose(clean, mllmtrace.answer_probability(model, corrupted, answers))
    n = len(mllmtrace.layers(model))
    clean_outputs = mllmtrace.record(model, embeds, "layer")
    every = mllmtrace.restored_probability(model, corrupted, clean_outputs, "layer", list(range(n)), positions, answers)
    assert torch.allclose(every, clean, atol=1e-6, rtol=0)
    # layer 0's traced state is the input embeddings: restoring it alone undoes the corruption
    first = mllmtrace.restored_probability(model, corrupted, clean_outputs, "layer", [0], positions, answers)
    assert torch.allclose(first, clean, atol=1e-6, rtol=0)
    # restoring the last layer's input only at the corrupted positions does not
    last = mllmtrace.restored_probability(model, corrupted, clean_outputs, "layer", [n - 1], positions, answers)
    assert not torch.allclose(last, clean, atol=1e-6, rtol=0)


def test_causal_trace_shapes_and_windows(prompt):
    model, embeds, positions, answers = prompt
    corrupted = mllmtrace.noise_corrupt(embeds, positions, 3 * float(embeds.std()), seed=1)
    trace = mllmtrace.causal_trace(model, embeds, corrupted, positions, answers, kind="mlp", size=1)
    n = len(mllmtrace.layers(model))
    assert trace.restored.shape == (n, 2) and trace.clean.shape == trace.corrupted.shape == (2,)
    assert trace.effect.shape == (n,)
    assert mllmtrace.window(1, 5, n) == [1] and mllmtrace.window(0, 5, 30) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"kind='ffn': choose from \('layer', 'mlp', 'attn'\)"):
        mllmtrace.record(model, embeds, "ffn")


def test_replace_corrupt_takes_the_other_input_only_at_the_positions():
    a, b = torch.zeros(2, 5, 3), torch.ones(2, 5, 3)
    positions = torch.zeros(2, 5, dtype=torch.bool)
    positions[:, 1:3] = True
    out = mllmtrace.replace_corrupt(a, b, positions)
    assert out[:, 1:3].eq(1).all() and out[:, [0, 3, 4]].eq(0).all()


def test_rank_one_update_meets_its_constraint_and_spares_c_orthogonal_keys():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    keys = torch.randn(200, 16)
    c = mllmtrace.key_covariance(keys)
    k, v = torch.randn(16), torch.randn(8)
    w2 = mllmtrace.rank_one_update(w, k, v, c)
    assert torch.allclose(w2 @ k, v, atol=1e-4)
    assert torch.linalg.matrix_rank(w2 - w) == 1
    # a key x with xᵀ C⁻¹ k = 0 is mapped as before
    c_inv_k = torch.linalg.solve(c, k)
    x = torch.randn(16)
    x = x - (x @ c_inv_k) / (c_inv_k @ c_inv_k) * c_inv_k
    assert torch.allclose(w2 @ x, w @ x, atol=1e-4)


def test_edit_makes_the_model_give_the_new_answer_and_undo_restores_it(prompt):
    model, embeds, positions, _ = prompt
    embeds = embeds[:1]
    # the edited position is the last token: in this tiny random model only there does one
    # MLP output move the next-token distribution much
    end = embeds.shape[1] - 1
    layer, last, target = 0, torch.tensor([end]), torch.tensor([90])
    before = mllmtrace.answer_probability(model, embeds, target)
    value = mllmtrace.optimize_value(model, layer, embeds, last, target, steps=60, lr=0.5)
    key = mllmtrace.projection_inputs(model, layer, embeds)[0, end]
    background = mllmtrace.projection_inputs(model, layer, torch.randn(4, 12, embeds.shape[-1]) * embeds.std())
    original = mllmtrace.edit_mlp(model, layer, key, value, mllmtrace.key_covariance(background.flatten(0, 1)))
    try:
        # the edited MLP maps the key to the value, so the model now gives the new answer
        assert torch.allclose(mllmtrace.record(model, embeds, "mlp")[layer][0, end], value, atol=1e-4)
        after = mllmtrace.answer_probability(model, embeds, target)
        assert after > 2 * before
    finally:
        mllmtrace.undo_edit(model, layer, original)
    assert torch.equal(mllmtrace.answer_probability(model, embeds, target), before)


def test_mini_llava_places_the_visual_tokens(tiny_llama):
    torch.manual_seed(0)
    wrapper = mllmtrace.MiniLlava(tiny_llama.model, tiny_llama.tokenizer, vision_dim=12)
    visual = torch.randn(3, 4, 12)
    embeds, positions = wrapper.embed(visual, "Flag: ", " Capital:")
    head = len(tiny_llama.tokenizer("Flag: ", add_special_tokens=False).input_ids)
    assert embeds.shape[:2] == positions.shape and positions.sum(1).tolist() == [4, 4, 4]
    assert positions[0, head:head + 4].all() and not positions[0, :head].any()
    assert torch.allclose(embeds[:, head:head + 4], wrapper.projector(visual))
    assert not any(p.requires_grad for p in wrapper.lm.parameters())
    assert all(p.requires_grad for p in wrapper.projector.parameters())
    logits = wrapper.lm(inputs_embeds=embeds).logits
    assert logits.shape[:2] == embeds.shape[:2] and np.isfinite(logits.detach().numpy()).all()
