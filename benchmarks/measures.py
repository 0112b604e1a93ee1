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


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success rate (scipy's binomtest)."""
    from scipy import stats

    if trials == 0:
        return 0.0, 1.0
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def paired_difference_interval(a: np.ndarray, b: np.ndarray, clusters: np.ndarray, confidence: float = 0.95,
                               seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over paired outcomes (same prompt and seed), with a bootstrap interval that
    resamples whole clusters (prompts): samples of one prompt are not independent.
    Returns (difference, low, high)."""
    from scipy import stats

    diff = np.asarray(b, float) - np.asarray(a, float)
    groups = np.unique(clusters)
    per_cluster = np.array([diff[clusters == g].mean() for g in groups])
    if len(groups) < 2 or np.ptp(per_cluster) == 0:
        return float(diff.mean()), float(diff.mean()), float(diff.mean())
    res = stats.bootstrap((per_cluster,), np.mean, confidence_level=confidence, n_resamples=5000,
                          method="percentile", random_state=seed)
    return float(diff.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)
