"""The paper presets' GPU paths, run without a GPU. PyTorch's meta device stands in for
the GPU: a model moved there computes every shape but holds no numbers, and a tensor
left on the CPU beside it shows as a CPU result or a device error. Copying back to the
host (``Tensor.cpu``) cannot read a meta tensor, so the fixture below hands back zeros of
its shape and dtype instead: what these tests check is *where* each tensor is, never its
values (the CPU tests and the refactor proofs check those).

What they catch, each on the meta device and not on the CPU, where every move is a no-op:
chapter 09's ``decompose`` leaving its contributions on the device or feeding the model
host pixels, ``ablated_logits`` / ``predict_from`` / ``predict`` not bringing results
back, ``fit_probe`` installing the probe on the host; ``cliplike.OpenClip`` computing on
host inputs or handing its embeddings back on the device. (Chapter 03's prompt learners
have theirs in tests/test_intcoop.py.) Chapter 10: ``train`` and ``validation_loss``
feeding the model host batches, ``embed_images`` / ``embed_texts`` / ``attention_maps``
handing back device tensors, ``trained_model`` building or caching its model away from
``cfg.device``, and a GPU-trained model cached under the CPU's key. Chapter 03's
attribute readings (``nearest_attribute``, ``nearest_words``) fed host features."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from replbook import config, semtokens, vitdecomp
from replbook.cliplike import OpenClip

DEVICE = "meta"


@pytest.fixture
def fake_gpu(monkeypatch):
    """``Tensor.cpu`` of a meta tensor: zeros of its shape and dtype on the host; its
    ``item`` (a loss logged by a training loop): 0.0."""
    real_cpu, real_item = torch.Tensor.cpu, torch.Tensor.item

    def cpu(self, *args, **kwargs):
        if self.device.type == DEVICE:
            return torch.zeros(self.shape, dtype=self.dtype)
        return real_cpu(self, *args, **kwargs)

    def item(self):
        return 0.0 if self.device.type == DEVICE else real_item(self)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: float(item(self)))


@contextmanager
def inputs_seen(module: torch.nn.Module, keyword: str | None = None):
    """The device type of each call's first input to ``module`` (a tensor, or anything
    with a ``device``), recorded by a forward pre-hook while the block runs."""
    seen = []

    def hook(m, args, kwargs):
        seen.append((kwargs[keyword] if keyword else args[0]).device.type)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(params=vitdecomp.ARCHITECTURES)
def vit_on_device(request):
    model = vitdecomp.build_model(request.param, image_size=24, width=32, depth=2, heads=4, seed=0, num_labels=3)
    return model.eval().to(DEVICE)


def test_decompose_feeds_the_device_and_keeps_every_batch_on_the_host(vit_on_device, fake_gpu):
    with inputs_seen(vit_on_device, "pixel_values") as seen:
        decomposition = vitdecomp.decompose(vit_on_device, torch.randn(5, 3, 24, 24), batch=2)
    assert seen == [DEVICE] * 3  # batches of 2, 2 and 1, each sent to the model's device
    assert decomposition.contributions.device.type == "cpu" and decomposition.representation.device.type == "cpu"
    assert decomposition.contributions.shape == (5, 1 + 2 * (4 + 1), decomposition.representation.shape[1])


def test_the_classifier_reads_host_sums_on_the_device_and_hands_back_host_results(vit_on_device, fake_gpu):
    decomposition = vitdecomp.decompose(vit_on_device, torch.randn(4, 3, 24, 24), batch=4)
    means = decomposition.contributions.mean(0)
    with inputs_seen(vit_on_device.classifier) as seen:
        logits = vitdecomp.ablated_logits(vit_on_device, decomposition, [1, 2], means)
        predicted = vitdecomp.predict_from(vit_on_device, decomposition)
    assert seen == [DEVICE, DEVICE]
    assert logits.device.type == "cpu" and logits.shape == (4, 3)
    assert isinstance(predicted, np.ndarray) and predicted.shape == (4,)


def test_predict_runs_each_batch_on_the_device(vit_on_device, fake_gpu):
    with inputs_seen(vit_on_device, "pixel_values") as seen:
        predicted = vitdecomp.predict(vit_on_device, torch.randn(5, 3, 24, 24), batch=3)
    assert seen == [DEVICE] * 2 and isinstance(predicted, np.ndarray) and predicted.shape == (5,)


def test_the_probe_trains_on_the_host_and_is_installed_on_the_models_device(vit_on_device, fake_gpu):
    representation = torch.randn(6, vit_on_device.classifier.in_features)
    vitdecomp.fit_probe(vit_on_device, representation, np.array([0, 1] * 3), steps=2, lr=0.1, seed=0)
    assert {p.device.type for p in vit_on_device.classifier.parameters()} == {DEVICE}
    assert vit_on_device.classifier.out_features == 2


@pytest.fixture(scope="module")
def clip_on_device():
    return OpenClip("tiny-open-clip", preset="smoke", device=DEVICE)


def test_open_clip_computes_on_its_device_and_hands_embeddings_back_on_the_host(clip_on_device, fake_gpu):
    clip = clip_on_device
    assert clip.feature_key.endswith(f"@{DEVICE}")  # a GPU's features are cached apart from the CPU's
    # token ids must reach the embedding table on its device (on a GPU, host ids fail; on
    # the meta device they pass silently, so a hook looks at them)
    with inputs_seen(clip.net.token_embedding) as ids_seen:
        texts = clip.embed_texts(["a photo of a red truck", "a photo of a cat"])
        tokens = clip.token_embeddings(torch.tensor(clip.word_ids("a photo of a")))
    assert ids_seen == [DEVICE, DEVICE]
    assert texts.device.type == "cpu" and texts.shape == (2, clip.dim)
    with inputs_seen(clip.net.visual) as seen:
        features = clip.image_features(np.zeros((3, 32, 32, 3), np.uint8), batch=2)
    assert seen == [DEVICE] * 2 and isinstance(features, np.ndarray) and len(features) == 3
    # the prompt learner's side stays on the device (it trains there)
    assert tokens.device.type == DEVICE
    mask = torch.ones(1, len(tokens), dtype=torch.long)
    assert clip.encode_embeddings(tokens[None], mask).device.type == DEVICE


# ----------------------------------------------------------------------------- chapter 10


def _scene_training_set(n: int = 8) -> "semtokens.TrainingSet":
    """Semantic tokens of ``n`` generated scenes with stand-in caption states (what the
    tests check is where tensors go, not what MiniLM says)."""
    scenes = semtokens.make_scenes(n, False, 0)
    images, oracle = semtokens.render_all(scenes)
    tokens = semtokens.build_tokens(images, oracle, semtokens.oracle_graphs(scenes))
    texts = semtokens.TextStates(torch.randn(n, 6, 16).half(), torch.ones(n, 6, dtype=torch.bool))
    return semtokens.TrainingSet(tokens, texts, {"relation": texts})


def _dual_encoder(checkpoint_blocks: bool = True) -> "semtokens.DualEncoder":
    torch.manual_seed(0)
    image = semtokens.TokenEncoder(16, 2, 2, 8, checkpoint_blocks=checkpoint_blocks)
    return semtokens.DualEncoder(image, 16, 8, queries=2, text_layers=1, text_width=16)


def test_chapter_10_trains_and_validates_on_the_models_device_from_host_data(fake_gpu):
    data = _scene_training_set()
    model = _dual_encoder().to(DEVICE)
    with inputs_seen(model.image) as images_seen, inputs_seen(model.text) as texts_seen:
        semtokens.train(model, data, data, lr=1e-3, batch=4, seed=0, max_epochs=1, patience=1)
    # two training steps and two validation batches, each caption batch with its relation swaps
    assert images_seen == [DEVICE] * 4 and texts_seen == [DEVICE] * 8
    assert data.inputs.device.type == "cpu" and data.captions.device.type == "cpu"  # the set stays on the host
    assert {p.device.type for p in model.parameters()} == {DEVICE}


def test_chapter_10_embeds_and_draws_attention_on_the_device_and_hands_back_host_tensors(fake_gpu):
    data = _scene_training_set()
    model = _dual_encoder().to(DEVICE).eval()
    with inputs_seen(model.image) as images_seen, inputs_seen(model.text) as texts_seen:
        images = semtokens.embed_images(model, data.inputs, batch=3)
        texts = semtokens.embed_texts(model, data.captions, batch=5)
        scores = semtokens.evaluate(model, data.inputs, {"captions": data.captions, "relation": data.captions})
    assert images_seen == [DEVICE] * 4 and texts_seen == [DEVICE] * 4  # batches 3+3+2, 5+3, then evaluate's
    assert images.device.type == texts.device.type == "cpu" and images.shape == texts.shape == (8, 8)
    assert set(scores) >= {"image→text R@1", "relation swap"}
    maps, out = semtokens.attention_maps(model.image, data.inputs[[0]])
    assert [m.device.type for m in maps] == ["cpu", "cpu"] and out.device.type == "cpu"
    types, valid = semtokens.pair_types(data.inputs[[0]].to(DEVICE))
    assert types.device.type == valid.device.type == DEVICE


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # loading into the meta model
def test_chapter_10_trains_on_cfg_device_and_caches_a_gpus_model_apart(fake_gpu, monkeypatch):
    from replbook import paths

    keys, saved_states = [], []

    def cache_spy(kind, key, build):  # builds every time; records the key and what would be saved
        keys.append(key)
        saved = build()
        saved_states.append(saved["state"])
        return saved, False

    monkeypatch.setattr(paths, "cached_torch", cache_spy)
    monkeypatch.setattr(config, "run_device", lambda device: device)  # "meta" stands for the GPU
    data = _scene_training_set()
    settings = {**semtokens.PRESETS["smoke"], "width": 16, "depth": 2, "heads": 2, "embed_dim": 8,
                "text_queries": 2, "text_layers": 1, "max_epochs": 1, "batch": 4, "negatives": ["relation"]}
    models = {}
    for device in ("cpu", DEVICE):
        cfg = config.Config({**settings, "device": device, "checkpoint_blocks": True})
        models[device], _ = semtokens.trained_model("semantic (oracle masks)", cfg, 0, data, data, "fingerprint")
    assert {p.device.type for p in models[DEVICE].parameters()} == {DEVICE}
    assert {p.device.type for p in models["cpu"].parameters()} == {"cpu"}
    assert all(v.device.type == "cpu" for state in saved_states for v in state.values())  # the cache holds host tensors
    assert keys[1] == keys[0] + f"@{DEVICE}"  # a GPU's model never answers for the CPU's


def test_chapter_10_segments_on_cfg_device_and_encodes_captions_on_the_host(monkeypatch):
    """prepare hands the run's device to the segmenter (Mask R-CNN) for every split and every
    partner split, and the caption encoder gets no device: a frozen pass over short captions
    on the host. A prepare that forgot the device would leave Mask R-CNN on the CPU at the
    paper preset, and every other test would pass."""
    segmented = []

    def segment_spy(images, segmenter, progress=None, device="cpu"):
        segmented.append((segmenter, device))
        return semtokens.segment_all(images)  # the threshold segmenter's maps: what a detector would return

    monkeypatch.setattr(semtokens, "segment_images", segment_spy)
    monkeypatch.setattr(semtokens, "text_encoder", lambda cfg: "frozen caption encoder")
    monkeypatch.setattr(semtokens, "cached_text_states",
                        lambda encoder, captions, key: semtokens.TextStates(torch.zeros(len(captions), 2, 4),
                                                                            torch.ones(len(captions), 2, dtype=torch.bool)))
    monkeypatch.setattr(config, "run_device", lambda device: device)  # "meta" stands for the GPU
    data = {"train": semtokens.scene_split(4, False, 0), "validation": semtokens.scene_split(4, False, 1),
            "held-out combinations": semtokens.scene_split(4, True, 2, partners=True)}
    cfg = config.Config({**semtokens.PRESETS["smoke"], "segmenter": "maskrcnn-untrained", "device": DEVICE})
    prepared = semtokens.prepare(cfg, data, progress=False)
    assert segmented == [("maskrcnn-untrained", DEVICE)] * 4  # three splits and one partner split
    assert set(prepared.found) == set(data)


# ----------------------------------------------------------------------------- chapter 03's readings


def test_chapter_03_reads_the_attribute_token_on_the_device_and_hands_back_host_answers(clip_on_device, fake_gpu,
                                                                                         monkeypatch):
    """C3's readings of IntCoOp's attribute token (``nearest_attribute``, ``nearest_words``):
    host image features sent to the method's device, the vocabulary's embeddings formed
    there, the answers back on the host."""
    from replbook import intcoop

    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: torch.zeros(self.shape, dtype=self.dtype).tolist() if self.is_meta
                        else real_tolist(self))
    method = intcoop.IntCoOp(clip_on_device, ["cat", "truck", "frog"], ["red", "green"])
    assert intcoop.method_device(method).type == DEVICE
    images = torch.nn.functional.normalize(torch.randn(4, clip_on_device.dim), dim=-1)  # the host's cached features
    with inputs_seen(method.attribute_head) as seen:
        attributes = intcoop.nearest_attribute(method, images)
        words = intcoop.nearest_words(method, images, k=2)
    assert seen == [DEVICE, DEVICE]
    assert isinstance(attributes, np.ndarray) and attributes.shape == (4,)
    assert len(words) == 4 and all(len(w) == 2 and all(isinstance(x, str) for x in w) for w in words)
