"""Feature-set measures shared by the benchmark reports (numpy and scipy only, no ComfyUI)."""
from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def diversity(features: np.ndarray) -> float:
    """Mean pairwise cosine distance of L2-normalised features."""
    sims = features @ features.T
    n = len(features)
    return float((1 - sims[~np.eye(n, dtype=bool)]).mean()) if n > 1 else 0.0
