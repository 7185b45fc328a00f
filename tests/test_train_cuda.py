"""The training loop's CUDA paths: bf16 autocast by default, and CUDA-graph steps.

These run only where a GPU is (the suite skips them elsewhere; benchmarks/gpu.py runs them on
the lent GPU machine). The CPU suite covers everything else about ``fit``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cellmorph.augment import Augmenter
from cellmorph.datasets import InputPipeline
from cellmorph.errors import CellmorphError
from cellmorph.models import create_model, model_input_spec
from cellmorph.runtime import deterministic
from cellmorph.train import TrainSettings, fit, training_autocast_dtype
from tests.test_train import _toy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
CUDA = torch.device("cuda")


def _fit_on_gpu(settings: TrainSettings, n: int = 52, seed: int = 0):
    cache, labels = _toy(n=n)  # 52 tiles at batch 8: six full batches (graphed) and a last one of 4 (eager)
    torch.manual_seed(seed)
    model = create_model("test_resnet", 2, init="xavier")
    spec = model_input_spec("test_resnet", 16)
    pipeline = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=seed))
    with deterministic():
        history = fit(model, pipeline, cache, np.arange(n), labels, 2, settings, seed, CUDA)
    return history, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


SETTINGS = TrainSettings(epochs=3, batch_size=8, lr=0.01, lr_schedule="cosine", amp_dtype="bfloat16")


def test_bf16_is_the_default_where_the_gpu_computes_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert training_autocast_dtype(CUDA) == expected


def test_cuda_graph_steps_train_the_model_the_eager_steps_train():
    """Graph replay runs the eager step's kernels: per-epoch losses and the final weights agree to
    float rounding (cosine schedule: the graph is captured again each epoch at its new rate)."""
    eager_history, eager = _fit_on_gpu(replace(SETTINGS, cuda_graphs=False))
    graphed_history, graphed = _fit_on_gpu(replace(SETTINGS, cuda_graphs=True))
    assert [h["n_tiles"] for h in graphed_history] == [52] * 3
    assert np.allclose([h["loss"] for h in graphed_history], [h["loss"] for h in eager_history], rtol=1e-4)
    for key in eager:
        assert torch.allclose(graphed[key], eager[key], rtol=1e-4, atol=1e-5), key
    again_history, again = _fit_on_gpu(replace(SETTINGS, cuda_graphs=True))
    assert [h["loss"] for h in again_history] == [h["loss"] for h in graphed_history]
    assert all(torch.equal(again[k], graphed[k]) for k in graphed)
    auto_history, _ = _fit_on_gpu(SETTINGS)  # the default: graphs wherever they apply, as here
    assert [h["loss"] for h in auto_history] == [h["loss"] for h in graphed_history]


def test_a_float16_step_without_a_request_for_graphs_stays_eager():
    history, _ = _fit_on_gpu(replace(SETTINGS, amp_dtype="float16"))
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)


def test_cuda_graphs_refuse_a_loss_scaled_float16_step():
    settings = replace(SETTINGS, cuda_graphs=True, amp_dtype="float16")
    with pytest.raises(CellmorphError, match="cuda_graphs needs a step without a loss scale"):
        _fit_on_gpu(settings)
