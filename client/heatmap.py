"""The re-weighting map as a heat-map overlay on the image the model saw.

3G-Net's last re-weighting stage gives every position of the feature map a weight
in (0, 1): how much that region counts in the generalized-Gaussian covariance.
The covariance is divided by its trace before the matrix square root, so only the
weights relative to each other matter; the overlay therefore stretches the map's
own minimum..maximum over the colour scale. NumPy + Pillow only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FLAT = 1e-3  # relative spread under which a weight map counts as flat

# A dark-to-bright scale (close to matplotlib's "inferno"): low weight dark purple, high weight yellow.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [
        [0, 0, 4],
        [87, 16, 110],
        [188, 55, 84],
        [249, 142, 9],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) to uint8 RGB (shape + (3,))."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def is_flat(weights: np.ndarray) -> bool:
    """No region preferred (as in an untrained model): the weights differ by at most
    ``FLAT`` of the largest, which is rounding noise, not a pattern worth colouring."""
    low, high = float(np.min(weights)), float(np.max(weights))
    return high - low <= FLAT * abs(high)


def normalize(weights: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1]; a flat map becomes all 0.5."""
    w = np.asarray(weights, dtype=np.float64)
    if is_flat(w):
        return np.full_like(w, 0.5)
    return (w - w.min()) / (w.max() - w.min())


def overlay(image: np.ndarray, weights: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the colour-mapped ``weights`` (h x w) over ``image`` (H x W x 3 uint8, the
    resized and centre-cropped model input), upsampling the map bilinearly."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    if weights.ndim != 2:
        raise ValueError(f"weights must be h x w, got shape {weights.shape}")
    height, width = image.shape[:2]
    small = Image.fromarray(normalize(weights).astype(np.float32))
    upsampled = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colormap(upsampled).astype(np.float64)
    return Image.fromarray(np.rint(blended).astype(np.uint8))
