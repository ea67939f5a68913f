"""The weight-map overlay (client/heatmap.py): pure NumPy + Pillow, no server."""

from __future__ import annotations

import numpy as np
import pytest

from client.heatmap import colormap, normalize, overlay


def test_colormap_runs_dark_to_bright():
    rgb = colormap(np.linspace(0, 1, 11))
    assert rgb.shape == (11, 3) and rgb.dtype == np.uint8
    brightness = rgb.astype(int).sum(axis=1)
    assert np.all(np.diff(brightness) > 0)
    assert np.array_equal(colormap(np.array([-1.0, 2.0])), colormap(np.array([0.0, 1.0])))  # clipped


def test_normalize_stretches_and_keeps_a_flat_map_neutral():
    np.testing.assert_allclose(normalize(np.array([[0.4, 0.5], [0.6, 0.45]])), [[0, 0.5], [1, 0.25]])
    np.testing.assert_array_equal(normalize(np.full((3, 3), 0.5)), np.full((3, 3), 0.5))
    # float noise around a flat map (an untrained model's) is not stretched into a pattern
    nearly_flat = 0.5 + np.array([[-3e-8, 0.0], [2e-8, 6e-8]])
    np.testing.assert_array_equal(normalize(nearly_flat), np.full((2, 2), 0.5))
    np.testing.assert_allclose(normalize(np.array([[0.001, 0.002]])), [[0, 1]])  # small but relatively large


def test_overlay_puts_the_bright_colour_where_the_weight_is_high():
    image = np.full((64, 64, 3), 128, np.uint8)
    weights = np.zeros((4, 4), np.float32)
    weights[0, 3] = 1.0  # top-right cell
    out = np.asarray(overlay(image, weights, alpha=0.5))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    top_right, bottom_left = out[:8, -8:].astype(int).sum(), out[-8:, :8].astype(int).sum()
    assert top_right > bottom_left
    # alpha 0 gives the image back untouched
    np.testing.assert_array_equal(np.asarray(overlay(image, weights, alpha=0.0)), image)


def test_overlay_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="H x W x 3"):
        overlay(np.zeros((8, 8), np.uint8), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="h x w"):
        overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 2, 2)))
