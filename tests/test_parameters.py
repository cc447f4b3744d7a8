"""Every chapter's parameters are checked before any model loads (``config.resolve`` with
the module's ``parameter_rules()``): each bad value fails with one line naming the
parameter, the value and what is allowed. The table below gives every parameter of every
chapter one bad value; a rule that is missing or too lax lets it through and fails here."""
import importlib
import json

import pytest
import torch
from conftest import ROOT

from replbook import cli, config, paths, results

MODULES = {"00_model_zoo": "zoo", "01_restor": "restor", "02_skill_slices": "skillslices", "03_intcoop": "intcoop",
           "04_endor": "endor", "05_t2i_composition": "t2icomp", "06_mllm_tracing": "mllmtrace", "07_drew": "drew",
           "08_loki": "loki", "09_vit_decompose": "vitdecomp", "10_semantic_tokens": "semtokens"}

# one bad value per parameter (checked at the book preset), chosen as a reader might type it
BAD = {
    "00_model_zoo": {"language_models": [], "image_model": "minilm-l6", "sentence_model": "smollm2-135m",
                     "photos": ["dog"], "max_new_tokens": 0, "seed": -1, "threads": 0,
                     "device": "gpu"},
    "01_restor": {"model_name": "llama3-8b", "known_only": 1, "countries": 0, "relations": ["capital", "anthem"],
                  "corrupted_per_relation": 0, "tuning_per_relation": -1, "untouched_per_relation": 0,
                  "mix_k": [2, 0], "corruption_steps": 0, "corruption_lr": 0.0, "unlearning_steps": -5,
                  "methods": ["ga", "rmu"], "fact_retain_methods": ["task_vector"], "learning_rates": [],
                  "batch_size": 0, "trainable_layers": [30, 0], "npo_beta": 0.0, "retain_weight": -1.0,
                  "evaluation_text": "war-and-peace", "retain_text": "c4", "retain_documents": 0, "seed": -3,
                  "threads": -1, "device": "gpu"},
    "02_skill_slices": {"tasks": ["astrology"], "task_mix": "closest", "mix_tolerance": -0.02, "min_tasks": 0,
                        "per_task": 0, "n_choices": 1, "models": ["smollm2-135m"],
                        "normalise": "yes", "rationale_model": "minilm-l6", "rationale_tokens": 0,
                        "rationales": "cached", "sentence_model": "gemma3-270m", "cluster_threshold": 1.5,
                        "name_threshold": 0.0, "min_slice": 0, "route_min_cluster": 0, "seed": -1, "threads": 0,
                        "device": "gpu"},
    "03_intcoop": {"clip": "clip-vit-l-14", "image_model": "minilm-l6", "text_model": "efficientnet-lite0",
                   "colour_caption_share": 1.5, "n_align": -1, "align_epochs": -1, "image_size": 8,
                   "datasets": ["imagenet"],
                   "pool_size": 0, "n_test": 0, "shots": 0, "steps": 0, "lr": 0.0, "scale": 0.0,
                   "attribute_weight": -1.0, "regularizer_weight": -8.0, "corruptions": ["fog"], "seeds": [],
                   "data_seed": -1, "threads": 0, "device": "gpu"},
    "04_endor": {"model_names": [], "offload_model_names": ["efficientnet-lite0"], "load_dtype": "int8",
                 "storage_dtype": "float64", "sparsities": [0.5, 1.0], "operating_sparsity": 1.0,
                 "pruners": ["sparsegpt"], "offload_pruner": "random", "calibration_text": "wikitext-2-train",
                 "evaluation_text": "", "text_offset_chars": -1, "window": 0, "calibration_windows": 0,
                 "evaluation_windows": 0, "prompt": "  ", "new_tokens": 0, "device": "tpu", "offload_dir": "/etc/passwd",
                 "seed": -1, "threads": 0},
    "05_t2i_composition": {"seed": -1, "backbone": "sdxl", "image_size": 30, "text_width": 62, "text_layers": 0,
                           "clip_lr": 0.0, "clip_steps": 0, "clip_batch": 0, "unet_width": 12, "unet_lr": -0.001,
                           "unet_steps": 0, "unet_batch": 0, "caption_dropout": 1.0, "untrained_towers": 0, "held_out": 72,
                           "samples_per_prompt": 0, "sampling_steps": 0, "guidance": -1.0, "sample_batch": 0,
                           "optimize_steps": 0, "optimize_lr": 0.0, "optimize_views": 0, "optimize_chunk": 0, "encode_batch": 0,
                           "projection_steps": 0, "projection_lr": 2.0, "projection_batch": 0, "wiclp_window": 0,
                           "reweight_scales": [],
                           "switch_at": 30, "quality_size": 16, "threads": 0},
    "06_mllm_tracing": {"language_model": "llava-hf/llava-1.5-7b-hf", "vision": "clip", "n_countries": 1,
                        "require_known": "true", "single_token_names": 0, "image_size": 0, "train_views": 0,
                        "test_views": 0, "projector_steps": -1, "projector_lr": 0.0, "projector_batch": 0,
                        "n_trace": 0, "n_names": 1, "window": 0, "noise": 0.0, "noise_draws": 1, "attention_layers": 0, "ablate_k": [0, 1],
                        "ablation_draws": 0, "n_edits": 0, "edit_layers": [5, 0], "edit_views": 0, "value_steps": 0,
                        "value_lr": 0.0, "finetune_steps": 0, "finetune_lr": 0.0, "specificity_flags": 0,
                        "covariance_text": "wiki", "covariance_tokens": 0, "bootstrap": 1, "seed": -1, "threads": 0,
                        "device": "gpu", "forward_batch": 0},
    "07_drew": {"images": "imagenet", "n_reference": 1, "n_queries": 4096, "image_size": 16, "ecc": "hamming-7-4",
                "watermarks": ["stegastamp"], "embedders": ["smollm2-135m"], "edits": ["rotate", "sepia"],
                "max_false_accept": 1.5, "paper_threshold": 0.0, "bootstrap_samples": 10, "seed": -1, "threads": 0,
                "device": "gpu"},
    "08_loki": {"model_names": [], "calibration_text": "shakespear", "evaluation_text": "", "window": -32,
                "calibration_windows": 0, "evaluation_windows": 0, "k_fractions": [0, 2], "d_fractions": [0.5, 0.25],
                "contexts": [0, 1024], "timing_repeats": 0, "random_init_control": "no", "device": "gpu", "seed": -1,
                "threads": 0},
    "09_vit_decompose": {"architectures": ["facebook/dinov2-base"], "width": 4, "depth": 0, "heads": 0, "epochs": 0,
                         "lr": 0.0, "n_train": 0, "n_test": 0, "agreement": 0.5, "image_size": 50, "probe_steps": 0,
                         "clip": "openai", "image_model": "minilm-l6", "text_model": "efficientnet-lite0",
                         "n_align": 0, "align_steps": 0, "orthogonality_weight": -0.1, "top_k": 0, "neighbours": 0,
                         "random_sets": 0, "seed": -1, "threads": 0, "device": "gpu", "decompose_batch": 0},
    "10_semantic_tokens": {"data": "coco", "n_train": 0, "n_val": 0, "n_test": 1, "width": 2, "depth": 0, "heads": 0,
                           "embed_dim": 0, "patch": 0, "image_size": 8, "text_queries": 0, "text_layers": -1,
                           "max_epochs": 0, "patience": 0, "lr": 0.0, "batch": 0, "negatives": ["colour"],
                           "text_model": "tiny-llama", "segmenter": "sam", "seeds": [1, 1], "data_seed": -1,
                           "threads": 0, "device": "gpu", "checkpoint_blocks": "yes"},
}

# pairs that are each allowed but not together: the relations between parameters
BAD_TOGETHER = [
    ("01_restor", {"countries": 10}, "corrupted + tuning + untouched"),
    ("01_restor", {"methods": ["ga", "ga_ft", "kl_ft", "npo"]}, "must include 'ga_ft', 'kl_ft', 'npo' and 'npo_localized'"),
    ("01_restor", {"fact_retain_methods": ["ga_kl"]}, "every fact_retain_methods entry must be in methods"),
    ("02_skill_slices", {"min_tasks": 9}, "min_tasks must be at most the number of tasks"),
    ("03_intcoop", {"shots": 2000}, "shots must be ≤ pool_size"),
    ("03_intcoop", {"n_align": 10}, "learns its image side: n_align ≥ 20"),
    ("03_intcoop", {"pool_size": 3000, "n_align": 3000}, "pool_size + n_align ≤ 5000"),
    ("03_intcoop", {"device": "auto"}, "(clip='captioned') computes on the CPU: device='cpu'"),
    ("10_semantic_tokens", {"negatives": ["word order"]}, "generated scenes have relation and attribute negatives"),
    ("10_semantic_tokens", {"n_train": 100, "batch": 200}, "batch must not exceed n_train"),
    ("04_endor", {"operating_sparsity": 0.6}, "operating_sparsity must be one of sparsities"),
    ("04_endor", {"offload_pruner": "wanda", "pruners": ["magnitude"]}, "offload_pruner must be one of pruners"),
    ("05_t2i_composition", {"switch_at": 26}, "switch_at must be at most sampling_steps"),
    ("05_t2i_composition", {"wiclp_window": 4}, "wiclp_window must be odd"),
    ("05_t2i_composition", {"held_out": 2, "samples_per_prompt": 1}, "samples_per_prompt must be ≥ 3 test images"),
    ("06_mllm_tracing", {"vision": "own"}, "vision='own' needs a LLaVA checkpoint"),
    ("07_drew", {"n_queries": 3000}, "n_queries must be ≤ n_reference"),
    ("09_vit_decompose", {"width": 66}, "width must be a multiple of heads"),
    ("09_vit_decompose", {"top_k": 11}, "top_k must be smaller than the official granularity's"),
    ("10_semantic_tokens", {"patch": 6}, "image_size must be a multiple of patch"),
]

# the paper preset's placeholder: it must be set to a local COCO copy, and says so up front
PLACEHOLDERS = {("10_semantic_tokens", "paper", "data")}


def _module(slug):
    return importlib.import_module(f"replbook.{MODULES[slug]}")


def test_every_chapter_is_covered():
    assert sorted(MODULES) == sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for slug, module in MODULES.items():
        assert paths.chapter_module(ROOT / "notebooks" / f"{slug}.ipynb").__name__ == f"replbook.{module}"
    assert sorted(BAD) == sorted(MODULES)


@pytest.mark.parametrize("slug", sorted(MODULES))
def test_rules_name_every_parameter_and_every_preset_passes_them(slug):
    module = _module(slug)
    rules = module.parameter_rules()
    single = {name for name, rule in rules.items() if isinstance(rule, config.Rule)}
    assert single == set(module.PRESETS["book"]), "a parameter without a rule, or a rule without a parameter"
    assert set(BAD[slug]) == set(module.PRESETS["book"]), "every parameter gets one bad value in BAD"
    for preset in config.PRESETS:
        placeholder = [name for (s, p, name) in PLACEHOLDERS if s == slug and p == preset]
        if placeholder:
            with pytest.raises(config.ParameterError, match=placeholder[0]):
                config.resolve(module.PRESETS, preset)
        else:
            config.resolve(module.PRESETS, preset)


@pytest.mark.parametrize("slug", sorted(MODULES))
def test_every_parameter_is_read_by_its_chapter(slug):
    """A parameter the chapter never reads (a memory setting the notebook forgets to pass,
    say: decompose_batch, optimize_chunk) runs at its function's default whatever the
    reader sets. Each one appears as ``cfg.NAME`` or ``cfg["NAME"]`` in the notebook's
    code or the chapter's module; seed and threads are read by ``config.from_notebook``."""
    import re

    module = _module(slug)
    notebook = json.loads((ROOT / "notebooks" / f"{slug}.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"]
                     if c["cell_type"] == "code" and "parameters" not in c.get("metadata", {}).get("tags", []))
    text = code + "\n" + (ROOT / "lib" / "replbook" / f"{MODULES[slug]}.py").read_text()
    unread = [name for name in module.PRESETS["book"] if name not in ("seed", "threads")
              and not re.search(rf'cfg(\.{name}\b|\[\s*"{name}"\s*\])', text)]
    assert not unread, f"{slug}: parameters no code reads: {unread}"


CASES = [(slug, name, value) for slug in sorted(BAD) for name, value in BAD[slug].items()]


@pytest.mark.parametrize("slug, name, value", CASES, ids=[f"{s[:2]}-{n}" for s, n, _ in CASES])
def test_a_bad_value_is_refused_in_one_line_naming_parameter_value_and_what_is_allowed(slug, name, value):
    module = _module(slug)
    with pytest.raises(config.ParameterError) as refused:
        config.resolve(module.PRESETS, "book", **{name: value})
    message = str(refused.value)
    assert "\n" not in message
    assert f"{name}={value!r}" in message or f"parameter {name!r} must be" in message, message
    assert "must be" in message or "not allowed together" in message, message


@pytest.mark.parametrize("slug, overrides, why", BAD_TOGETHER)
def test_values_allowed_alone_but_not_together_are_refused(slug, overrides, why):
    module = _module(slug)
    with pytest.raises(config.ParameterError, match="not allowed together") as refused:
        config.resolve(module.PRESETS, "book", **overrides)
    assert why in str(refused.value)


def test_hub_models_are_refused_offline_and_allowed_at_the_paper_preset():
    zoo = _module("00_model_zoo")
    with pytest.raises(config.ParameterError, match="not a hub model"):
        config.resolve(zoo.PRESETS, "book", language_models=["smollm2-135m-hub"])
    assert config.resolve(zoo.PRESETS, "paper", language_models=["llama2-7b"]).language_models == ["llama2-7b"]
    restor = _module("01_restor")
    with pytest.raises(config.ParameterError):
        config.resolve(restor.PRESETS, "book", model_name="meta-llama/Meta-Llama-3-8B")
    assert config.resolve(restor.PRESETS, "paper", model_name="meta-llama/Meta-Llama-3-8B")


def test_a_saved_model_folder_is_a_model(tmp_path):
    zoo = _module("00_model_zoo")
    assert config.resolve(zoo.PRESETS, "book", image_model=str(tmp_path)).image_model == str(tmp_path)


def test_the_rules_are_not_part_of_the_code_version(tmp_path):
    """Tightening a rule changes no accepted run: the chapter's code version and cache keys
    ignore parameter_rules(); any other change to the module still counts."""
    import shutil

    from replbook import paths

    package = tmp_path / "replbook"
    shutil.copytree(paths.Path(config.__file__).parent, package)
    root = ROOT
    before = results.code_version("08_loki", root, package)
    loki = package / "loki.py"
    source = loki.read_text()
    loki.write_text(source.replace('"timing_repeats": integer(1),', '"timing_repeats": integer(5),'))
    assert loki.read_text() != source and results.code_version("08_loki", root, package) == before
    loki.write_text(source.replace("ATTENTION_NAME = \"loki\"", "ATTENTION_NAME = \"loki2\""))
    assert results.code_version("08_loki", root, package) != before
    assert paths.without_parameter_rules(source).count("parameter_rules") == 0


def test_replbook_run_refuses_a_bad_value_before_any_kernel_starts(monkeypatch, capsys):
    """The issue's cases: `timing_repeats=0` wrote results; `photos=["dog"]` failed after 42 s."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel was started"))
    assert cli.main(["run", "08", "--preset", "smoke", "-p", "timing_repeats=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("replbook: parameter timing_repeats=0 is not allowed at the 'smoke' preset: "
                   "it must be an integer ≥ 1")
    assert cli.main(["run", "0", "-p", "photos", "['dog']"]) == 2
    assert "photos=['dog']" in capsys.readouterr().err
    assert cli.main(["run", "08", "-p", "seed", "'3'"]) == 2  # a wrong type is one line too, not a traceback
    assert capsys.readouterr().err.count("\n") == 1


def test_a_run_started_from_python_refuses_a_bad_value_before_any_kernel_starts(monkeypatch):
    """``runner.run`` itself checks, not only the command line: stability and reference runs
    call it directly, without a preparation step."""
    import papermill

    from replbook import runner

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel was started"))
    with pytest.raises(config.ParameterError, match="parameter timing_repeats=0 is not allowed"):
        runner.run("08", "smoke", {"timing_repeats": 0}, prepare_first=False, progress=False)



# chapters 04 and 08 keep the device rules they were published with (04: cpu or cuda, the
# paper preset on cuda; 08: its own auto); every other chapter with a device uses config.device()
DEVICE_CHAPTERS = [slug for slug, name in MODULES.items() if slug not in ("04_endor", "08_loki")
                   and "device" in importlib.import_module(f"replbook.{name}").PRESETS["book"]]


@pytest.mark.parametrize("slug", DEVICE_CHAPTERS)
def test_cuda_is_refused_without_a_gpu_and_auto_is_the_gpu_when_there_is_one(slug, monkeypatch, tmp_path):
    """``cuda`` fails before any model loads on a machine without one (the run would die at
    its first tensor), and ``auto``, the paper preset's device, is the GPU exactly when
    there is one; the book preset stays on the CPU its numbers were measured on."""
    module = _module(slug)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(config.ParameterError, match="device='cuda'.*machine with a CUDA GPU"):
        config.resolve(module.PRESETS, "book", device="cuda")
    assert config.run_device("auto") == "cpu" and config.run_device("cuda") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # at the paper preset: 03's book CLIP-like model computes only on the CPU and says so;
    # 10's paper preset needs its COCO folder named
    (tmp_path / "annotations").mkdir()
    placeholders = {name: str(tmp_path) for (s, p, name) in PLACEHOLDERS if s == slug and p == "paper"}
    assert config.resolve(module.PRESETS, "paper", device="cuda", **placeholders).device == "cuda"
    assert config.run_device("auto") == "cuda" and config.run_device("cpu") == "cpu"
    assert module.PRESETS["paper"]["device"] == "auto" and module.PRESETS["book"]["device"] == "cpu"
