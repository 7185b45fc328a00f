"""Linear heads fitted on frozen features: the linear probe's logistic regression, which the probe runs per fold
(:mod:`cellmorph.cv.probe`) and the fine-tune can start its classifier from (``head_init probe``)."""

from __future__ import annotations

import numpy as np


def fit_probe_head(x_train: np.ndarray, y_train: np.ndarray, class_weighting: bool, seed: int, c: float = 1.0):
    """(logistic regression, scaler) fitted on the training rows only (standardised inside the fold)."""
    # scikit-learn and threadpoolctl load here, for start-up time: only probe heads need them
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these (n × 1280) problems are too small to share, and multi-threaded
    # BLAS spin-waits made each fold ~9× slower beside other work (benchmarks/RESULTS.md).
    with threadpool_limits(limits=1):
        scaler = StandardScaler().fit(x_train)
        head = LogisticRegression(
            C=float(c), max_iter=2000, class_weight="balanced" if class_weighting else None, random_state=seed
        ).fit(scaler.transform(x_train), y_train)
    return head, scaler
