"""What each CPU fast path buys, one at a time, in one process (medians over repeats).

    python benchmarks/fastpaths.py [--model tf_efficientnet_lite0] [--size 224] [--batch 32] [--repeats 7]

Training step (forward + backward + SGD step on a fixed batch):
  NCHW → channels-last → + frozen early stages → + their output precomputed
  (``--frozen-feature-cache``: only the trainable stages run) → + torch.compile.
Inference (forward only):
  no_grad NCHW → inference_mode NCHW → inference_mode channels-last → + torch.compile.
Input side (``cellmorph.datasets``): tiles resized on the fly from the cache's size vs
pre-resized in the cache; tile reading with 0 vs 1 worker process and pinned memory.

Prints a table on stderr and one JSON line on stdout. ``torch.compile`` (inductor, C++ backend)
is timed after its compilation, and the compile time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_cache  # noqa: E402  (same synthetic cache as the main harness)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _median_rate(step, batch: int, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(repeats + warmup):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def train_rates(name: str, size: int, batch: int, repeats: int, freeze: int, compile_: bool) -> dict:
    import timm

    from cellmorph.models import freeze_stages

    out = {}
    x0 = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 12, (batch,))
    variants = [("nchw", False, 0, False), ("channels_last", True, 0, False), ("channels_last+freeze", True, freeze, False)]
    if compile_:
        variants.append(("channels_last+freeze+compile", True, freeze, True))
    for label, cl, frz, comp in variants:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=12)
        frozen = freeze_stages(model, frz) if frz else []
        x = x0
        if cl:
            model = model.to(memory_format=torch.channels_last)
            x = x0.contiguous(memory_format=torch.channels_last)
        model.train()
        for norm in frozen:
            norm.eval()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        forward = torch.compile(model) if comp else model

        def step():
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        if comp:
            t = time.perf_counter()
            step()
            out["train_compile_seconds"] = time.perf_counter() - t
        out[f"train_{label}_img_s"] = _median_rate(step, batch, repeats)
        log(f"  train {label:32s} {out[f'train_{label}_img_s']:7.1f} img/s")
        if frz and not comp:
            # --frozen-feature-cache: the frozen stages' output is read, not computed, every step.
            from cellmorph.models.frozen import FrozenSplit

            split = FrozenSplit(model, x[:2])
            features = split.prefix(x).contiguous(memory_format=torch.channels_last)

            def tail_step():
                loss = F.cross_entropy(split.tail(features), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            key = "train_channels_last+freeze+frozen_feature_cache_img_s"
            out[key] = _median_rate(tail_step, batch, repeats)
            log(f"  train {'channels_last+freeze+feature_cache':32s} {out[key]:7.1f} img/s")
    return out


def inference_rates(name: str, size: int, batch: int, repeats: int, compile_: bool) -> dict:
    import timm

    out = {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    x = torch.randn(batch, 3, size, size)

    def run(m, inp, ctx):
        def step():
            with ctx():
                m(inp)
        return step

    out["embed_no_grad_nchw_img_s"] = _median_rate(run(model, x, torch.no_grad), batch, repeats)
    out["embed_inference_mode_nchw_img_s"] = _median_rate(run(model, x, torch.inference_mode), batch, repeats)
    cl_model = model.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out["embed_inference_mode_channels_last_img_s"] = _median_rate(run(cl_model, xcl, torch.inference_mode), batch, repeats)
    if compile_:
        compiled = torch.compile(cl_model)
        t = time.perf_counter()
        with torch.no_grad():
            compiled(xcl)
        out["embed_compile_seconds"] = time.perf_counter() - t
        out["embed_channels_last_compile_img_s"] = _median_rate(run(compiled, xcl, torch.no_grad), batch, repeats)
    for key, value in out.items():
        log(f"  {key:44s} {value:7.1f}")
    return out


def input_rates(cache_small: Path, cache_sized: Path, size: int, batch: int, repeats: int) -> dict:
    """Batches/s of the input side alone: read uint8 tiles → float → (resize) → augment → normalise."""
    from cellmorph.augment import Augmenter
    from cellmorph.cache import TileCache
    from cellmorph.datasets import InputPipeline, iterate_batches

    out = {}
    for label, path, workers in (("resize_on_the_fly", cache_small, 0), ("pre_resized", cache_sized, 0),
                                 ("pre_resized_1_worker_pinned", cache_sized, 1)):
        cache = TileCache(path)
        pipe = InputPipeline([0.5] * 3, [0.25] * 3, size, Augmenter(seed=0)).train()
        rows = np.arange(len(cache))
        n_batches = min(len(rows) // batch, repeats + 2)
        rows = rows[: n_batches * batch]
        start = time.perf_counter()
        seen = 0
        for tiles, _ in iterate_batches(cache, rows, batch, np.random.default_rng(0), workers, pin_memory=workers > 0):
            pipe(tiles)
            seen += len(tiles)
        out[f"input_{label}_img_s"] = seen / (time.perf_counter() - start)
        log(f"  input {label:32s} {out[f'input_{label}_img_s']:7.1f} img/s  (tiles {tuple(cache.tile_shape)})")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--freeze", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    log(f"{args.model} @ {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result = {"model": args.model, "size": args.size, "batch": args.batch, "threads": torch.get_num_threads()}
    result.update(train_rates(args.model, args.size, args.batch, args.repeats, args.freeze, not args.no_compile))
    result.update(inference_rates(args.model, args.size, args.batch, args.repeats, not args.no_compile))
    with tempfile.TemporaryDirectory(prefix="cellmorph-fastpaths-") as tmp:
        small = build_cache(Path(tmp), None)
        sized = build_cache(Path(tmp), args.size)
        result.update(input_rates(small, sized, args.size, args.batch, args.repeats))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
