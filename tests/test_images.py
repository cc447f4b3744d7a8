"""The one pixel scaling chapters 05, 09 and 10 feed their models (replbook.images)."""
import numpy as np
import pytest
import torch

from replbook.images import IMAGENET_MEAN, IMAGENET_STD, to_tensor, to_uint8


def _images(n=2, height=5, width=7, seed=0):
    """Random uint8 RGB images, not square and not 3 wide, so a swapped axis shows."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def test_default_scaling_is_bit_for_bit_the_chapters_former_x_over_127_5_minus_1():
    """Chapters 05 and 10 scaled by x / 127.5 - 1 when their numbers were committed: every
    one of the 256 values must come out in exactly the same float32 bits."""
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    former = torch.as_tensor(every_value).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(to_tensor(every_value), former)
    assert to_tensor(every_value).dtype == torch.float32


def test_layout_and_per_channel_statistics_against_float64():
    images = _images()
    out = to_tensor(images, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert out.shape == (2, 3, 5, 7)  # (N, C, H, W): a transposed H and W would be (2, 3, 7, 5)
    expected = (images.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6)


def test_resize_is_bilinear_on_the_unit_range_values():
    images = _images(height=6, width=6, seed=1)
    out = to_tensor(images, 9, IMAGENET_MEAN, IMAGENET_STD)
    unit = torch.as_tensor(images, dtype=torch.float64).permute(0, 3, 1, 2) / 255
    resized = torch.nn.functional.interpolate(unit, size=(9, 9), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    expected = (resized - mean[:, None, None]) / std[:, None, None]
    assert out.shape == (2, 3, 9, 9)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=0)
    # already the asked size: no resampling at all
    assert torch.equal(to_tensor(images, 6), to_tensor(images))


def test_a_non_square_image_is_resized_even_when_one_side_already_has_the_asked_size():
    """Only an image that is size x size already is left alone: checking one side only
    would hand a (6, 9) image to a model that reads 9 x 9."""
    for height, width in ((6, 9), (9, 6)):
        images = _images(height=height, width=width, seed=2)
        unit = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
        expected = torch.nn.functional.interpolate(unit, size=(9, 9), mode="bilinear", align_corners=False) / 0.5 - 1
        out = to_tensor(images, 9)
        assert out.shape == (2, 3, 9, 9)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_to_uint8_inverts_the_default_scaling_and_clips():
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert np.array_equal(to_uint8(to_tensor(every_value)), every_value)
    out_of_range = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(out_of_range)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("bad, shown", [
    (np.zeros((1, 4, 4, 3), dtype=np.float32), "float32 array of shape (1, 4, 4, 3)"),
    (np.zeros((1, 4, 4, 4), dtype=np.uint8), "uint8 array of shape (1, 4, 4, 4)"),
    (np.zeros((4, 4, 3), dtype=np.uint8), "uint8 array of shape (4, 4, 3)"),
    ([[0]], "list"),
])
def test_anything_but_a_batch_of_uint8_rgb_images_is_refused_in_one_line(bad, shown):
    with pytest.raises(ValueError) as refused:
        to_tensor(bad)
    message = str(refused.value)
    assert message.startswith(f"images: {shown}") and "uint8 array (N, H, W, 3)" in message and "\n" not in message
