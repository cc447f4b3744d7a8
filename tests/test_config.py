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
