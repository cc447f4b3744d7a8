"""Every hub repository a paper preset loads is pinned to a commit (issue #23): the registry
holds the commits (models.HUB_REVISIONS), and every loading path passes its repository's commit.
The loads themselves, resolving a pinned commit in a hub cache whose main has moved on, are
tested in tests/test_dryrun_hub.py."""
import re

import pytest

from replbook import architectures, data, models, runner

COMMIT = re.compile(r"[0-9a-f]{40}")


def test_every_paper_repository_is_pinned_to_a_commit_or_says_why_not():
    repositories = {models.hub_repository(hub_id) for hub_id in architectures.ARCHITECTURES}
    assert set(models.HUB_REVISIONS) | set(models.UNPINNED) == repositories, "a pin for no paper model, or a model with neither"
    assert not set(models.HUB_REVISIONS) & set(models.UNPINNED)
    assert all(COMMIT.fullmatch(commit) for commit in models.HUB_REVISIONS.values()), "a commit is 40 hex digits"
    assert len(set(models.HUB_REVISIONS.values())) == len(models.HUB_REVISIONS), "two repositories, one commit"
    assert all(why.strip() for why in models.UNPINNED.values())


def test_a_registry_hub_model_and_its_parts_carry_their_repositorys_commit():
    for spec in models.REGISTRY.values():
        if spec.source == "hub":
            assert spec.revision == models.HUB_REVISIONS[spec.hub_id], spec.name
        else:
            assert spec.revision is None, spec.name
    assert models.hub_revision("CompVis/stable-diffusion-v1-4/unet") == models.HUB_REVISIONS["CompVis/stable-diffusion-v1-4"]
    assert models.hub_revision("facebook/deit-base-patch16-224") is None  # UNPINNED: its main
    assert models.hub_revision("someone/their-own-model") is None and models.hub_revision(None) is None


class Loaded(Exception):
    """Raised by a spy once it has seen a from_pretrained call: nothing is loaded."""


def _spy(monkeypatch, classes, returning=None):
    """Each ``(owner, class name)``'s from_pretrained records (source, revision); it returns
    ``returning[class name]`` where given (so the loader goes on to its next file), else
    raises :class:`Loaded`."""
    seen = []
    returning = returning or {}

    def spy(name):
        def from_pretrained(source, *args, **kwargs):
            seen.append((source, kwargs.get("revision")))
            if name in returning:
                return returning[name]
            raise Loaded
        return from_pretrained

    for owner, name in classes:
        monkeypatch.setattr(getattr(owner, name), "from_pretrained", spy(name))
    return seen


def test_the_causal_lm_path_asks_for_the_pinned_commit_for_every_file(monkeypatch):
    from unittest.mock import MagicMock

    import transformers

    seen = _spy(monkeypatch, [(transformers, "AutoTokenizer"), (transformers, "AutoModelForCausalLM")],
                returning={"AutoTokenizer": MagicMock()})
    with pytest.raises(Loaded):
        models.load("llama2-7b", preset="paper", progress=False)
    assert seen == [("meta-llama/Llama-2-7b-hf", models.HUB_REVISIONS["meta-llama/Llama-2-7b-hf"])] * 2


def test_the_stable_diffusion_path_asks_for_the_pinned_commit(monkeypatch):
    import transformers

    seen = _spy(monkeypatch, [(transformers, "AutoTokenizer")])
    with pytest.raises(Loaded):
        models.load("stable-diffusion-2-1", preset="paper", progress=False)
    assert seen == [("stabilityai/stable-diffusion-2-1", models.HUB_REVISIONS["stabilityai/stable-diffusion-2-1"])]


def test_the_open_clip_path_fetches_the_tags_weights_at_the_pinned_commit(monkeypatch):
    import open_clip

    seen = []

    def download(model_id, filename=None, revision=None, cache_dir=None):
        seen.append((model_id, revision))
        raise Loaded

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", download)
    with pytest.raises(Loaded):
        models.load("clip-vit-b-16", preset="paper", progress=False)
    assert seen == [("timm/vit_base_patch16_clip_224.openai", models.HUB_REVISIONS["timm/vit_base_patch16_clip_224.openai"])]


def test_chapter_06s_llava_and_chapter_09s_hub_vits_ask_for_their_pinned_commits(monkeypatch, tmp_path):
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    import transformers

    from replbook import config, mllmtrace, vitdecomp

    seen = _spy(monkeypatch, [(transformers, "LlavaForConditionalGeneration"), (transformers, "AutoTokenizer"),
                              (transformers, "AutoImageProcessor")],
                returning={"LlavaForConditionalGeneration": MagicMock(), "AutoTokenizer": MagicMock()})
    with pytest.raises(Loaded):  # the model, its tokenizer, its image processor
        mllmtrace.load_model(config.resolve(mllmtrace.PRESETS, "paper", device="cpu"))
    llava = ("llava-hf/llava-1.5-7b-hf", models.HUB_REVISIONS["llava-hf/llava-1.5-7b-hf"])
    assert seen == [llava] * 3
    spies = _spy(monkeypatch, [(transformers, "AutoConfig"), (transformers, "ViTForImageClassification")],
                 returning={"AutoConfig": SimpleNamespace(model_type="vit")})
    cfg = config.resolve(vitdecomp.PRESETS, "paper", device="cpu")
    with pytest.raises(Loaded):  # its config, then the model
        vitdecomp.load_classifier("facebook/dino-vitb16", cfg, None)
    with pytest.raises(Loaded):  # unpinned: its main
        vitdecomp.load_classifier("facebook/deit-base-patch16-224", cfg, None)
    dino = ("facebook/dino-vitb16", models.HUB_REVISIONS["facebook/dino-vitb16"])
    assert spies == [dino, dino, ("facebook/deit-base-patch16-224", None), ("facebook/deit-base-patch16-224", None)]


def test_the_paper_presets_hub_texts_are_read_at_their_pinned_commit(monkeypatch):
    """wikitext-2 (chapters 01, 04, 06 and 08's paper texts) is read through ``datasets`` at the
    commit data.HUB_TEXT_REVISIONS pins, from the repository's canonical name, each split as asked."""
    import sys
    import types

    calls = []

    def load_dataset(path, config, split, revision=None, **kwargs):
        calls.append((path, config, split, revision))
        return {"text": [f"{split} line one", f"{split} line two"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert set(data.HUB_TEXT_REVISIONS) == {path for path, _, _ in data.HUB_TEXTS.values()}
    assert all(COMMIT.fullmatch(commit) for commit in data.HUB_TEXT_REVISIONS.values())
    for name, (path, config, split) in data.HUB_TEXTS.items():
        assert data.text(name) == f"{split} line one\n{split} line two"
        assert calls[-1] == (path, config, split, data.HUB_TEXT_REVISIONS[path]), name
    assert [call[0] for call in calls] == ["Salesforce/wikitext"] * 2 and {c[2] for c in calls} == {"train", "test"}


def test_a_paper_run_records_the_pinned_commit_it_loaded_not_mains(tmp_path):
    hub_id = "meta-llama/Llama-2-7b-hf"
    repository = tmp_path / "models--meta-llama--Llama-2-7b-hf"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text("f" * 40)  # main has moved on
    assert runner.hub_revisions(["llama2-7b"], cache=tmp_path) == {hub_id: None}  # the pin is not in the cache
    (repository / "snapshots" / models.HUB_REVISIONS[hub_id]).mkdir(parents=True)
    assert runner.hub_revisions(["llama2-7b"], cache=tmp_path) == {hub_id: models.HUB_REVISIONS[hub_id]}
    deit = tmp_path / "models--facebook--deit-base-patch16-224" / "refs"
    deit.mkdir(parents=True)
    (deit / "main").write_text("e" * 40)  # unpinned: what main resolved to
    assert runner.hub_revisions(["facebook/deit-base-patch16-224"], cache=tmp_path) == {
        "facebook/deit-base-patch16-224": "e" * 40}
