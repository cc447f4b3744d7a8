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


def test_the_answer_probability_is_read_at_the_last_position(prompt):
    # the answer is the next token after the whole prompt: the last position's distribution
    model, embeds, positions, answers = prompt
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits
    expected = logits[:, -1].float().softmax(-1)[torch.arange(len(answers)), answers]
    assert torch.allclose(mllmtrace.answer_probability(model, embeds, answers), expected)
    earlier = logits[:, -2].float().softmax(-1)[torch.arange(len(answers)), answers]
    assert not torch.allclose(expected, earlier), "the two positions must differ for this to test anything"


def test_the_key_covariance_is_the_second_moment_plus_a_ridge_relative_to_its_own_scale():
    # ROME's C = E[k kᵀ]; the ridge is a share of its mean diagonal, so it means the same for
    # keys of any magnitude (an absolute ridge would vanish for large keys, swamp small ones)
    keys = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) * 40
    second = keys.double().T @ keys.double() / len(keys)
    expected = second + 0.01 * second.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(mllmtrace.key_covariance(keys, ridge=0.01), expected.float())


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


def rome_rank_one(w, k, v, c):
    """ROME's eq. 2 written out in float64, the reference for one key:
    W' = W + (v − W k)(C⁻¹k)ᵀ / (kᵀ C⁻¹ k)."""
    w, k, v, c = w.double(), k.double(), v.double(), c.double()
    c_inv_k = torch.linalg.solve(c, k)
    return w + torch.outer(v - w @ k, c_inv_k) / (k @ c_inv_k)


def test_one_key_edit_is_romes_rank_one_update_and_spares_c_orthogonal_keys(tiny_llama):
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    c = mllmtrace.key_covariance(torch.randn(200, 16))
    k, v = torch.randn(16), torch.randn(8)
    w2 = mllmtrace.batched_update(w, k[None], v[None], c)
    assert torch.allclose(w2.double(), rome_rank_one(w, k, v, c), atol=1e-5)
    assert torch.allclose(w2 @ k, v, atol=1e-4)
    assert torch.linalg.matrix_rank(w2 - w) == 1
    # a key x with xᵀ C⁻¹ k = 0 is mapped as before
    c_inv_k = torch.linalg.solve(c, k)
    x = torch.randn(16)
    x = x - (x @ c_inv_k) / (c_inv_k @ c_inv_k) * c_inv_k
    assert torch.allclose(w2 @ x, w @ x, atol=1e-4)
    # edit_mlp takes one key as a vector and writes the same update (a bias is subtracted first)
    model = tiny_llama.model
    proj = mllmtrace.output_projection(mllmtrace.layers(model)[0])
    k, v = torch.randn(proj.in_features), torch.randn(proj.out_features)
    c = mllmtrace.key_covariance(torch.randn(400, proj.in_features))
    expected = rome_rank_one(proj.weight.detach(), k, v, c)
    original = mllmtrace.edit_mlp(model, 0, k, v, c)
    try:
        assert torch.allclose(proj.weight.double(), expected, atol=1e-4)
    finally:
        mllmtrace.undo_edit(model, 0, original)
    assert torch.equal(proj.weight, original)


def test_batched_update_meets_every_constraint_equals_rome_for_one_key_and_spares_c_orthogonal_keys():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    c = mllmtrace.key_covariance(torch.randn(200, 16))
    keys, values = torch.randn(5, 16), torch.randn(5, 8)
    w2 = mllmtrace.batched_update(w, keys, values, c)
    # all five facts hold at once (editing them one after another would keep only the last)
    assert torch.allclose(keys @ w2.T, values, atol=1e-4)
    assert torch.linalg.matrix_rank(w2 - w) == 5
    assert torch.allclose(mllmtrace.batched_update(w, keys[:1], values[:1], c).double(),
                          rome_rank_one(w, keys[0], values[0], c), atol=1e-5)
    # a key x with xᵀ C⁻¹ K = 0 is mapped as before
    c_inv_k = torch.linalg.solve(c, keys.T)  # (16, 5)
    x = torch.randn(16)
    x = x - c_inv_k @ torch.linalg.lstsq(c_inv_k, x[:, None]).solution[:, 0]
    assert torch.allclose(w2 @ x, w @ x, atol=1e-4)
    # and it is the smallest such change in the C-weighted norm: another change meeting the
    # constraints (plus anything that maps every key to 0) is larger
    other = w2 + torch.randn(8, 16) @ (torch.eye(16) - keys.T @ torch.linalg.pinv(keys.T))
    assert torch.allclose(keys @ other.T, values, atol=1e-3)
    norm = lambda d: torch.trace(d @ c @ d.T)
    assert norm(w2 - w) < norm(other - w)


def test_a_last_layer_edit_acts_only_at_the_final_position(prompt):
    """C3's comparator: in a causal decoder nothing reads the last layer's output at an
    earlier position, so an edit there cannot move the answer; at the final position it can."""
    model, embeds, positions, _ = prompt
    last_layer = len(mllmtrace.layers(model)) - 1
    mlp = mllmtrace.layers(model)[last_layer].mlp
    before = model(inputs_embeds=embeds).logits[:, -1].detach()

    def shifted_at(position):
        def hook(_m, _i, output):
            out = output.clone()
            out[:, position] += 10.0
            return out
        handle = mlp.register_forward_hook(hook)
        try:
            return model(inputs_embeds=embeds).logits[:, -1].detach()
        finally:
            handle.remove()

    last_visual = mllmtrace.edit_positions(positions, "constraint")
    assert last_visual.tolist() == [6, 6]
    assert torch.equal(shifted_at(6), before)
    final = mllmtrace.edit_positions(positions, "final")
    assert final.tolist() == [embeds.shape[1] - 1] * 2
    assert not torch.allclose(shifted_at(embeds.shape[1] - 1), before)
    arms = mllmtrace.edit_arms([0, 1], early_layer=0)
    assert ("rank-one", 1, "final") in arms and ("fine-tune", 0, "constraint") in arms
    assert [a for a in arms if a[0] == "rank-one" and a[2] == "constraint"] == [("rank-one", 0, "constraint"),
                                                                                 ("rank-one", 1, "constraint")]
    with pytest.raises(ValueError, match="site='first'"):
        mllmtrace.edit_positions(positions, "first")


def test_multedit_reads_keys_at_the_last_visual_token_and_inserts_every_fact_in_one_update(tiny_llama):
    from replbook import config

    cfg = config.resolve(mllmtrace.PRESETS, "smoke", value_steps=5)
    model = tiny_llama.model.eval()
    wrapper = mllmtrace.MiniLlava(model, tiny_llama.tokenizer, 8)
    vlm = mllmtrace.VisionLanguageModel(wrapper, None, True, "")
    template = ("The capital of", " is")
    generator = torch.Generator().manual_seed(0)
    cases = [mllmtrace.EditCase(i, 90 + i, f, f) for i, f in enumerate(torch.randn(3, 1, 4, 8, generator=generator))]
    embeds, _ = wrapper.embed(torch.cat([c.edit_features for c in cases]), *template)
    head = len(tiny_llama.tokenizer(template[0], add_special_tokens=False).input_ids)
    layer = 1
    inputs = mllmtrace.projection_inputs(model, layer, embeds.detach())
    keys, values = mllmtrace.edit_keys_and_values(vlm, cases, layer, cfg, template)
    # the key is the projection input at the *last* of the 4 visual tokens, not the first
    assert torch.allclose(keys, inputs[:, head + 3], atol=1e-6)
    assert not torch.allclose(keys, inputs[:, head], atol=1e-3)
    final_keys, _ = mllmtrace.edit_keys_and_values(vlm, cases, layer, cfg, template, site="final")
    assert torch.allclose(final_keys, inputs[:, -1], atol=1e-6)
    weight = mllmtrace.output_projection(mllmtrace.layers(model)[layer]).weight.detach().clone()
    c = mllmtrace.key_covariance(torch.randn(400, weight.shape[1], generator=torch.Generator().manual_seed(1)))
    original = mllmtrace.rank_one_edit(vlm, cases, layer, c, cfg, template=template)
    try:
        # one update holds every case's fact: each key now gives its own value
        outputs = mllmtrace.record(model, embeds.detach(), "mlp")[layer][:, head + 3]
        assert torch.allclose(outputs, values, atol=1e-3)
    finally:
        mllmtrace.undo_edit(model, layer, original)
    # the same with values far from what the MLP gives now (the optimized ones move little
    # in 5 steps): facts applied one after another, or only the last, would fail here
    far = values + 3 * torch.randn(values.shape, generator=generator)
    original = mllmtrace.edit_mlp(model, layer, keys, far, c)
    try:
        outputs = mllmtrace.record(model, embeds.detach(), "mlp")[layer][:, head + 3]
        assert torch.allclose(outputs, far, atol=1e-3)
    finally:
        mllmtrace.undo_edit(model, layer, original)
    assert torch.equal(mllmtrace.output_projection(mllmtrace.layers(model)[layer]).weight, weight)


def test_mid_edit_layer_is_the_middle_one_neither_early_nor_last():
    assert mllmtrace.mid_edit_layer([0, 5, 15, 29], 30, early=0) == 15
    assert mllmtrace.mid_edit_layer([0, 5, 15, 29], 30, early=15) == 5
    assert mllmtrace.mid_edit_layer([0, 1], 2, early=0) is None


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


# ----------------------------------------------------------------------------- the chapter's experiment


def test_flag_views_are_seeded_and_unaugmented_without_a_generator():
    flag = np.zeros((20, 30, 3), np.uint8)
    flag[:, :15, 0] = 255
    a = mllmtrace.flag_views(flag, 3, 32, np.random.default_rng(1))
    b = mllmtrace.flag_views(flag, 3, 32, np.random.default_rng(1))
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    plain = mllmtrace.flag_views(flag, 2, 32, None)
    assert np.array_equal(plain[0], plain[1])
    assert (plain[0, 0] == 255).all()  # padded square on white: the top row is margin


def test_name_prompts_mark_exactly_the_name_tokens(tiny_llama):
    countries = [mllmtrace.Country("Spain", "Madrid", np.zeros((2, 2, 3), np.uint8), 77, 0),
                 mllmtrace.Country("Chad", "N'Djamena", np.zeros((2, 2, 3), np.uint8), 78, 0)]
    vlm = mllmtrace.VisionLanguageModel(mllmtrace.MiniLlava(tiny_llama.model, tiny_llama.tokenizer, 8), None, True, "")
    prompts = mllmtrace.name_prompts(vlm, np.array([0, 1, 1]), countries)
    assert sorted(prompts.labels.tolist()) == [0, 1, 1]
    table = tiny_llama.model.get_input_embeddings().weight
    for embeds, positions, answers, labels in prompts.groups:
        for e, p, a, y in zip(embeds, positions, answers, labels):
            ids = (e[p] @ table.T).argmax(-1)  # embeddings back to tokens
            assert tiny_llama.tokenizer.decode(ids) == " " + countries[y].name
            assert int(a) == countries[y].answer_id


def test_visual_attention_sums_to_the_heads_over_all_positions(prompt):
    model, embeds, _, _ = prompt
    everything = torch.ones(embeds.shape[:2], dtype=torch.bool)
    implementation = model.config._attn_implementation
    scores = mllmtrace.visual_attention(model, embeds, everything, n_layers=1)
    assert model.config._attn_implementation == implementation  # eager only while reading the weights
    heads = model.config.num_attention_heads
    assert torch.allclose(scores.sum(1), torch.full((len(embeds),), float(heads)), atol=1e-4)
    assert mllmtrace.visual_attention(model, embeds, everything, 2).sum(1).allclose(
        torch.full((len(embeds),), 2.0 * heads), atol=1e-4)


def test_ablating_no_token_leaves_the_answer_and_every_token_changes_it(prompt):
    model, embeds, positions, answers = prompt
    clean = mllmtrace.answer_probability(model, embeds, answers)
    drop = torch.zeros((len(embeds), int(positions[0].sum())), dtype=torch.bool)
    mean = embeds[positions].mean(0)
    assert torch.equal(mllmtrace.ablated_probability(model, embeds, positions, drop, mean, answers), clean)
    changed = mllmtrace.ablated_probability(model, embeds, positions, ~drop, mean, answers)
    assert not torch.allclose(changed, clean)


def test_effect_center_and_its_bootstrap_difference():
    corrupted = np.zeros(4)
    early = mllmtrace.Trace("mlp", 1, np.ones(4), corrupted, np.zeros((6, 4)))
    early.restored[1] = 0.8
    late = mllmtrace.Trace("mlp", 1, np.ones(4), corrupted, np.zeros((6, 4)))
    late.restored[4] = 0.5
    late.restored[5] = 0.5
    assert mllmtrace.effect_center(early.restored, corrupted) == pytest.approx(1.0)
    assert mllmtrace.effect_center(late.restored, corrupted) == pytest.approx(4.5)
    point, low, high = mllmtrace.center_difference(early, late, 50, seed=0)
    assert point == pytest.approx(-3.5) and low <= point <= high < 0
    same = mllmtrace.center_difference(early, early, 50, seed=0)
    assert same[0] == 0
    # effect-weighted, not the plain mean of the causal layers: (1 × 0.2 + 3 × 0.6) / 0.8
    uneven = np.zeros((6, 4))
    uneven[1], uneven[3] = 0.2, 0.6
    assert mllmtrace.effect_center(uneven, corrupted) == pytest.approx(2.5)
    # the two traces' prompts are resampled independently (the settings ask different
    # prompts): a trace against itself still has an interval around 0, as two independent
    # samples of the same prompts would; a paired resample would collapse it to a point
    varied = np.zeros((6, 4))
    varied[1], varied[4] = [0.9, 0.1, 0.5, 0.3], [0.1, 0.9, 0.5, 0.7]
    spread = mllmtrace.Trace("mlp", 1, np.ones(4), corrupted, varied)
    point, low, high = mllmtrace.center_difference(spread, spread, 200, seed=0)
    assert point == 0 and low < 0 < high


def test_effects_within_the_noise_floor_do_not_place_a_causal_layer():
    """C1 compared effect-weighted mean layers over every layer, so a trace that is noise
    everywhere still had a mean layer, and a few thousandths at late layers moved a real one."""
    corrupted = np.zeros(4)
    rng = np.random.default_rng(0)
    noise_only = mllmtrace.Trace("attn", 1, np.ones(4), corrupted, rng.uniform(-0.004, 0.004, (6, 4)), floor=0.01)
    assert not np.isnan(mllmtrace.effect_center(noise_only.restored, corrupted))  # what the old rule saw
    assert np.isnan(mllmtrace.effect_center(noise_only.restored, corrupted, noise_only.floor))
    real = mllmtrace.Trace("mlp", 1, np.ones(4), corrupted, np.zeros((6, 4)), floor=0.01)
    real.restored[1] = 0.8
    real.restored[5] = 0.008  # within the floor
    assert mllmtrace.effect_center(real.restored, corrupted) > 1.0
    assert mllmtrace.effect_center(real.restored, corrupted, real.floor) == pytest.approx(1.0)
    point, low, high = mllmtrace.center_difference(noise_only, real, 50, seed=0)
    assert np.isnan(point) and np.isnan(high) and not high < 0  # "earlier" cannot pass on noise


def test_trace_setting_averages_noise_draws_and_its_floor_is_how_far_a_redraw_moves_the_effect(prompt):
    model, embeds, positions, answers = prompt
    prompts = mllmtrace.Prompts([(embeds, positions, answers, np.array([0, 1]))])
    sigma = float(embeds[positions].std())
    one = [mllmtrace.causal_trace(model, embeds, mllmtrace.noise_corrupt(embeds, positions, 3 * sigma, 5 + 1000 * d),
                                  positions, answers, "mlp", 1) for d in range(2)]
    trace = mllmtrace.trace_setting(model, prompts, "mlp", 1, 3.0, seed=5, draws=2)
    assert np.allclose(trace.restored, (one[0].restored + one[1].restored) / 2, atol=1e-6)
    assert np.allclose(trace.corrupted, (one[0].corrupted + one[1].corrupted) / 2, atol=1e-6)
    assert trace.floor == pytest.approx(np.abs(one[0].effect - one[1].effect).max(), abs=1e-6) and trace.floor > 0
    single = mllmtrace.trace_setting(model, prompts, "mlp", 1, 3.0, seed=5, draws=1)
    assert single.floor == 0 and np.allclose(single.restored, one[0].restored, atol=1e-6)
    # every group draws its own noise: two groups of the same prompts are not corrupted alike
    twice = mllmtrace.Prompts([(embeds, positions, answers, np.array([0, 1]))] * 2)
    both = mllmtrace.trace_setting(model, twice, "mlp", 1, 3.0, seed=5, draws=1)
    assert not np.allclose(both.corrupted[:2], both.corrupted[2:])


def test_an_edit_of_a_biased_output_projection_maps_the_key_to_the_value(tiny_llama):
    # W' k + b = v needs W' k = v − b: an edit that forgot the bias would land b away
    import copy

    model = copy.deepcopy(tiny_llama.model)
    proj = mllmtrace.output_projection(mllmtrace.layers(model)[1])
    generator = torch.Generator().manual_seed(0)
    proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, generator=generator))
    key, value = torch.randn(proj.in_features, generator=generator), torch.randn(proj.out_features, generator=generator)
    covariance = mllmtrace.key_covariance(torch.randn(400, proj.in_features, generator=generator))
    mllmtrace.edit_mlp(model, 1, key, value, covariance)
    with torch.no_grad():
        torch.testing.assert_close(proj(key), value, rtol=1e-4, atol=1e-4)


def test_a_rank_one_edit_through_the_wrapper_raises_the_target_and_undo_restores_the_model(tiny_llama):
    from replbook import config

    cfg = config.resolve(mllmtrace.PRESETS, "smoke", value_steps=60)
    model = tiny_llama.model.eval()
    wrapper = mllmtrace.MiniLlava(model, tiny_llama.tokenizer, 8)
    vlm = mllmtrace.VisionLanguageModel(wrapper, None, True, "")
    short = ("", " is")  # the random tiny model barely links distant positions
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 4, 8, generator=generator) + 0.01 * torch.randn(2, 4, 8, generator=generator)  # 2 views
    target = 90
    case = mllmtrace.EditCase(0, target, features, features)
    embeds, _ = wrapper.embed(features, *short)
    embeds = embeds.detach()
    targets = torch.full((2,), target)
    before = mllmtrace.answer_probability(model, embeds, targets)
    weight = mllmtrace.output_projection(mllmtrace.layers(model)[0]).weight.detach().clone()
    keys = torch.randn(400, weight.shape[1], generator=torch.Generator().manual_seed(1))
    original = mllmtrace.rank_one_edit(vlm, [case], 0, mllmtrace.key_covariance(keys), cfg, template=short)
    assert (mllmtrace.answer_probability(model, embeds, targets) > before * 1.1).all()
    mllmtrace.undo_edit(model, 0, original)
    assert torch.equal(mllmtrace.output_projection(mllmtrace.layers(model)[0]).weight, weight)
    assert torch.equal(mllmtrace.answer_probability(model, embeds, targets), before)


@pytest.fixture
def tiny_llava_folder(tiny_llama, tmp_path):
    """A LLaVA checkpoint folder as the hub has them — random weights: the tiny Llama's
    config with a 2-layer CLIP vision tower, its tokenizer and a CLIP image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=tiny_llama.model.config.to_dict(),
                                                      image_token_index=1))
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_paper_preset_runs_on_a_tiny_llava(tiny_llava_folder, tmp_path, results_tmp):
    import json

    import papermill

    from replbook.paths import repo_root

    notebook = repo_root() / "notebooks" / "06_mllm_tracing.ipynb"
    small = {"n_countries": 6, "require_known": False, "single_token_names": False, "image_size": 32,
             "train_views": 1, "test_views": 1, "n_trace": 4, "noise_draws": 2, "attention_layers": 1, "ablate_k": [1, 2],
             "ablation_draws": 2, "n_edits": 2, "edit_layers": [0, 1], "edit_views": 1, "value_steps": 2,
             "finetune_steps": 2, "covariance_text": "synthetic", "covariance_tokens": 512, "bootstrap": 20,
             "threads": 2}
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               cwd=str(notebook.parent), progress_bar=False,
                               parameters={"preset": "paper", "language_model": str(tiny_llava_folder), **small})
    saved = json.loads((results_tmp / "06_mllm_tracing.json").read_text())
    assert saved["preset"] == "paper" and saved["config"]["vision"] == "own"
    assert saved["metrics"]["projector"]["training"].startswith("none")
    assert [v["claim"] for v in saved["verdicts"]] == ["C1", "C2", "C3"]


def test_values_optimized_together_equal_values_optimized_apart(prompt):
    model, embeds, positions, _ = prompt
    last = positions.float().cumsum(1).argmax(1)
    targets = torch.tensor([70, 71])
    together = mllmtrace.optimize_value(model, 0, embeds, last, targets, steps=5, groups=torch.tensor([0, 1]))
    apart = torch.stack([mllmtrace.optimize_value(model, 0, embeds[[i]], last[[i]], targets[[i]], steps=5)
                         for i in range(2)])
    assert together.shape == apart.shape and torch.allclose(together, apart, atol=1e-5)


def test_early_edit_layer_follows_a_real_peak_and_falls_back_on_a_flat_trace():
    peaked = mllmtrace.Trace("mlp", 1, np.ones(3), np.zeros(3), np.zeros((30, 3)))
    peaked.restored[11] = 0.5
    assert mllmtrace.early_edit_layer(peaked, [0, 5, 15, 29], 30) == 15
    flat = mllmtrace.Trace("mlp", 1, np.ones(3), np.zeros(3), np.full((30, 3), 0.01))
    flat.restored[29] = 0.02
    assert mllmtrace.early_edit_layer(flat, [0, 5, 15, 29], 30) == 5


def test_warmup_cosine_schedule():
    factors = [mllmtrace.warmup_cosine(s, steps=100) for s in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert factors[5] == pytest.approx(1.0) and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])), "decays after the warm-up"


def test_restore_sites_are_every_constraint_token_or_the_last():
    positions = torch.zeros(3, 7, dtype=torch.bool)
    positions[0, 1:4] = True  # a three-token name
    positions[1, 2] = True  # a one-token name: its last token is itself
    positions[2, 3:7] = True  # the constraint runs to the end
    assert torch.equal(mllmtrace.restore_positions(positions, "joint"), positions)
    last = mllmtrace.restore_positions(positions, "last")
    assert last.sum(1).tolist() == [1, 1, 1]
    assert last.nonzero().tolist() == [[0, 3], [1, 2], [2, 6]]  # not the first token, not one past the end
    with pytest.raises(ValueError, match=r"site='first': choose from \('joint', 'last'\)"):
        mllmtrace.restore_positions(positions, "first")


def test_a_last_token_trace_corrupts_the_whole_constraint_and_restores_only_its_last_token(prompt, monkeypatch):
    model, embeds, positions, answers = prompt
    prompts = mllmtrace.Prompts([(embeds, positions, answers, np.array([0, 1]))])
    seen = []
    real = mllmtrace.causal_trace

    def spy(model, clean, corrupted, restore, *args, **kwargs):
        seen.append(((corrupted != clean).any(-1), restore))
        return real(model, clean, corrupted, restore, *args, **kwargs)

    monkeypatch.setattr(mllmtrace, "causal_trace", spy)
    joint = mllmtrace.trace_setting(model, prompts, "mlp", 1, 3.0, seed=5, draws=2)
    last = mllmtrace.trace_setting(model, prompts, "mlp", 1, 3.0, seed=5, draws=2, site="last")
    for corrupted_at, restore in seen:
        assert torch.equal(corrupted_at, positions)  # the noise covers the whole constraint at either site
    assert torch.equal(seen[0][1], positions)
    assert seen[-1][1].nonzero().tolist() == [[0, 6], [1, 6]]
    # same noise at both sites: the corrupted runs are the same, the restorations differ
    assert np.array_equal(joint.corrupted, last.corrupted) and np.array_equal(joint.clean, last.clean)
    assert not np.allclose(joint.restored, last.restored)


def test_multi_token_countries_share_one_length_of_several_tokens(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    chosen = mllmtrace.multi_token_countries(tiny_llama.model, tokenizer, 5, require_known=False)
    lengths = {len(tokenizer(" " + c.name, add_special_tokens=False).input_ids) for c in chosen}
    assert len(chosen) == 5 and len(lengths) == 1 and min(lengths) >= 2
    # the shortest length that has two names (a byte-level tokenizer: " " + 4 letters)
    everyone = mllmtrace.candidate_countries(tokenizer, single_token_names=False)
    shortest = min(len(tokenizer(" " + c.name, add_special_tokens=False).input_ids) for c in everyone)
    assert lengths == {shortest}


def test_specificity_counts_only_flags_that_no_edit_touches(monkeypatch):
    """A stub model answers each flag's label; an update changes the answers of exactly the
    edited flags. Specificity must then be 1: counting an edited flag among the 'others'
    (the plausible slip) would lower it."""
    n = 8
    features = torch.arange(n, dtype=torch.float32).repeat(2)[:, None]  # two test views per flag
    labels = np.tile(np.arange(n), 2)
    countries = [mllmtrace.Country(f"C{i}", f"K{i}", np.zeros((2, 2, 3), np.uint8), 100 + i, i) for i in range(n)]
    flags = mllmtrace.FlagData(countries, features, labels, features, labels, None, 1.0)
    cases = [mllmtrace.EditCase(2, 999, features[labels == 2][:1], features[labels == 2]),
             mllmtrace.EditCase(5, 998, features[labels == 5][:1], features[labels == 5])]
    state = {"edited": False}

    def answers(_vlm, rows, _template, batch=64):
        out = 100 + rows[:, 0].long()
        if state["edited"]:
            for case in cases:
                out[rows[:, 0].long() == case.label] = case.target
        return out

    def edit(*_args, **_kwargs):
        state["edited"] = True
        return None

    def undo(*_args):
        state["edited"] = False

    monkeypatch.setattr(mllmtrace, "predictions", answers)
    monkeypatch.setattr(mllmtrace, "rank_one_edit", edit)
    monkeypatch.setattr(mllmtrace, "undo_edit", undo)
    cfg = type("Cfg", (), {"specificity_flags": n})()
    vlm = type("Stub", (), {"lm": None})()
    rows = mllmtrace.edit_experiment(vlm, flags, cases, [("rank-one", 0, "constraint")], {0: None}, cfg, progress=False)
    assert [r["specificity"] for r in rows] == [1.0, 1.0]
    assert [r["efficacy"] for r in rows] == [1.0, 1.0] and [r["generalization"] for r in rows] == [1.0, 1.0]
    assert not state["edited"]  # undone after the arm


def test_multi_token_countries_never_take_a_one_token_name():
    class WordTokenizer:  # one token per word: " Spain" is one token, " Costa Rica" two
        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": list(range(len(text.split())))})()

    chosen = mllmtrace.multi_token_countries(None, WordTokenizer(), 50, require_known=False)
    assert len(chosen) >= 2 and {len(c.name.split()) for c in chosen} == {2}


def test_published_center_difference_is_the_flag_joint_row_minus_the_names_last_token_row():
    """C1's decisive number must compare what the claim names: the flag with every visual
    token restored (the paper's protocol) against two-token names restored at their last
    token (ROME's site). A notebook that passed the wrong pair of traces to
    ``center_difference`` (the flag's last visual token, the names restored jointly, the
    one-token "text" setting, or the pair reversed) would still publish a plausible number;
    here it must agree with the two rows of the published trace summary it claims to be."""
    import json
    import math
    from pathlib import Path

    metrics = json.loads((Path(__file__).resolve().parents[1] / "results" / "06_mllm_tracing.json")
                         .read_text())["metrics"]
    rows = {(row["setting"], row["block"]): row for row in metrics["trace_summary"]}
    for kind, (point, low, high) in metrics["center_difference"].items():
        flag, names = rows["flag", kind], rows["names, last token", kind]
        assert (flag["restored at"], names["restored at"]) == ("joint", "last"), kind
        flag_layer, names_layer = flag["mean layer (above the floor)"], names["mean layer (above the floor)"]
        if flag_layer is None or names_layer is None:  # a trace within its noise floor has no mean layer
            assert point is None and (high is None or not high < 0), kind
            continue
        assert point == pytest.approx(flag_layer - names_layer, abs=2e-5), kind
        assert low is None or high is None or low <= point <= high or math.isclose(point, high), kind


def test_host_features_and_every_tensor_the_method_makes_go_to_the_model_s_device(tiny_llama):
    """The language model on another device (``meta``: shapes only, no GPU needed), the
    vision features on the host, as the paper preset runs LLaVA on a GPU: prompts, answer
    ids, edit keys and values, δ optimization and the key covariances all work there. A
    tensor left on the host (answer ids, masks, groups, δ, the ridge's identity) fails."""
    import copy

    from replbook import config

    cfg = config.resolve(mllmtrace.PRESETS, "smoke", value_steps=2)
    model = copy.deepcopy(tiny_llama.model).eval().to("meta")
    wrapper = mllmtrace.MiniLlava(model, tiny_llama.tokenizer, 8).to("meta")
    vlm = mllmtrace.VisionLanguageModel(wrapper, None, True, "")
    features = torch.randn(4, 3, 8)  # on the host
    countries = [mllmtrace.Country(f"Land{i}", "Town", np.zeros((2, 2, 3), np.uint8), 60 + i, 70 + i) for i in range(4)]
    for prompts in (mllmtrace.visual_prompts(vlm, features, np.arange(4), countries),
                    mllmtrace.name_prompts(vlm, np.arange(4), countries)):
        assert {t.device.type for group in prompts.groups for t in group[:3]} == {"meta"}
    cases = [mllmtrace.EditCase(i, 90 + i, features[i:i + 1], features[i:i + 1]) for i in range(2)]
    for site in mllmtrace.EDIT_SITES:
        keys, values = mllmtrace.edit_keys_and_values(vlm, cases, 1, cfg, site=site)
        assert keys.device.type == values.device.type == "meta" and keys.shape[0] == values.shape[0] == 2
    covariances = mllmtrace.text_key_covariances(model, tiny_llama.tokenizer, "some ordinary text " * 20, 64, [0, 1],
                                                 length=16)
    assert {c.device.type for c in covariances.values()} == {"meta"}
    # a trace's corruption (noise drawn on the host) and restore sites are made on the device,
    # and its probabilities come back to the host (a copy that meta refuses: no data)
    (embeds, positions, answers, _), = mllmtrace.visual_prompts(vlm, features, np.arange(4), countries).groups
    corrupted = mllmtrace.noise_corrupt(embeds, positions, 3.0, 0)
    assert corrupted.device.type == mllmtrace.restore_positions(positions, "last").device.type == "meta"
    with pytest.raises(NotImplementedError, match="meta tensor"):
        mllmtrace.answer_probability(model, corrupted, answers.cpu())


def test_prompts_in_row_blocks_give_what_one_pass_gives(prompt, tiny_llama, monkeypatch):
    """``forward_batch`` (the paper preset's few prompts per pass for a 7B model) changes
    how many rows a pass holds, not the result: a trace, the token ablation, δ optimization
    (gradients summed over blocks before each step) and the fine-tuning baseline (the mean
    over all rows, block by block) each match the single pass. A block that lost its rows'
    offset, a decay added per block or a per-block mean would not."""
    from replbook import config

    model, embeds, positions, answers = prompt
    three = lambda t: torch.cat([t, t[:1]])  # noqa: E731 - three prompts: blocks of 2 and 1
    embeds, positions, answers = three(embeds), three(positions), torch.tensor([65, 66, 67])
    corrupted = mllmtrace.noise_corrupt(embeds, positions, 3.0, 0)
    whole = mllmtrace.causal_trace(model, embeds, corrupted, positions, answers, "mlp", 2)
    blocks = mllmtrace.causal_trace(model, embeds, corrupted, positions, answers, "mlp", 2, batch=2)
    for field in ("clean", "corrupted", "restored"):
        assert np.allclose(getattr(whole, field), getattr(blocks, field), atol=1e-6), field
    prompts = mllmtrace.Prompts([(embeds, positions, answers, np.arange(3))])
    mean = embeds[positions].mean(0)
    one, two = (mllmtrace.token_ablation(model, prompts, mean, 1, [1, 2], 2, seed=0, batch=b) for b in (None, 1))
    assert np.allclose(one["clean"], two["clean"], atol=1e-6)
    for k in (1, 2):
        assert np.allclose(one["top"][k], two["top"][k], atol=1e-6) and np.allclose(one["random"][k], two["random"][k], atol=1e-6)
    last = positions.float().cumsum(1).argmax(1)
    groups, targets = torch.tensor([0, 1, 1]), torch.tensor([70, 71, 71])
    together = mllmtrace.optimize_value(model, 0, embeds, last, targets, steps=5, groups=groups, weight_decay=0.5)
    in_blocks = mllmtrace.optimize_value(model, 0, embeds, last, targets, steps=5, groups=groups, weight_decay=0.5,
                                         batch=2)
    assert torch.allclose(together, in_blocks, atol=1e-5)
    wrapper = mllmtrace.MiniLlava(model, tiny_llama.tokenizer, 8)
    vlm = mllmtrace.VisionLanguageModel(wrapper, None, True, "")
    features = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    cases = [mllmtrace.EditCase(0, 90, features[:2], features[:2]), mllmtrace.EditCase(1, 91, features[2:], features[2:])]
    # plain gradient steps for the baseline: Adam's first steps move a weight by ±lr
    # whatever its gradient's size, so a rounding-level difference in a ~0 gradient flips it
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
    weights = []
    for batch in (64, 1):
        cfg = config.resolve(mllmtrace.PRESETS, "smoke", finetune_steps=3, finetune_lr=0.1, forward_batch=batch)
        original = mllmtrace.finetune_edit(vlm, cases, 1, cfg)
        weights.append(mllmtrace.output_projection(mllmtrace.layers(model)[1]).weight.detach().clone())
        mllmtrace.undo_edit(model, 1, original)
    assert not torch.allclose(weights[0], original, atol=1e-4), "the baseline moved the weight"
    assert torch.allclose(weights[0], weights[1], atol=1e-5)
