"""The linear probe: a logistic-regression head per fold on frozen-backbone embeddings."""

from __future__ import annotations

import numpy as np
import torch

from cellmorph.cv.features import ProbeFeatures
from cellmorph.cv.splits import Fold, subsample_rows


def fit_probe_head(x_train: np.ndarray, y_train: np.ndarray, class_weighting: bool, seed: int):
    """(logistic regression, scaler) fitted on the training rows only (standardised inside the fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these (n × 1280) problems are too small to share, and multi-threaded
    # BLAS spin-waits made each fold ~9× slower beside other work (benchmarks/RESULTS.md).
    with threadpool_limits(limits=1):
        scaler = StandardScaler().fit(x_train)
        head = LogisticRegression(
            max_iter=2000, class_weight="balanced" if class_weighting else None, random_state=seed
        ).fit(scaler.transform(x_train), y_train)
    return head, scaler


def run_probe_fold(plan, fold: Fold, features: ProbeFeatures):
    """A logistic-regression head on the fold's training embeddings; its held-out probabilities."""
    from cellmorph.cv.run import TrainedFold

    cfg, seeds, targets = plan.config, plan.seeds[fold.index], plan.targets
    train_rows = subsample_rows(fold.train, targets[fold.train], cfg.max_tiles_per_fold, seeds["subsample"])
    head, scaler = fit_probe_head(features.take(train_rows), targets[train_rows], cfg.class_weighting, seeds["init"])
    probs = np.zeros((len(fold.test), len(plan.classes)), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(scaler.transform(features.take(fold.test)))
    state = {
        "coef": torch.from_numpy(head.coef_.astype(np.float32)),
        "intercept": torch.from_numpy(head.intercept_.astype(np.float32)),
        "classes_index": torch.from_numpy(head.classes_.astype(np.int64)),
        "scaler_mean": torch.from_numpy(scaler.mean_.astype(np.float32)),
        "scaler_scale": torch.from_numpy(scaler.scale_.astype(np.float32)),
    }
    return TrainedFold(train_rows, probs, [], state, {})
