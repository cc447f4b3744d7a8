"""replbook.dryrun's fake hub: paper models built from their public configs are served from a
local hub cache, so a chapter's own loading code finds them by hub id, offline (issue #29).
Each test builds a model one layer deep and loads it in a fresh interpreter, as a chapter's
kernel would: the slow half of the dry run's tests, kept apart so the mutation sweep runs it
only for the mutants of what the hub serves."""
import json

from replbook import architectures, dryrun, models


def _in_a_fresh_process(root, code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a new interpreter whose hub cache is
    ``root``, offline: as a chapter's kernel started by ``dryrun.run`` sees it. Every pinned
    repository's ``main`` has moved on first, to a commit the cache does not hold, so a load
    that does not ask for the registry's pinned commit (models.HUB_REVISIONS) fails."""
    import os
    import subprocess
    import sys

    from replbook import models

    for repository, commit in models.HUB_REVISIONS.items():
        ref = root / f"models--{repository.replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            assert (ref.parent.parent / "snapshots" / commit).is_dir(), f"{repository}: its pin is not served"
            ref.write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_hub_id_loads_offline_from_the_dry_run_cache(tmp_path):
    root = dryrun.fake_hub(["smollm2-135m-hub"], layers=1, root=tmp_path / "hub")
    assert (root / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").read_text() == dryrun.revision("smollm2-135m-hub", 1)
    seen = _in_a_fresh_process(root, """
import json
from replbook import models
loaded = models.load("smollm2-135m-hub", preset="paper", progress=False)  # the chapter's own path
c = loaded.model.config
ids = loaded.tokenizer("the capital of France is", return_tensors="pt").input_ids
print(json.dumps({"shape": [c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size],
                  "parameters": sum(p.numel() for p in loaded.model.parameters()), "max_id": int(ids.max()),
                  "logits": list(loaded.model(ids).logits.shape)}))
""")
    assert seen["shape"] == [576, 1, 3, 49152]
    assert seen["parameters"] == architectures.parameter_count("smollm2-135m-hub", layers=1)
    assert seen["max_id"] < 49152 and seen["logits"][-1] == 49152
    # built once: a second call reuses the snapshot
    weights = dryrun.snapshot(root, "HuggingFaceTB/SmolLM2-135M-Instruct", 1) / "model.safetensors"
    before = weights.stat().st_mtime
    dryrun.fake_hub(["smollm2-135m-hub"], layers=1, root=root)
    assert weights.stat().st_mtime == before


def test_a_changed_config_is_served_from_a_new_snapshot(tmp_path, monkeypatch):
    """The snapshot is filed under a hash of what it is built from: after a config is
    corrected, the hub cache serves the corrected model, not the one built before."""
    import dataclasses

    root = dryrun.fake_hub(["minilm-l6-hub"], layers=1, root=tmp_path / "hub")
    before = dryrun.snapshot(root, "minilm-l6-hub", 1)
    assert before.is_dir() and dryrun.revision("minilm-l6-hub", 2) != before.name
    arch = architectures.architecture("minilm-l6-hub")
    changed = dataclasses.replace(arch, config={**arch.config, "intermediate_size": 768})
    monkeypatch.setitem(architectures.ARCHITECTURES, arch.hub_id, changed)
    dryrun.fake_hub(["minilm-l6-hub"], layers=1, root=root)
    after = dryrun.snapshot(root, "minilm-l6-hub", 1)
    assert after != before and (after.parent.parent / "refs" / "main").read_text() == after.name
    pinned = after.parent / models.HUB_REVISIONS[arch.hub_id]  # the chapter's commit follows the rebuild
    assert pinned.is_symlink() and pinned.resolve() == after.resolve()
    served = [json.loads(p.read_text()) for p in after.rglob("config.json")]
    assert [c["intermediate_size"] for c in served if "intermediate_size" in c] == [768]


def test_a_sentence_encoder_is_served_as_a_sentence_transformers_repository(tmp_path):
    root = dryrun.fake_hub(["minilm-l6-hub"], layers=1, root=tmp_path / "hub")
    seen = _in_a_fresh_process(root, """
import json
from replbook import models
encoder = models.load("minilm-l6-hub", preset="paper", progress=False).model
print(json.dumps({"shape": list(encoder.encode(["a red cube", "a blue ball"]).shape)}))
""")
    assert seen["shape"] == [2, 384]


def test_clip_l14_image_tower_loads_alone_with_its_projection(tmp_path):
    """Chapter 07's paper embedder is CLIP ViT-L/14's image tower with its projection,
    loaded alone (CLIPVisionModelWithProjection reads the tower's own config). A config
    giving the projection width only at the top level built a 512-wide tower projection
    that the loader refused (chapter 07's first dry run failed on it)."""
    root = dryrun.fake_hub(["clip-vit-l-14"], layers=1, root=tmp_path / "hub")
    seen = _in_a_fresh_process(root, """
import json
import numpy as np
from replbook import models
loaded = models.load("clip-vit-l-14", preset="paper", progress=False)  # the chapter's own path
image = np.zeros((224, 224, 3), np.uint8)
inputs = loaded.tokenizer(images=[image], return_tensors="pt")
print(json.dumps({"embedding": list(loaded.model(pixel_values=inputs["pixel_values"]).image_embeds.shape),
                  "width": loaded.model.config.hidden_size}))
""")
    assert seen == {"embedding": [1, 768], "width": 1024}


def test_dinov2_is_served_with_its_hubs_processor_not_its_position_size(tmp_path):
    """DINOv2's config says 518 px (its learned positions); its hub processor resizes to
    256 and crops 224, which is what chapter 07 embeds at. The dry run served 518 px, 5.3
    times the tokens, and its memory record with them."""
    root = dryrun.fake_hub(["dinov2-base"], layers=1, root=tmp_path / "hub")
    seen = _in_a_fresh_process(root, """
import json
import numpy as np
from replbook import models
loaded = models.load("dinov2-base", preset="paper", progress=False)
inputs = loaded.tokenizer(images=[np.zeros((300, 400, 3), np.uint8)], return_tensors="pt")
print(json.dumps({"pixels": list(inputs["pixel_values"].shape),
                  "tokens": loaded.model(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1]}))
""")
    assert seen == {"pixels": [1, 3, 224, 224], "tokens": 1 + (224 // 14) ** 2}


def test_an_open_clip_model_is_served_where_open_clip_looks_for_its_weights(tmp_path):
    """Chapters 03 and 09 load OpenAI's CLIP ViT-B/16 through open_clip by architecture and
    tag; open_clip fetches the weights from the model's hub repository. The dry run serves
    them there, at full depth (open_clip builds the named architecture before loading). The
    book fetches them at the pinned commit and builds the model with the tag's QuickGELU:
    open_clip 3's tag path built nn.GELU for "ViT-B-16" + "openai" and only warned, so the
    paper preset ran OpenAI's weights through an activation they were not trained with."""
    root = dryrun.fake_hub(["clip-vit-b-16"], layers=1, root=tmp_path / "hub")
    seen = _in_a_fresh_process(root, """
import json
import os
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import load_file
from replbook import dryrun, models
loaded = models.load("clip-vit-b-16", preset="paper", progress=False)  # the chapters' own path
model, (preprocess, tokenizer) = loaded.model, loaded.tokenizer
snapshot = dryrun.snapshot(Path(os.environ["HF_HUB_CACHE"]), "clip-vit-b-16", 1)
served = load_file(snapshot / "open_clip_model.safetensors")
photo = Image.new("RGB", (300, 240), (200, 30, 90))
image = preprocess(photo).unsqueeze(0)
# open_clip's own path, by tag (its weights at main: pointed back at the served snapshot here),
# with the QuickGELU the tag was trained with (open_clip 3 only warns that "ViT-B-16" lacks it),
# builds the same model: the same preprocessing, the same outputs
import open_clip
(snapshot.parent.parent / "refs" / "main").write_text(models.HUB_REVISIONS["timm/vit_base_patch16_clip_224.openai"])
by_tag, _, tag_preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai", force_quick_gelu=True)
with torch.no_grad():
    same = torch.equal(model.eval().encode_image(image), by_tag.eval().encode_image(tag_preprocess(photo).unsqueeze(0)))
print(json.dumps({"image": list(model.encode_image(image).shape), "text": list(model.encode_text(tokenizer(["a cat"])).shape),
                  "layers": len(model.visual.transformer.resblocks),
                  "served": all(torch.equal(v, served[k]) for k, v in model.state_dict().items() if k in served),
                  "every_weight_served": set(model.state_dict()) <= set(served),
                  "as_the_tag_builds_it": same and repr(preprocess) == repr(tag_preprocess),
                  "activation": type(model.visual.transformer.resblocks[0].mlp.gelu).__name__}))
""")
    assert seen == {"image": [1, 512], "text": [1, 512], "layers": 12, "served": True, "every_weight_served": True,
                    "as_the_tag_builds_it": True, "activation": "QuickGELU"}
    assert dryrun.served_depth("clip-vit-b-16", 1) is None and dryrun.served_depth("clip-vit-l-14", 1) == 1


def test_a_stable_diffusion_repository_is_served_part_by_part(tmp_path, monkeypatch):
    """Chapter 05 loads Stable Diffusion 1.4 by hub id, one part per subfolder (tokenizer,
    text encoder, UNet, VAE, scheduler). The parts are shrunk here (the dry run serves
    them at full width); what is checked is the layout, the depth, the latent size (SD_SHRINK
    times smaller), the schedule, and that an offline load does not go looking for the
    config.json a tokenizer folder lacks."""
    import dataclasses

    small = {"CompVis/stable-diffusion-v1-4/unet": {
                 "cross_attention_dim": 32, "attention_head_dim": 2, "sample_size": 8, "layers_per_block": 2,
                 "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 8},
             "CompVis/stable-diffusion-v1-4/vae": {
                 "block_out_channels": [8, 8], "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 8,
                 "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
             "openai/clip-vit-large-patch14/text": {
                 "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "vocab_size": 49408, "max_position_embeddings": 77}}
    for hub_id, config in small.items():
        monkeypatch.setitem(architectures.ARCHITECTURES, hub_id,
                            dataclasses.replace(architectures.ARCHITECTURES[hub_id], config=config))
    root = dryrun.fake_hub(["stable-diffusion-v1-4"], layers=1, root=tmp_path / "hub")
    seen = _in_a_fresh_process(root, """
import json
from replbook import models
parts = models.diffusion_parts("CompVis/stable-diffusion-v1-4", offline=True, device="cpu")  # the chapter's path
ids = parts.tokenizer(["a red cube"], padding="max_length", max_length=parts.tokenizer.model_max_length).input_ids
print(json.dumps({"unet_layers": parts.unet.config.layers_per_block, "vae_layers": parts.vae.config.layers_per_block,
                  "latents": parts.unet.config.sample_size,
                  "text_layers": parts.text_encoder.config.num_hidden_layers, "tokens": len(ids[0]),
                  "schedule": [parts.scheduler_config[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                                   "prediction_type")]}))
""")
    assert seen == {"unet_layers": 1, "vae_layers": 1, "text_layers": 1, "tokens": 77, "latents": 8 // dryrun.SD_SHRINK,
                    "schedule": ["scaled_linear", 0.00085, 0.012, "epsilon"]}


