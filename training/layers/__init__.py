"""Reusable building blocks of second-order (covariance) pooling heads."""

from training.layers.covariance import covariance_pool
from training.layers.gaussian_head import GlobalGaussianHead, full_precision
from training.layers.newton_schulz import sqrtm_newton_schulz
from training.layers.reweighting import ReweightingStage
from training.layers.triangular import TriangularVectorize, lower_triangle_index

__all__ = [
    "GlobalGaussianHead",
    "ReweightingStage",
    "TriangularVectorize",
    "covariance_pool",
    "full_precision",
    "lower_triangle_index",
    "sqrtm_newton_schulz",
]
