"""Heads on frozen features: the linear probe's logistic regression, which the probe fits per fold
(:mod:`cellmorph.cv.probe`) and the fine-tune can start its classifier from (``head_init probe``), and the
probe as a network (:class:`ProbeNetwork`) that a model bundle saves and ``predict`` runs.

Both of the probe's heads are linear in the profile: the centroid head's logits are the standardised
profile's dot products with the unit centroids (divided by a temperature), the logistic regression's its
decision function. :class:`LinearProbeHead` is that common form, so one network and one file format serve
either head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellmorph.augment import tta_views
from cellmorph.errors import CellmorphError

# The tensors of a saved probe head (:meth:`LinearProbeHead.state`), by name → number of dimensions.
PROBE_HEAD_TENSORS = {"weight": 2, "bias": 1, "mean": 1, "scale": 1, "temperature": 0, "classes_index": 1}


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


@dataclass(frozen=True)
class LinearProbeHead:
    """softmax((((x − mean) / scale) · weightᵀ + bias) / temperature) over ``classes_index`` (the class numbers
    that had training cells; a class without any gets probability 0)."""

    weight: np.ndarray  # (k, d)
    bias: np.ndarray  # (k,)
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,), > 0
    temperature: float
    classes_index: np.ndarray  # (k,) int

    @classmethod
    def from_logistic(cls, head, scaler) -> "LinearProbeHead":
        """A fitted scikit-learn ``LogisticRegression`` on ``StandardScaler`` output. A two-class one keeps a
        single decision function z, and its probabilities (1 − σ(z), σ(z)) are the softmax of (0, z)."""
        coef, intercept = np.asarray(head.coef_, float), np.asarray(head.intercept_, float)
        if coef.shape[0] == 1 and len(head.classes_) == 2:
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        return cls(coef, intercept, np.asarray(scaler.mean_, float), np.asarray(scaler.scale_, float), 1.0,
                   np.asarray(head.classes_, np.int64))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (((np.asarray(x, float) - self.mean) / self.scale) @ self.weight.T + self.bias) / self.temperature

    def predict_proba(self, x: np.ndarray, n_classes: int) -> np.ndarray:
        """(n, ``n_classes``) probabilities; 0 for the classes the head has no training cells of."""
        from scipy.special import softmax

        out = np.zeros((len(x), n_classes))
        out[:, self.classes_index] = softmax(self.logits(x), axis=1)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a bundle saves (float64: the head is fitted and applied in double precision)."""
        def tensor(values, dtype) -> torch.Tensor:  # a copy: the fitted arrays may be read-only views
            return torch.from_numpy(np.array(values, dtype=dtype, copy=True))

        return {"weight": tensor(self.weight, np.float64), "bias": tensor(self.bias, np.float64),
                "mean": tensor(self.mean, np.float64), "scale": tensor(self.scale, np.float64),
                "temperature": torch.tensor(float(self.temperature), dtype=torch.float64),
                "classes_index": tensor(self.classes_index, np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "LinearProbeHead":
        return cls(state["weight"].double().numpy(), state["bias"].double().numpy(), state["mean"].double().numpy(),
                   state["scale"].double().numpy(), float(state["temperature"]), state["classes_index"].long().numpy())


def probe_head_problem(state: dict[str, torch.Tensor], n_classes: int, dim: int | None) -> str | None:
    """Why ``state`` is not a probe head for ``n_classes`` classes on ``dim``-long profiles (None if it is)."""
    for name, ndim in PROBE_HEAD_TENSORS.items():
        if name not in state:
            return f"no {name!r} tensor"
        if state[name].dim() != ndim:
            return f"{name!r} has {state[name].dim()} dimensions, not {ndim}"
    unexpected = sorted(set(state) - set(PROBE_HEAD_TENSORS))
    if unexpected:
        return f"unexpected tensor {unexpected[0]!r}"
    k, d = state["weight"].shape
    index = state["classes_index"]
    if not 1 <= k <= n_classes or tuple(state["bias"].shape) != (k,) or tuple(index.shape) != (k,):
        return f"weight {tuple(state['weight'].shape)}, bias {tuple(state['bias'].shape)} and classes_index " \
               f"{tuple(index.shape)} do not make a head of at most {n_classes} classes"
    if index.dtype != torch.int64 or len(set(index.tolist())) != k or not all(0 <= i < n_classes for i in index.tolist()):
        return f"classes_index must be {k} distinct class numbers from 0 to {n_classes - 1}"
    if tuple(state["mean"].shape) != (d,) or tuple(state["scale"].shape) != (d,):
        return f"mean {tuple(state['mean'].shape)} and scale {tuple(state['scale'].shape)} must have the weight's {d} columns"
    if dim is not None and d != dim:
        return f"the head takes {d}-long profiles, the backbone's features are {dim} long"
    finite = all(bool(torch.isfinite(state[n].double()).all()) for n in ("weight", "bias", "mean", "scale", "temperature"))
    if not finite or not bool((state["scale"] > 0).all()) or not float(state["temperature"]) > 0:
        return "values must be finite, with scale and temperature above 0"
    return None


class ProbeNetwork(nn.Module):
    """A frozen backbone's profile (a :class:`~cellmorph.models.features.FeatureExtractor`) followed by a
    :class:`LinearProbeHead`: logits over ``n_classes`` (−inf for a class the head has no cells of).

    ``tta="dihedral"`` averages the *profile* over the tile's dihedral views before the head, as the linear
    probe's cross-validation embedded its tiles (:func:`cellmorph.models.embedding.embed_tiles`); the head is
    applied in double precision, as it was fitted. It is a module like any classifier: ``predict`` scores
    tiles with it, and Grad-CAM can explain it."""

    def __init__(self, extractor: nn.Module, head: LinearProbeHead, n_classes: int, tta: str = "none") -> None:
        super().__init__()
        if tta not in ("none", "dihedral"):
            raise CellmorphError(f"tta must be none or dihedral, got {tta!r}")
        self.extractor, self.num_classes, self.tta = extractor, int(n_classes), tta  # num_classes: timm's name
        # The backbone's feature stages that the profile uses (the later ones never run), as paths in this
        # module: Grad-CAM's default layer is the deepest of them (cellmorph.visualize.gradcam_layer).
        info = getattr(getattr(extractor, "model", None), "feature_info", None)
        spec = getattr(extractor, "spec", None)
        if isinstance(info, list) and info and spec is not None:
            used = len(info) if spec.is_head else max(spec.layers) + 1
            self.feature_info = [dict(item, module=f"extractor.model.{item['module']}") for item in info[:used]]
        for name, tensor in head.state().items():
            self.register_buffer(name, tensor)

    def train(self, mode: bool = True) -> "ProbeNetwork":
        super().train(mode)
        self.extractor.eval()  # frozen: its batch-norm statistics are the pretrained ones, always
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = tta_views(x, self.tta)
        # the views' mean in float32, as the embeddings the head was fitted on were averaged and stored
        profile = (sum(self.extractor(v).float() for v in views) / len(views)).double()
        with torch.autocast(device_type=x.device.type, enabled=False):  # the head in double, also under AMP
            logits = ((profile - self.mean) / self.scale) @ self.weight.T + self.bias
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), dtype=torch.float64, device=x.device)
        out[:, self.classes_index] = logits / self.temperature
        return out
