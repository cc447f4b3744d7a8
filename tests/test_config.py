import pytest

from replbook import config

PRESETS = {
    "smoke": {"seed": 0, "lr": 0.1, "models": ["tiny"], "verbose": False},
    "book": {"seed": 0, "lr": 0.01, "models": ["a", "b"], "verbose": False},
    "paper": {"seed": 0, "lr": 0.001, "models": ["hub/a"], "verbose": True},
}


def test_resolve_takes_preset_defaults_and_overrides():
    cfg = config.resolve(PRESETS, "book", lr=None, seed=3)
    assert cfg.preset == "book" and cfg.seed == 3 and cfg.lr == 0.01 and cfg["models"] == ["a", "b"]


def test_int_is_accepted_for_float_and_stored_as_float():
    assert isinstance(config.resolve(PRESETS, "book", lr=1).lr, float)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"preset='huge'.*smoke, book, paper"):
        config.resolve(PRESETS, "huge")


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter 'epochs'.*lr, models, seed, verbose"):
        config.resolve(PRESETS, "book", epochs=3)


@pytest.mark.parametrize("key, value", [("seed", "3"), ("seed", 1.5), ("verbose", 1), ("lr", "x"), ("models", "a")])
def test_wrong_type_is_a_clear_error(key, value):
    with pytest.raises(TypeError, match=f"parameter '{key}' must be"):
        config.resolve(PRESETS, "book", **{key: value})


def test_config_is_read_only_and_names_missing_attributes():
    cfg = config.resolve(PRESETS, "smoke")
    with pytest.raises(TypeError):
        cfg["seed"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError, match="valid: lr, models, preset, seed, verbose"):
        cfg.epochs


def test_presets_must_be_complete_and_consistent():
    with pytest.raises(ValueError, match="exactly the presets"):
        config.resolve({"book": {}}, "book")
    with pytest.raises(ValueError, match="same parameters"):
        config.resolve({**PRESETS, "paper": {"seed": 0}}, "book")


def test_injected_names_reads_papermill_cell():
    history = ["import x", "preset = 'book'\nseed = 0", "# Parameters\npreset = \"smoke\"\nbogus = 1\n", "cfg = ..."]
    assert config.injected_names(history) == {"preset", "bogus"}
    assert config.injected_names(["a = 1"]) == set()
    # a notebook re-run in one kernel: the last injected cell is the one in force
    rerun = [*history, "# Parameters\npreset = \"book\"\nseed = 3\n"]
    assert config.injected_names(rerun) == {"preset", "seed"}


def test_from_notebook_rejects_injected_unknown_parameter():
    namespace = {"In": ["", "# Parameters\npreset = 'smoke'\nepochs = 3\n"], "preset": "smoke", "epochs": 3}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'epochs'; valid parameters: preset, lr"):
        config.from_notebook(PRESETS, namespace)


def test_from_notebook_seeds_deterministically():
    import torch

    namespace = {"preset": "book", "seed": 7, "lr": None, "models": None, "verbose": None}
    config.from_notebook(PRESETS, namespace)
    a = torch.rand(3)
    config.from_notebook(PRESETS, namespace)
    assert torch.equal(a, torch.rand(3))


# ----------------------------------------------------------------------------- the rules themselves
# (resolve's type check stops some values first; the rules are also checked on their own,
# by replbook run before a kernel starts, so each must hold by itself)


def _refused(rule, value, preset="book"):
    with pytest.raises(config.ParameterError, match=r"parameter x=.* is not allowed"):
        config.check_rules({"x": rule}, {"x": value, "preset": preset})


def test_an_integer_rule_refuses_a_bool_and_a_number_rule_nan_and_infinity():
    _refused(config.integer(0), True)
    for value in (float("nan"), float("inf"), -float("inf")):
        _refused(config.number(), value)
    config.check_rules({"x": config.number(minimum=0)}, {"x": 0.5, "preset": "book"})


def test_a_hub_id_is_one_organisation_and_one_name():
    for bad in ("a/b/c", "/name", "org/", "name", ""):
        _refused(config.hub_id(), bad)
    config.check_rules({"x": config.hub_id()}, {"x": "meta-llama/Llama-2-7b-hf", "preset": "paper"})


def test_a_value_a_rule_cannot_even_inspect_breaks_it():
    def inspect(value, values):
        raise TypeError("cannot compare")

    _refused(config.Rule("comparable", inspect), 3)
