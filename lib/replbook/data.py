"""Small offline data: what a chapter needs, from packages, never from a hub.

Photos shipped inside scikit-image's wheel (no download: ``skimage.data`` reads
the files that come with the package).
"""
from __future__ import annotations

import numpy as np

# name -> (skimage.data function, what is in it, the ImageNet classes a reader expects)
PHOTOS = {
    "chelsea": ("chelsea", "Chelsea the cat", ("tabby", "tiger cat", "Egyptian cat")),
    "coffee": ("coffee", "a cup of coffee", ("espresso", "cup", "coffee mug")),
    "rocket": ("rocket", "a rocket on its launch pad", ("missile", "projectile", "space shuttle")),
}


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped in scikit-image, by name."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of: {', '.join(PHOTOS)}")
    import skimage.data

    return getattr(skimage.data, PHOTOS[name][0])()
