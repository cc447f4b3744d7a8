"""uint8 image arrays to the float tensors a model reads, and back.

One scaling for every chapter that feeds pixels to a model it trains or loads: chapter 05's
diffusion backbone and CLIP, chapter 07's RivaGAN watermark (its ONNX encoder reads [-1, 1]
frames), chapter 09's ViTs (from scratch, and the pretrained ones with ImageNet's
statistics) and chapter 10's patch encoder. EfficientNet-Lite's own TF-Lite
normalisation stays with its loader (``models.efficientnet_input``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# [-1, 1]: what a ViT trained from scratch here, SD's VAE and the book's CLIPs read
HALF = (0.5, 0.5, 0.5)
# ImageNet-1k's channel statistics, what the pretrained ViT and DINOv2 checkpoints were trained with
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_tensor(images: np.ndarray, size: int | None = None, mean=HALF, std=HALF) -> torch.Tensor:
    """uint8 RGB images (N, H, W, 3) -> float32 (N, 3, H, W), ``(x / 255 - mean) / std`` per
    channel; resized to ``size`` x ``size`` (bilinear, on the [0, 1] values) if given.

    With the default statistics this is the [-1, 1] scaling, bit for bit ``x / 127.5 - 1``
    (255 · 0.5 and 0.5 / 0.5 are exact in float32; ``tests/test_images.py`` checks all 256
    values), so the chapters that scaled that way kept their numbers when it moved here."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        described = (f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray)
                     else type(images).__name__)
        raise ValueError(f"images: {described}; expected a uint8 array (N, H, W, 3) of RGB images")
    import torch  # here, not at the top: the modules that import this one load torch only when they compute

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    if size is not None and tuple(x.shape[-2:]) != (size, size):  # a non-square image of the right width too
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 RGB images (N, H, W, 3): :func:`to_tensor`'s
    inverse at the default statistics (values outside [-1, 1] are clipped)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
