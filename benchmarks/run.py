"""Throughput of cellmorph's training and embedding against this machine's limit, in one run.

    python benchmarks/run.py [--models resnet50,tf_efficientnet_lite0] [--repeats 5] [--quick]

Prints, per model, a naive eager timm loop and cellmorph's own ``train.fit`` / ``embed.embed_tiles``
(images/s, medians over repeats), each as a % of the fp32 matmul peak measured in the same
process (achieved FLOP/s ÷ matmul FLOP/s, FLOPs counted by ``torch.utils.flop_counter``), and
ends with one JSON line::

    {"matmul_gflops": …, "models": {NAME: {"train_img_s": …, "naive_train_img_s": …, "embed_img_s": …,
     "naive_embed_img_s": …, "train_pct_peak": …, "embed_pct_peak": …, …}}}

What is compared (same model, input size, batch size and thread count):

* naive train: ``timm.create_model`` in NCHW, ``model.train()``, SGD on a fixed random batch
  (no data loading at all, so it flatters the naive loop);
* cellmorph train: ``cellmorph.train.fit`` on a real tile cache (uint8 tiles pre-resized to the
  model's input size by ``prepare --tile-size``, the paper's augmentation, class-weighted loss)
  with its CPU fast paths: channels-last and, by default, the first stages frozen;
* naive embed: NCHW eval forward under ``torch.no_grad``;
* cellmorph embed: ``cellmorph.embed.embed_tiles`` (channels-last, ``inference_mode``) on the cache.

FLOPs are those of the work actually done: a frozen stem needs no backward pass, so its
backward FLOPs are not counted. Timings are medians over ``--repeats`` batches (train) or
passes (embed) after warm-up, because this machine is shared and noisy. GPU figures are
reported when CUDA is available (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODELS = ("resnet50", "tf_efficientnet_lite0")
# Frozen stages for cellmorph's CPU fine-tuning (`--freeze-stages`): ResNet50 trains layer4 + head
# (stem, layer1-3 frozen), EfficientNet-Lite0 trains blocks 3-6 + head (stem, blocks 0-2 frozen).
# ResNet50 already runs near the matmul peak eagerly, so only skipping backward work can speed
# it up: freezing stem + layer1 gave 1.49× naive, stem + layer1-3 gives ~2.9× (benchmarks/RESULTS.md).
FREEZE = {"resnet50": 4, "tf_efficientnet_lite0": 4}
BATCH = {"resnet50": 16, "tf_efficientnet_lite0": 32}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine limit
def matmul_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs) in ``dtype`` with the current thread count."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        a @ b
        _sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- FLOP counting
def flops_per_image(model: torch.nn.Module, size: int, train: bool, freeze: int = 0) -> float:
    """FLOPs per image: the forward pass as torch's flop counter sees it; training adds 2× the forward
    FLOPs of every stage that gets a backward pass (the usual backward ≈ 2 × forward convention).

    The convention is used rather than counting the backward ops because torch's counter
    prices a depthwise convolution's backward like a dense one (it reports ~40× the forward
    for EfficientNet-Lite0, ~3× for ResNet50). Frozen stages (the first ``freeze``) have no
    backward pass: nothing before them needs gradients.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from cellmorph.models import stage_names

    batch = 2
    model = _fresh_copy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    forward = counter.get_total_flops() / batch
    if not train:
        return forward
    counts = counter.get_flop_counts()
    root = type(model).__name__
    frozen = sum(
        sum(counts.get(f"{root}.{name}", {}).values()) for stage in stage_names(model)[:freeze] for name in stage
    ) / batch
    return forward + 2 * (forward - frozen)


def _fresh_copy(model):
    import copy

    return copy.deepcopy(model)


# --------------------------------------------------------------------------- naive loops
def naive_train(name: str, size: int, batch: int, repeats: int, device: str) -> float:
    import timm

    dev = torch.device(device)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=12).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 12, (batch,), device=dev)
    times = []
    for i in range(repeats + 2):
        _sync(dev)
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(dev)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def naive_embed(name: str, size: int, batch: int, repeats: int, device: str) -> float:
    import timm

    dev = torch.device(device)
    model = timm.create_model(name, pretrained=False, num_classes=0).to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            _sync(dev)
            t = time.perf_counter()
            model(x)
            _sync(dev)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


# --------------------------------------------------------------------------- cellmorph
def build_cache(root: Path, size: int | None) -> Path:
    """A tiny synthetic screen prepared with tiles pre-resized to ``size`` (the fast path; None keeps 96×120)."""
    from cellmorph.data.bbbc021 import load_bbbc021
    from cellmorph.data.synthetic import generate_bbbc021
    from cellmorph.preprocess import PrepareConfig, prepare

    screen, cache = root / "screen", root / f"cache{size or 'native'}"
    if not (screen / "BBBC021_v1_image.csv").is_file():
        generate_bbbc021(screen, preset="tiny", seed=0, progress=False)
    if not (cache / "manifest.json").is_file():
        prepare(load_bbbc021(screen, screen), cache, PrepareConfig(tile_size=size), progress=False)
    return cache


def cellmorph_train(name: str, cache_dir: Path, batch: int, repeats: int, device: str, freeze: int) -> float:
    from cellmorph.augment import Augmenter
    from cellmorph.cache import TileCache
    from cellmorph.datasets import InputPipeline
    from cellmorph.models import create_model, model_input_spec
    from cellmorph.train import TrainSettings, fit

    cache = TileCache(cache_dir)
    spec = model_input_spec(name)
    torch.manual_seed(0)
    model = create_model(name, 12, init="xavier")  # same arithmetic as ImageNet init, no weights needed
    pipeline = InputPipeline(spec.mean, spec.std, spec.size, Augmenter(seed=0))
    rows = np.arange(min(len(cache), batch * (repeats + 2)))
    targets = np.arange(len(rows)) % 12
    stamps: list[float] = []
    settings = TrainSettings(epochs=1, batch_size=batch, lr=1e-3, freeze_stages=freeze, channels_last=True)

    def on_batch():
        _sync(torch.device(device))
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    stamps.append(start)
    fit(model, pipeline, cache, rows, targets, 12, settings, 0, torch.device(device), on_batch=on_batch)
    steps = np.diff(stamps)[2:]  # the first two batches warm up oneDNN's kernels
    return batch / float(np.median(steps))


def cellmorph_embed(name: str, cache_dir: Path, batch: int, repeats: int, device: str) -> float:
    from cellmorph.cache import TileCache
    from cellmorph.embed import embed_tiles

    cache = TileCache(cache_dir)
    # Every tile of the cache (400), so building the network (part of every embed call) is amortised
    # as in a real run rather than dominating a few batches.
    rows = np.arange(len(cache))
    embed_tiles(cache, name, rows[:batch], init="xavier", batch_size=batch, device=device, progress=False)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        embed_tiles(cache, name, rows, init="xavier", batch_size=batch, device=device, progress=False)
        times.append(time.perf_counter() - t)
    return len(rows) / statistics.median(times)


def profile_train(name: str, size: int, batch: int, freeze: int, rows: int = 15) -> str:
    """torch.profiler table of cellmorph-style training steps (channels-last, frozen stages): where the time goes."""
    import timm
    from torch.profiler import ProfilerActivity, profile

    from cellmorph.models import freeze_stages

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=12).to(memory_format=torch.channels_last)
    norms = freeze_stages(model, freeze)
    model.train()
    for norm in norms:
        norm.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 12, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=None, help="where to build the synthetic cache (default a temp dir)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of the training step")
    parser.add_argument("--freeze", default="", help="override frozen stages, e.g. resnet50=4,tf_efficientnet_lite0=0")
    args = parser.parse_args(argv)

    import timm

    from cellmorph.models import model_input_spec

    # The host is shared: the matmul rate drifts between runs (149–192 GFLOP/s seen here). It is
    # measured before and after the models and the higher median is the peak, so % of peak is
    # conservative rather than flattered by a slow moment.
    peak_before = statistics.median(matmul_gflops(device=args.device) for _ in range(3))
    log(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {args.device}")
    log(f"fp32 matmul before the models: {peak_before:.1f} GFLOP/s (median of 3 × 10 runs of 2048³)")
    freeze_of = dict(FREEZE)
    for item in filter(None, args.freeze.split(",")):
        key, _, value = item.partition("=")
        freeze_of[key] = int(value)
    results: dict[str, dict] = {}
    raw: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="cellmorph-bench-") as tmp:
        work = args.work or Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            size = model_input_spec(name).size
            batch = BATCH.get(name, 16)
            freeze = freeze_of.get(name, 0)
            cache = build_cache(work, size)
            reference = timm.create_model(name, pretrained=False, num_classes=12)
            fwd = flops_per_image(reference, size, train=False)
            train_full = flops_per_image(reference, size, train=True)
            train_frozen = flops_per_image(reference, size, train=True, freeze=freeze)
            log(f"\n{name} @ {size}px, batch {batch}: forward {fwd / 1e9:.2f} GFLOP/img, "
                f"train {train_full / 1e9:.2f} GFLOP/img ({train_frozen / 1e9:.2f} with {freeze} stages frozen)")
            row: dict = {
                "naive_train_img_s": naive_train(name, size, batch, args.repeats, args.device),
                "naive_embed_img_s": naive_embed(name, size, batch, args.repeats, args.device),
                "train_img_s": cellmorph_train(name, cache, batch, args.repeats, args.device, freeze),
                "train_full_img_s": cellmorph_train(name, cache, batch, args.repeats, args.device, 0),
                "embed_img_s": cellmorph_embed(name, cache, batch, args.repeats, args.device),
            }
            raw[name] = (row, fwd, train_full, train_frozen, freeze, batch, size)
        peak_after = statistics.median(matmul_gflops(device=args.device) for _ in range(3))
        peak = max(peak_before, peak_after)
        log(f"\nfp32 matmul after the models: {peak_after:.1f} GFLOP/s; peak used: {peak:.1f} GFLOP/s")
        for name, (row, fwd, train_full, train_frozen, freeze, batch, size) in raw.items():
            row.update(
                {
                    "train_pct_peak": 100 * row["train_img_s"] * train_frozen / 1e9 / peak,
                    "train_full_pct_peak": 100 * row["train_full_img_s"] * train_full / 1e9 / peak,
                    "naive_train_pct_peak": 100 * row["naive_train_img_s"] * train_full / 1e9 / peak,
                    "embed_pct_peak": 100 * row["embed_img_s"] * fwd / 1e9 / peak,
                    "naive_embed_pct_peak": 100 * row["naive_embed_img_s"] * fwd / 1e9 / peak,
                    "train_speedup": row["train_img_s"] / row["naive_train_img_s"],
                    "embed_speedup": row["embed_img_s"] / row["naive_embed_img_s"],
                    "freeze_stages": freeze,
                    "batch": batch,
                    "input_size": size,
                    "gflop_forward": fwd / 1e9,
                    "gflop_train": train_full / 1e9,
                    "gflop_train_frozen": train_frozen / 1e9,
                }
            )
            results[name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            if args.profile:
                log(profile_train(name, size, batch, freeze))
            log(
                f"{name}\n  train  naive {row['naive_train_img_s']:6.1f} img/s ({row['naive_train_pct_peak']:4.1f}% peak) | "
                f"cellmorph {row['train_img_s']:6.1f} img/s ({row['train_pct_peak']:4.1f}%) = "
                f"{row['train_speedup']:.2f}× naive | all stages trained {row['train_full_img_s']:6.1f} img/s "
                f"({row['train_full_pct_peak']:4.1f}%)"
            )
            log(
                f"  embed  naive {row['naive_embed_img_s']:6.1f} img/s ({row['naive_embed_pct_peak']:4.1f}% peak) | "
                f"cellmorph {row['embed_img_s']:6.1f} img/s ({row['embed_pct_peak']:4.1f}%) = "
                f"{row['embed_speedup']:.2f}× naive"
            )
    summary = {
        "matmul_gflops": round(peak, 2),
        "matmul_gflops_before_after": [round(peak_before, 2), round(peak_after, 2)],
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
