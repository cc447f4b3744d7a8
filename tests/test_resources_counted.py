"""Chapter 05's resource card counts its Stable Diffusion phases on the meta device (issue
#29): what autograd keeps for a backward pass (``resources.saved_for_backward``) and what is
alive at once without gradients (``resources.peak_live_bytes``). Each count is held here to
real tensors on the CPU, and the card's rows to the preset's batches. A file of its own, so
that the mutants of these counts run only these tests."""
import pytest

from replbook import resources

# a small UNet and VAE of SD's structure (cross-attention at a resolution, a mid-block with
# attention) stand in for the real ones
_SMALL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                   norm_num_groups=8)
_SMALL_VAE = dict(block_out_channels=[64, 128], latent_channels=4, layers_per_block=1, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def test_the_backward_count_on_the_meta_device_is_what_autograd_keeps_on_the_cpu():
    """The same UNet, once with real weights on the CPU (its attention the CPU's fused
    kernel) and once on the meta device: the bytes autograd saves, counted here by the
    storages' addresses, must equal the card's count to the byte. A count that took the
    attention matrices (the meta device's math path), counted the frozen weights, or a
    view apart from its tensor misses."""
    import torch
    from diffusers import UNet2DConditionModel

    def inputs(device, batch=3):
        torch.manual_seed(0)
        latents = torch.randn(batch, 4, 16, 16).to(device)
        states = torch.randn(batch, 7, 32).to(device).requires_grad_(True)
        return latents, torch.zeros(batch, dtype=torch.long, device=device), states

    torch.manual_seed(0)
    real = UNet2DConditionModel(**_SMALL_UNET).requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in (*real.parameters(), *real.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    latents, steps, states = inputs("cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        real(latents, steps, encoder_hidden_states=states).sample.sum().backward()
    assert states.grad is not None and storages
    with torch.device("meta"):
        meta = UNet2DConditionModel(**_SMALL_UNET).requires_grad_(False)
    latents, steps, states = inputs("meta")
    counted = resources.saved_for_backward(meta, lambda: meta(latents, steps, encoder_hidden_states=states))
    assert counted == sum(storages.values())


_ENCODE_PEAK = """
import os, sys, json
import torch
from diffusers import AutoencoderKL
from replbook.dryrun import high_water_bytes
torch.set_num_threads(1)
torch.manual_seed(0)
vae = AutoencoderKL(**json.loads(sys.argv[1])).requires_grad_(False)
with torch.no_grad():
    vae.encode(torch.zeros(1, 3, 64, 64))  # the kernels' first-call set-up, outside the measurement
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")  # the high-water mark starts again from here
before = high_water_bytes(os.getpid())
with torch.no_grad():
    vae.encode(torch.zeros(16, 3, 256, 256)).latent_dist.mean
print(high_water_bytes(os.getpid()) - before)
"""


def test_the_live_count_on_the_meta_device_is_what_a_real_encode_holds():
    """A VAE encoding 16 images at 256 px, measured in a fresh process (its high-water
    mark, ~1.1 GB), against the card's count of the same encode on the meta device. The
    count may fall short by the allocator's overhead, not more: one that never let a
    tensor go would be several times over, and one that forgot the fused attention
    (16,384 tokens in the mid-block: a 17 GB matrix) far over."""
    import json
    import subprocess
    import sys

    import torch
    from diffusers import AutoencoderKL

    done = subprocess.run([sys.executable, "-c", _ENCODE_PEAK, json.dumps(_SMALL_VAE)], capture_output=True,
                          text=True, check=True)
    rise = int(done.stdout.split()[-1])
    with torch.device("meta"):
        vae = AutoencoderKL(**_SMALL_VAE).requires_grad_(False)
    counted = resources.peak_live_bytes(
        lambda: vae.encode(torch.zeros(16, 3, 256, 256, device="meta")).latent_dist.mean)
    assert 0.85 * rise <= counted <= 1.02 * rise, (counted, rise)


def test_chapter_05s_rows_follow_its_batches(monkeypatch):
    """C1's backward row is optimize_chunk held-out prompts times their views, the
    projections' is their batch, the encoding's is encode_batch scenes, sampling's is
    sample_batch, scoring's every held-out prompt: doubling one doubles its row
    (activations are linear in the batch) and leaves the others where they were."""
    real = resources._preset
    slug = "05_t2i_composition"

    def rows(**changes):
        monkeypatch.setattr(resources, "_preset", lambda s: {**real(s), **changes} if s == slug else real(s))
        # one layer deep and at the dry run's resolution: the same rows, a few seconds less
        return {r.phase: r.gigabytes for r in resources.card(slug, layers=1).gpu if r.phase}

    base = real(slug)
    assert base["optimize_chunk"] < base["held_out"]  # the paper preset goes in chunks
    before = rows()
    for changed, own in ((dict(optimize_views=2 * base["optimize_views"]), "C1's optimisation"),
                         (dict(optimize_chunk=2 * base["optimize_chunk"]), "C1's optimisation"),
                         (dict(projection_batch=2 * base["projection_batch"]), "projection training"),
                         (dict(encode_batch=2 * base["encode_batch"]), "encoding"),
                         (dict(sample_batch=2 * base["sample_batch"]), "sampling"),
                         (dict(held_out=2 * base["held_out"] // 3), "scoring")):
        after = rows(**changed)
        factor = 2 if own != "scoring" else 2 / 3
        assert after[own] == pytest.approx(factor * before[own], rel=0.05), changed
        assert {k: v for k, v in after.items() if k != own} == {k: v for k, v in before.items() if k != own}, changed
    # a chunk beyond the held-out prompts is one pass over them all
    assert rows(optimize_chunk=10 * base["held_out"])["C1's optimisation"] == rows(
        optimize_chunk=base["held_out"])["C1's optimisation"]


def test_guided_sampling_runs_the_unet_on_twice_the_batch():
    """Classifier-free guidance doubles the UNet's batch (conditional and unconditional
    halves, t2icomp.generate): the sampling row's step is the UNet on 2 × sample_batch."""
    import torch

    pipeline = "CompVis/stable-diffusion-v1-4"
    unet = resources._sd_part_built(resources._sd_part(pipeline, "sd-unet"), 1)
    n = unet.config.sample_size

    def step(batch):
        return resources.peak_live_bytes(lambda: unet(
            torch.zeros(batch, 4, n, n, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta"),
            encoder_hidden_states=torch.zeros(batch, 77, 768, device="meta")))

    assert resources.guided_step_bytes(pipeline, 2, 1) == step(4) > step(2)
