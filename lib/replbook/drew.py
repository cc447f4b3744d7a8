"""DREW (Saberi et al., 2024, arXiv 2406.02836): Data Retrieval with Error-corrected
codes and Watermarking.

The method, as chapter 07 runs it:

1. Split the reference set at random into ``2**k`` equal clusters (:func:`assign_clusters`).
2. Give each cluster a key: the codeword of its index under an error-correcting code
   (:class:`ClusterCode`, a BCH code from ``galois``; the official code uses polar codes),
   and watermark every image of the cluster with that key (:data:`WATERMARKS`: real
   watermarking libraries from PyPI).
3. At query time read the watermark, decode it, and score the decoding with the paper's
   confidence ``1 - 2 d_H(received, re-encoded) / n``. If the confidence reaches the
   threshold, search only the decoded cluster; otherwise search everything
   (:func:`retrieve`), which is why DREW should never do worse than plain retrieval.

Everything a chapter measures comes out of :func:`run_queries` as one row per
(watermark, edit, query), from which :func:`accuracy_table`, :func:`gate_curve` and
:func:`paired_gain` compute the figures and verdicts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .images import to_tensor, to_uint8

# ----------------------------------------------------------------------------- presets

PRESETS = {
    "smoke": {
        "images": "synthetic", "n_reference": 128, "n_queries": 8, "image_size": 64, "ecc": "bch-31-6",
        "watermarks": ["rivagan", "dwtdctsvd"], "embedders": ["tiny-efficientnet"],
        "edits": ["none", "rotate", "flip"], "max_false_accept": 0.01, "paper_threshold": 0.5,
        "bootstrap_samples": 200, "seed": 0, "threads": 2, "device": "cpu",
    },
    "book": {
        "images": "cifar10", "n_reference": 2048, "n_queries": 160, "image_size": 128, "ecc": "bch-31-6",
        "watermarks": ["rivagan", "dwtdctsvd"], "embedders": ["efficientnet-lite0"],
        "edits": ["none", "rotate", "crop", "flip", "stretch", "blur", "jitter", "jpeg", "combo"],
        "max_false_accept": 0.01, "paper_threshold": 0.5, "bootstrap_samples": 2000, "seed": 0, "threads": 2,
        "device": "cpu",
    },
    "paper": {
        # the paper's embedders and watermark (TrustMark, 100 bits, so a longer code and
        # 2^10 clusters as in the official code); point `images` at "folder:<path>" for
        # the paper's datasets
        "images": "cifar10", "n_reference": 8192, "n_queries": 1000, "image_size": 256, "ecc": "bch-63-10",
        "watermarks": ["trustmark"], "embedders": ["dinov2-base", "clip-vit-l-14"],
        "edits": ["none", "rotate", "crop", "flip", "stretch", "blur", "jitter", "jpeg", "combo"],
        "max_false_accept": 0.01, "paper_threshold": 0.5, "bootstrap_samples": 2000, "seed": 0, "threads": 16,
        # the embedders' ViTs and TrustMark's networks on the GPU when there is one; the
        # edits, the codes and the FAISS search stay on the host
        "device": "auto",
    },
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    import os

    from .config import Rule, device, integer, items, model, number, one_of, relation

    image_folder = Rule("'folder:<path>' naming an existing folder",
                        lambda v, _: isinstance(v, str) and v.startswith("folder:") and os.path.isdir(v[len("folder:"):]))
    return {
        "images": one_of("cifar10", "synthetic") | image_folder,
        "n_reference": integer(2),
        "n_queries": integer(1),
        "image_size": integer(32, 1024),
        "ecc": one_of(lambda: CODES),
        "watermarks": items(one_of(lambda: WATERMARKS)),
        "embedders": items(model("image-classifier", "image-encoder")),
        "edits": items(one_of(lambda: EDITS)),
        "max_false_accept": number(above=0, below=1),
        "paper_threshold": number(above=0, below=1),
        "bootstrap_samples": integer(100),
        "seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "queries_among_references": relation("n_queries, n_reference", "n_queries must be ≤ n_reference "
                                             "(queries are drawn from the references without replacement)",
                                             lambda v: v["n_queries"] <= v["n_reference"]),
    }

# ----------------------------------------------------------------------------- clusters


def assign_clusters(n_items: int, k_bits: int, seed: int) -> np.ndarray:
    """A random split of ``n_items`` into ``2**k_bits`` clusters of equal size (step 1)."""
    n_clusters = 2 ** k_bits
    if n_items % n_clusters:
        raise ValueError(f"n_items={n_items} must be a multiple of the {n_clusters} clusters")
    rng = np.random.default_rng(seed)
    return rng.permutation(n_items) % n_clusters


# ----------------------------------------------------------------------------- error-correcting code

# name -> (n, k): BCH codes of length 31 fit a 32-bit watermark payload
CODES = {"bch-31-6": (31, 6), "bch-31-11": (31, 11), "bch-31-16": (31, 16), "bch-63-10": (63, 10)}


class ClusterCode:
    """A cluster's key is the BCH codeword of its index, XOR-ed with a fixed scrambling
    mask (step 2).

    - The code is systematic: the first ``k`` bits of every codeword are the cluster index,
      so the same watermark can be read *without* error correction by unscrambling those
      bits (:meth:`raw_clusters`, the ablation).
    - The mask keeps a watermark decoder's degenerate outputs (all zeros when the mark is
      destroyed) from being keys: unmasked, all zeros is cluster 0's codeword.
    """

    def __init__(self, name: str = "bch-31-6"):
        if name not in CODES:
            raise ValueError(f"code={name!r}; choose one of: {', '.join(CODES)}")
        import galois

        self.name = name
        self.n, self.k = CODES[name]
        self.bch = galois.BCH(self.n, self.k)
        self.t = int(self.bch.t)  # bit errors it is designed to correct
        self.mask = np.random.default_rng([self.n, self.k]).integers(0, 2, self.n).astype(np.uint8)

    @property
    def n_clusters(self) -> int:
        return 2 ** self.k

    def _index_bits(self, clusters: np.ndarray) -> np.ndarray:
        shifts = np.arange(self.k - 1, -1, -1)
        return (np.asarray(clusters)[:, None] >> shifts) & 1

    def _bits_index(self, bits: np.ndarray) -> np.ndarray:
        return (np.asarray(bits, dtype=np.int64) << np.arange(self.k - 1, -1, -1)).sum(1)

    def codewords(self, clusters: np.ndarray) -> np.ndarray:
        """(m,) cluster indices -> (m, n) uint8 keys (scrambled codewords)."""
        import galois

        clusters = np.asarray(clusters)
        if clusters.size and (clusters.min() < 0 or clusters.max() >= self.n_clusters):
            raise ValueError(f"cluster indices must lie in [0, {self.n_clusters})")
        words = np.asarray(self.bch.encode(galois.GF2(self._index_bits(clusters).astype(np.uint8))), dtype=np.uint8)
        return words ^ self.mask

    def decode(self, received: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m, n) received bits -> decoded cluster indices and the paper's confidence
        ``1 - 2 d_H(received, key(decoded)) / n``. A word the decoder cannot correct
        (more than ``t`` errors detected) gets confidence 0."""
        import galois

        received = np.asarray(received, dtype=np.uint8)[:, : self.n]
        messages, n_errors = self.bch.decode(galois.GF2(received ^ self.mask), errors=True)
        clusters = self._bits_index(np.asarray(messages, dtype=np.uint8).reshape(len(received), self.k))
        distance = (self.codewords(clusters) != received).sum(1)
        confidence = np.where(np.asarray(n_errors) >= 0, 1.0 - 2.0 * distance / self.n, 0.0)
        return clusters, confidence

    def raw_clusters(self, received: np.ndarray) -> np.ndarray:
        """The ablation without ECC: the cluster index read from the first ``k`` bits."""
        return self._bits_index(np.asarray(received, dtype=np.uint8)[:, : self.k] ^ self.mask[: self.k])

    def random_word_false_accept(self, threshold: float) -> float:
        """The chance that a word of random bits (a destroyed or absent watermark) passes
        the gate: (number of keys) x (Hamming ball of radius d_max) / 2^n, where d_max is
        the largest distance whose confidence reaches ``threshold``, capped at ``t``."""
        from math import comb

        d_max = min(self.t, int(np.floor((1.0 - threshold) * self.n / 2 + 1e-9)))
        if d_max < 0:
            return 0.0
        return min(1.0, self.n_clusters * sum(comb(self.n, i) for i in range(d_max + 1)) / 2 ** self.n)

    def threshold_for(self, false_accept: float) -> float:
        """The lowest confidence threshold whose random-word false-accept rate is at most
        ``false_accept``: the gate tolerates as many bit errors as that rate allows."""
        levels = [1.0 - 2.0 * d / self.n for d in range(self.t + 1)]
        allowed = [level for level in levels if self.random_word_false_accept(level) <= false_accept]
        return min(allowed) if allowed else 1.0 + 1e-9


# ----------------------------------------------------------------------------- watermarks


class Watermark:
    """Embed a bit string into uint8 RGB images (N, H, W, 3) and read it back. Every
    watermark takes a ``device``; only the torch ones (TrustMark) use it: RivaGAN runs in
    ONNX Runtime's CPU build and the DWT watermarks in OpenCV."""

    name = ""
    payload_bits = 32

    def embed(self, images: np.ndarray, bits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def extract(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class RivaGAN(Watermark):
    """RivaGAN (Zhang et al., 2019), a learned 32-bit watermark: the encoder and decoder
    ONNX networks shipped in ``invisible-watermark``, run on whole batches."""

    name = "rivagan"

    def __init__(self, device: str = "cpu", batch_size: int = 16):
        from imwatermark.rivaGan import RivaWatermark

        RivaWatermark.loadModel()
        self.encoder, self.decoder = RivaWatermark.encoder, RivaWatermark.decoder
        self.batch_size = batch_size

    @staticmethod
    def _frames(images: np.ndarray) -> np.ndarray:  # N,H,W,3 uint8 -> N,3,1,H,W in [-1, 1]: one-frame videos
        return to_tensor(images).numpy()[:, :, None]

    def embed(self, images, bits):
        out = []
        for i in range(0, len(images), self.batch_size):
            frames = self._frames(images[i:i + self.batch_size])
            marked = self.encoder.run(None, {"frame": frames,
                                             "data": bits[i:i + self.batch_size].astype(np.float32)})[0]
            out.append(to_uint8(torch.from_numpy(marked[:, :, 0])))
        return np.concatenate(out)

    def extract(self, images):
        out = [self.decoder.run(None, {"frame": self._frames(images[i:i + self.batch_size])})[0] > 0.5
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.uint8)


class _InvisibleWatermarkDWT(Watermark):
    """The frequency-domain watermarks of ``invisible-watermark``, one image at a time.
    Their classes are used directly: the library's front door refuses images under
    256x256, although the transforms work at any size that is a multiple of 8."""

    embedder: str = ""

    def __init__(self, device: str = "cpu"):
        pass  # OpenCV on the host: nothing to place on a device

    def _codec(self, bits):
        from imwatermark import dwtDctSvd, maxDct

        cls = {"dwtDctSvd": dwtDctSvd.EmbedDwtDctSvd, "dwtDct": maxDct.EmbedMaxDct}[self.embedder]
        return cls(list(bits), wmLen=self.payload_bits)

    def embed(self, images, bits):
        import cv2

        return np.stack([cv2.cvtColor(self._codec(b).encode(cv2.cvtColor(im, cv2.COLOR_RGB2BGR)),
                                      cv2.COLOR_BGR2RGB) for im, b in zip(images, bits)])

    def extract(self, images):
        import cv2

        codec = self._codec([0] * self.payload_bits)
        return np.stack([np.asarray(codec.decode(cv2.cvtColor(im, cv2.COLOR_RGB2BGR)))
                         for im in images]).astype(np.uint8)


class DwtDctSvd(_InvisibleWatermarkDWT):
    """DWT-DCT-SVD (invisible-watermark): bits in the top singular value of 4x4 DCT
    blocks of the U channel's wavelet approximation."""

    name, embedder = "dwtdctsvd", "dwtDctSvd"


class DwtDct(_InvisibleWatermarkDWT):
    """DWT-DCT (invisible-watermark, the one Stable Diffusion's scripts use)."""

    name, embedder = "dwtdct", "dwtDct"


class TrustMark(Watermark):
    """TrustMark (Bui et al., 2023), the paper's watermark: 100 raw bits, its own ECC off
    (as in the official DREW code, which writes its polar codewords into those bits).
    Its PyPI package fetches its weights on first use, so it belongs to the paper preset."""

    name = "trustmark"
    payload_bits = 100

    def __init__(self, device: str = "cpu", model_type: str = "Q"):
        try:
            from trustmark import TrustMark as _TrustMark
        except ImportError:
            raise ImportError("the trustmark watermark needs its package (weights download on first "
                              "use): pip install trustmark==0.9.2") from None
        # an explicit device: left empty, the package takes the GPU whenever there is one
        self.tm = _TrustMark(use_ECC=False, verbose=False, model_type=model_type, device=device)

    def embed(self, images, bits):
        from PIL import Image

        return np.stack([np.asarray(self.tm.encode(Image.fromarray(im), "".join(map(str, b)), MODE="binary")
                                    .convert("RGB")) for im, b in zip(images, bits)])

    def extract(self, images):
        from PIL import Image

        out = []
        for im in images:
            secret, _, _ = self.tm.decode(Image.fromarray(im), MODE="binary")
            bits = [int(c) for c in str(secret)[: self.payload_bits]]
            out.append(bits + [0] * (self.payload_bits - len(bits)))
        return np.asarray(out, dtype=np.uint8)


WATERMARKS: dict[str, Callable[..., Watermark]] = {  # each called with device=...
    "rivagan": RivaGAN, "dwtdctsvd": DwtDctSvd, "dwtdct": DwtDct, "trustmark": TrustMark}


def watermark(name: str, device: str = "cpu") -> Watermark:
    """The watermark ``name``, its networks (where it has torch ones) on ``device``."""
    if name not in WATERMARKS:
        raise ValueError(f"watermark {name!r}; choose one of: {', '.join(WATERMARKS)}")
    try:
        return WATERMARKS[name](device=device)
    except ImportError as err:
        if "imwatermark" in str(err) or "onnxruntime" in str(err):
            raise ImportError(f"watermark {name!r} needs invisible-watermark and onnxruntime: "
                              "pip install invisible-watermark==0.2.0 onnxruntime==1.32.0") from None
        raise


def payload(code: ClusterCode, clusters: np.ndarray, payload_bits: int) -> np.ndarray:
    """Each image's watermark bits: its cluster's codeword, zero-padded to the payload."""
    if code.n > payload_bits:
        raise ValueError(f"code {code.name} needs {code.n} bits; this watermark carries {payload_bits}")
    words = code.codewords(clusters)
    return np.pad(words, ((0, 0), (0, payload_bits - code.n)))


# ----------------------------------------------------------------------------- query edits

def _rotate(x, degrees):
    import torchvision.transforms.v2.functional as TF

    return TF.rotate(x, degrees)


def _centre_crop(x, keep):
    import torchvision.transforms.v2.functional as TF

    size = x.shape[-1]
    return TF.resize(TF.center_crop(x, [round(size * keep)] * 2), [size, size], antialias=True)


def _stretch(x, factor):
    import torchvision.transforms.v2.functional as TF

    size = x.shape[-1]
    wide = TF.resize(x, [size, round(size * factor)], antialias=True)
    return TF.center_crop(wide, [size, size])


def _jitter(x, order, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter with its draws given: the four adjustments in ``order``
    (0 brightness, 1 contrast, 2 saturation, 3 hue), as ColorJitter applies them."""
    import torchvision.transforms.v2.functional as TF

    adjust = [lambda y: TF.adjust_brightness(y, brightness), lambda y: TF.adjust_contrast(y, contrast),
              lambda y: TF.adjust_saturation(y, saturation), lambda y: TF.adjust_hue(y, hue)]
    for which in order:
        x = adjust[int(which)](x)
    return x


def _combo(x, degrees, severity):
    """The official ``combo,<severity>``: keep the central rows (256 − 128·severity of 256),
    flip horizontally, rotate, resize back to the square."""
    import torchvision.transforms.v2.functional as TF

    size = x.shape[-1]
    kept_rows = size - int(size / 2 * severity)
    x = TF.horizontal_flip(TF.center_crop(x, [kept_rows, size]))
    return TF.resize(TF.rotate(x, degrees), [size, size], antialias=True)


def _jpeg(x, quality):
    """JPEG round trip through Pillow (torchvision's encoder is deprecated)."""
    import io

    from PIL import Image

    out = []
    for image in x.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


# The sampled strengths follow the official create_queries.py: rotation and the combined
# edit at its mildest severity, 0.25 (RandomRotation over ±int(90 · 0.25) = ±22 degrees);
# blur as its GaussianBlur(5) (σ drawn from [0.1, 2]); jitter as its ColorJitter(brightness=1,
# contrast=0.5, saturation=1, hue=0.1), the four adjustments in a random order. Crop, flip,
# stretch and JPEG have fixed strengths, as crop, flip and stretch do in the official code.
SEVERITY = 0.25
MAX_DEGREES = int(90 * SEVERITY)
BLUR_KERNEL, BLUR_SIGMA = 5, (0.1, 2.0)
JITTER_RANGES = {"brightness": (0.0, 2.0), "contrast": (0.5, 1.5), "saturation": (0.0, 2.0), "hue": (-0.1, 0.1)}


def edit_strengths(name: str, n: int, seed: int) -> list[dict]:
    """The strength of edit ``name`` for each of ``n`` queries, drawn as the paper's code
    draws them (one draw per query image). The stream depends on (seed, edit) only, so
    every watermark's copy of a query gets the same edit, and a query's draw does not
    depend on which other edits run. Edits with fixed strengths give empty dicts."""
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name in ("rotate", "combo"):
        return [{"degrees": float(d)} for d in rng.uniform(-MAX_DEGREES, MAX_DEGREES, n)]
    if name == "blur":
        return [{"sigma": float(s)} for s in rng.uniform(*BLUR_SIGMA, n)]
    if name == "jitter":
        return [{"order": rng.permutation(4).tolist(),
                 **{k: float(rng.uniform(low, high)) for k, (low, high) in JITTER_RANGES.items()}} for _ in range(n)]
    return [{} for _ in range(n)]


def _edit_fns() -> dict[str, tuple[str, Callable[..., torch.Tensor]]]:
    """Each edit: its description and a function of (images N,3,H,W; one image's strengths)."""
    import torchvision.transforms.v2.functional as TF

    return {
        "none": ("the watermarked image itself", lambda x: x),
        "rotate": (f"rotation by an angle drawn per query from [−{MAX_DEGREES}°, {MAX_DEGREES}°] (black corners)",
                   lambda x, degrees: _rotate(x, degrees)),
        "crop": ("centre crop keeping 60% of the side, resized back", lambda x: _centre_crop(x, 0.6)),
        "flip": ("horizontal flip", TF.horizontal_flip),
        "stretch": ("horizontal stretch by 1.3, centre part kept", lambda x: _stretch(x, 1.3)),
        "blur": (f"Gaussian blur, {BLUR_KERNEL}×{BLUR_KERNEL} kernel, σ drawn per query from "
                 f"[{BLUR_SIGMA[0]}, {BLUR_SIGMA[1]}] px",
                 lambda x, sigma: TF.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])),
        "jitter": ("colour jitter drawn per query: brightness and saturation factors from [0, 2], contrast "
                   "from [0.5, 1.5], hue shift from [−0.1, 0.1], in a random order (torchvision's ColorJitter)",
                   _jitter),
        "jpeg": ("JPEG at quality 30 (Pillow)", lambda x: _jpeg(x, 30)),
        "combo": (f"central {100 - 50 * SEVERITY:g}% of the rows, horizontal flip, rotation drawn per query "
                  f"from [−{MAX_DEGREES}°, {MAX_DEGREES}°], resized back (the official combo at severity {SEVERITY})",
                  lambda x, degrees: _combo(x, degrees, SEVERITY)),
    }


EDITS = tuple(_edit_fns())


def describe_edits() -> dict[str, str]:
    return {name: what for name, (what, _) in _edit_fns().items()}


def apply_edit(name: str, images: np.ndarray, *, seed: int) -> np.ndarray:
    """The query edit ``name`` applied to uint8 RGB images (N, H, W, 3); same shape back.
    Image i gets the i-th of :func:`edit_strengths`' draws for ``seed``, so the same
    seed gives the same edits."""
    fns = _edit_fns()
    if name not in fns:
        raise ValueError(f"edit {name!r}; choose one of: {', '.join(fns)}")
    if len(images) == 0:
        return np.array(images, copy=True)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    edit = fns[name][1]
    strengths = edit_strengths(name, len(x), seed)
    if not any(strengths):  # a fixed strength: the whole batch at once
        out = edit(x)
    else:
        out = torch.cat([edit(x[i:i + 1], **s) for i, s in enumerate(strengths)])
    return out.permute(0, 2, 3, 1).contiguous().numpy()


# ----------------------------------------------------------------------------- images and embeddings

def prepare_images(images: np.ndarray, size: int) -> np.ndarray:
    """Upscale uint8 RGB images to ``size`` x ``size`` (bicubic, antialiased)."""
    import torchvision.transforms.v2.functional as TF

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = [TF.resize(x[i:i + 256], [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
           for i in range(0, len(x), 256)]
    return torch.cat(out).permute(0, 2, 3, 1).contiguous().numpy()


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour images, for the smoke preset and the tests."""
    import torchvision.transforms.v2.functional as TF

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8))
    return TF.resize(coarse, [size, size], antialias=True).permute(0, 2, 3, 1).contiguous().numpy()


IMAGE_SOURCES = ("cifar10", "synthetic", "folder:<path>")


def _folder_images(folder: str) -> np.ndarray:
    from PIL import Image

    files = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"images='folder:{folder}': no .png/.jpg/.jpeg/.webp files there")
    out = []
    for f in files:  # centre square crop, kept at a common size before the final resize
        im = Image.open(f).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        out.append(np.asarray(im.crop((left, top, left + side, top + side)).resize((256, 256), Image.BICUBIC)))
    return np.stack(out)


def reference_images(source: str, n: int, size: int, seed: int) -> np.ndarray:
    """``n`` reference images drawn at random (seeded) from ``source``, at ``size`` px:
    ``cifar10`` (the test set), ``synthetic``, or ``folder:<path>`` (any image folder)."""
    if source == "synthetic":
        return synthetic_images(n, size, seed)
    if source == "cifar10":
        from . import data

        pool = data.cifar10_test()[0]
    elif source.startswith("folder:"):
        pool = _folder_images(source.removeprefix("folder:"))
    else:
        raise ValueError(f"images={source!r}; choose one of: {', '.join(IMAGE_SOURCES)}")
    if n > len(pool):
        raise ValueError(f"n_reference={n} but {source} has {len(pool)} images")
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    return prepare_images(pool[pick], size)


class Embedder:
    """L2-normalised image embeddings from a registry model (DREW's retrieval space).

    - ``efficientnet-lite0`` (book): the mean-pooled 1280-d feature map, TF-Lite input
      normalisation, at the images' own size;
    - hub image encoders (paper): DINOv2 mean-pooled last hidden state (as the official
      code), CLIP's projected image embedding; their own image processor prepares input.

    The model sits on ``device`` (one device: a ViT fits any GPU); images go there a batch
    at a time and the embeddings come back to the host in float32, where FAISS searches.
    """

    def __init__(self, name: str, preset: str, device: str = "cpu", batch_size: int = 64):
        from . import models

        self.loaded = models.load(name, preset=preset, device=device)
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        self.kind = self.loaded.spec.kind
        if self.kind == "image-classifier":  # the registry builds its tiny EfficientNet on the CPU
            self.loaded.model.to(self.device)

    @torch.inference_mode()
    def _batch(self, images: np.ndarray) -> torch.Tensor:
        model = self.loaded.model
        if self.kind == "image-classifier":  # EfficientNet-Lite
            from .models import efficientnet_input

            return model.extract_features(efficientnet_input(images).to(self.device)).mean((2, 3)).float().cpu()
        inputs = self.loaded.tokenizer(images=list(images), return_tensors="pt")  # the image processor
        out = model(pixel_values=inputs["pixel_values"].to(model.device))
        if hasattr(out, "image_embeds"):  # CLIP
            return out.image_embeds.float().cpu()
        return out.last_hidden_state.mean(1).float().cpu()

    def __call__(self, images: np.ndarray, progress: str | None = None) -> np.ndarray:
        from tqdm.auto import tqdm

        starts = range(0, len(images), self.batch_size)
        if progress:
            starts = tqdm(starts, desc=progress, unit="batch")
        feats = torch.cat([self._batch(images[i:i + self.batch_size]) for i in starts])
        return torch.nn.functional.normalize(feats, dim=1).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- retrieval


class Index:
    """Top-1 inner-product search over the reference embeddings (FAISS), over all of
    them or over one cluster's."""

    def __init__(self, embeddings: np.ndarray, clusters: np.ndarray):
        import faiss

        self.faiss = faiss
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.members = {int(c): np.flatnonzero(clusters == c).astype(np.int64) for c in np.unique(clusters)}

    def search_all(self, queries: np.ndarray) -> np.ndarray:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)[1][:, 0]

    def search_within(self, queries: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """Top-1 for each query among the members of its given cluster."""
        top = np.full(len(queries), -1, dtype=np.int64)
        for cluster in np.unique(clusters):
            rows = np.flatnonzero(clusters == cluster)
            members = self.members.get(int(cluster))
            if members is None:  # a decoded index that names no cluster
                continue
            params = self.faiss.SearchParameters(sel=self.faiss.IDSelectorBatch(members))
            top[rows] = self.index.search(np.ascontiguousarray(queries[rows], dtype=np.float32), 1,
                                          params=params)[1][:, 0]
        return top


def retrieve(index: Index, queries: np.ndarray, decoded: np.ndarray, confidence: np.ndarray,
             threshold: float) -> np.ndarray:
    """DREW's retrieval (step 3): search the decoded cluster when the decoding is
    confident, everything otherwise."""
    top = index.search_all(queries)
    sure = confidence >= threshold
    if sure.any():
        top[sure] = index.search_within(queries[sure], decoded[sure])
    return top


# ----------------------------------------------------------------------------- the experiment

RETRIEVALS = ("baseline", "DREW", "DREW without ECC", "oracle cluster")


def watermark_all(images: np.ndarray, clusters: np.ndarray, code: ClusterCode, mark: Watermark,
                  batch: int = 64, progress: bool = True) -> np.ndarray:
    """Every reference image watermarked with its cluster's key (the published dataset).

    RivaGAN takes ~55 ms an image on two CPU cores, so the result is cached outside the
    repo under a hash of the images, the keys, the watermark's code and library versions,
    and verified on every load."""
    from importlib import metadata

    from tqdm.auto import tqdm

    from .paths import cache_dir, cached_dir, code_hash

    bits = payload(code, clusters, mark.payload_bits)
    versions = "".join(f"{p}={metadata.version(p)}" for p in ("invisible-watermark", "onnxruntime", "opencv-python")
                       if _installed(p))
    digest = hashlib.sha256(str(images.shape).encode() + np.ascontiguousarray(images).tobytes() + bits.tobytes()
                            + versions.encode() + code_hash(type(mark).embed, watermark_all).encode()).hexdigest()[:20]
    folder = cache_dir("drew") / f"{mark.name}-{digest}"

    def build(tmp: Path) -> dict:
        out = np.empty_like(images)
        for i in tqdm(range(0, len(images), batch), desc=f"watermark references ({mark.name})", disable=not progress):
            out[i:i + batch] = mark.embed(images[i:i + batch], bits[i:i + batch])
        np.save(tmp / "marked.npy", out)
        return {"watermark": mark.name, "code": code.name, "images": len(images), "versions": versions}

    cached_dir(folder, build)  # verified on every load (sha256): a damaged entry is watermarked again, never served
    return np.load(folder / "marked.npy")


def _installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


@dataclass
class Reference:
    """The reference set: the clusters, the watermarked images (one published set per
    watermark) and one search index per (watermark, embedder)."""

    clusters: np.ndarray
    marked: dict[str, np.ndarray]
    indexes: dict[tuple[str, str], Index]


def build_reference(images: np.ndarray, clusters: np.ndarray, code: ClusterCode, marks: dict[str, Watermark],
                    embedders: dict[str, Embedder], progress: bool = True) -> Reference:
    """Watermark the reference set with each watermark and index its embeddings."""
    marked = {name: watermark_all(images, clusters, code, mark, progress=progress) for name, mark in marks.items()}
    indexes = {(m, e): Index(embed(marked[m], progress=f"embed references ({m}, {e})" if progress else None), clusters)
               for m in marks for e, embed in embedders.items()}
    return Reference(clusters, marked, indexes)


def run_queries(reference: Reference, query_ids: np.ndarray, marks: dict[str, Watermark],
                code: ClusterCode, embedders: dict[str, Embedder], edits: tuple[str, ...],
                threshold: float, seed: int, progress: bool = True) -> pd.DataFrame:
    """Take each query's watermarked reference image, apply every edit (strengths drawn
    per query from ``seed``: each watermark's copy of a query gets the same edit), read
    the watermark back and retrieve four ways with every embedder. One row per
    (watermark, edit, embedder, query)."""
    from tqdm.auto import tqdm

    rows = []
    true_clusters = reference.clusters[query_ids]
    bar = tqdm(total=len(marks) * len(edits), desc="watermark x edit", disable=not progress)
    for mark_name, mark in marks.items():
        sent = payload(code, true_clusters, mark.payload_bits)
        marked = reference.marked[mark_name][query_ids]
        for edit in edits:
            edited = apply_edit(edit, marked, seed=seed)
            received = mark.extract(edited)
            decoded, confidence = code.decode(received)
            raw = code.raw_clusters(received)
            for embedder_name, embed in embedders.items():
                queries, index = embed(edited), reference.indexes[(mark_name, embedder_name)]
                rows.append(pd.DataFrame({
                    "watermark": mark_name, "edit": edit, "embedder": embedder_name, "query": query_ids,
                    "true_cluster": true_clusters, "decoded_cluster": decoded, "confidence": confidence,
                    "bit_errors": (received[:, :code.n] != sent[:, :code.n]).sum(1),
                    "baseline": index.search_all(queries) == query_ids,
                    "DREW": retrieve(index, queries, decoded, confidence, threshold) == query_ids,
                    "DREW without ECC": index.search_within(queries, raw) == query_ids,
                    "oracle cluster": index.search_within(queries, true_clusters) == query_ids,
                    # what DREW finds when it trusts the decoded cluster (the threshold sweep)
                    "in decoded cluster": index.search_within(queries, decoded) == query_ids,
                }))
            bar.update()
    bar.close()
    return pd.concat(rows, ignore_index=True)


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1 accuracy per (embedder, watermark, edit) for each retrieval."""
    return rows.groupby(["embedder", "watermark", "edit"], sort=False)[list(RETRIEVALS)].mean()


def gated_top1(rows: pd.DataFrame, threshold: float) -> np.ndarray:
    """DREW's top-1 outcome for each of ``run_queries``' rows at gate threshold τ
    (Algorithm 1): the decoded cluster's search where the confidence reaches τ, the
    full search otherwise. Every τ is judged on the same queries, watermark reads and
    searches; ``run_queries``' own "DREW" column is this at the τ it was given."""
    sure = rows["confidence"].to_numpy() >= threshold
    return np.where(sure, rows["in decoded cluster"].to_numpy(), rows["baseline"].to_numpy())


def gate_curve(rows: pd.DataFrame, thresholds: np.ndarray) -> pd.DataFrame:
    """The ECC gate as its threshold moves, pooled over edits: the share of queries
    that search one cluster (coverage), how often that cluster is the right one
    (precision), and DREW's top-1 accuracy."""
    out = []
    for threshold in thresholds:
        sure = rows["confidence"] >= threshold
        right = rows["decoded_cluster"] == rows["true_cluster"]
        top1 = gated_top1(rows, threshold)
        for (embedder, mark), part in rows.groupby(["embedder", "watermark"], sort=False):
            idx = part.index
            n_sure = int(sure[idx].sum())
            out.append({"embedder": embedder, "watermark": mark, "threshold": float(threshold), "coverage": sure[idx].mean(),
                        "precision": (right[idx] & sure[idx]).sum() / n_sure if n_sure else np.nan,
                        "false_accepts": int((~right[idx] & sure[idx]).sum()), "DREW": top1[idx].mean()})
    return pd.DataFrame(out)


def paired_gain(better: np.ndarray, worse: np.ndarray, seed: int, n_boot: int = 2000,
                level: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference of two 0/1 outcome vectors (in points of accuracy), with a
    percentile-bootstrap interval over the queries."""
    diff = np.asarray(better, dtype=float) - np.asarray(worse, dtype=float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return 100 * diff.mean(), 100 * low, 100 * high
