"""What the network looks at: images that maximise its filters (the paper's Fig. 5) and Grad-CAM.

::

    comparison = run_networks(RUN)                       # or bundle_networks(MODEL)
    paths = write_filter_comparison(comparison, OUT, FilterConfig(layers=("stage2", "stage3")))
    images = maximise_filters(network.module, "stage3", [0, 5], FilterConfig(), spec=network.input)
    overlays = gradcam_overlays(model, tiles_uint8, spec, target_classes)   # (n, h, w, 3) uint8

**Filter images.** A short gradient ascent on the input, as keras-vis did for the paper: start
from a seeded grey-plus-noise image, and at each step shift it by a random jitter, read the
layer's output through a forward hook (the forward pass stops there), and step (Adam) up the
mean activation of one channel minus an L2 penalty on the image; every few steps the image is
blurred a little, and it is always kept inside the range real tiles take (0–255 before the
network's mean/std normalisation, in which space it is optimised). The images of several
filters are optimised together as one batch (the network in eval mode, so they do not
interact). Seeded torch generators draw the start image and the jitter, and kernels run
deterministic, so one seed gives the same images on the same machine and thread count.
``--layers`` are timm feature stages (``stageK`` = ``model.feature_info[K]``, counted from 0 as
``--features`` counts them) or module paths (``layer3.1``, ``blocks.4``).

torch-lucent (last released 2021) was tried first: it imports and renders with torch 2.14, but
it pins kornia ≤ 0.4.1 (2020), declares pytest, coveralls and IPython as runtime requirements,
installs a top-level package named ``test``, draws from the global NumPy/torch RNGs, picks
``cuda:0`` at import, upsamples every image below 224 px to 224, and its default preprocessing
and colour decorrelation assume torchvision's ImageNet mean/std and RGB; so the ascent is
written out here (:func:`maximise_filters`).

**Grad-CAM** comes from the ``grad-cam`` package (``pytorch_grad_cam``), on the last timm
feature stage by default (``feature_info[-1]``: ``layer4`` of a ResNet, ``blocks.6`` of
EfficientNet-Lite0); heat maps are resized to the tile and laid over its first three channels
as red, green and blue.

Images here are uint8 (n, H, W, C) with the network's C input channels (3 for BBBC021's DNA,
tubulin and actin); figures show the first three as red, green and blue.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellmorph.config.visualize import DEFAULT_LAYERS, FilterConfig  # noqa: F401
from cellmorph.errors import CellmorphError, option
from cellmorph.figures import pyplot
from cellmorph.models.spec import InputSpec
from cellmorph.runinfo import atomic_path, require_output_dir, write_json
from cellmorph.runtime import deterministic, torch_threads


FILTERS_JSON = "filters.json"
_STAGE = re.compile(r"^stage(\d+)$")


@dataclass(frozen=True)
class NamedNetwork:
    """A network to look into: the module, the input it takes, and how figures name it."""

    label: str
    module: nn.Module
    input: InputSpec


@dataclass(frozen=True)
class Comparison:
    """The ImageNet network and the fine-tuned one of the same architecture (the paper's Fig. 5)."""

    model_name: str
    imagenet: NamedNetwork
    finetuned: NamedNetwork
    source: dict = field(default_factory=dict)  # kind (run | bundle), path, fold

    @property
    def networks(self) -> tuple[NamedNetwork, NamedNetwork]:
        return (self.imagenet, self.finetuned)


# --------------------------------------------------------------------------- layers
def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """``stageK`` (timm's ``feature_info[K]``) or a module path → (module path, module)."""
    modules = dict(model.named_modules())
    match = _STAGE.match(layer)
    if match:
        info = getattr(model, "feature_info", None)
        stages = [item["module"] for item in info] if isinstance(info, list) and info else []
        if not stages:
            raise CellmorphError(f"layer {layer}: {type(model).__name__} declares no timm feature stages; "
                                 "give module paths instead")
        k = int(match.group(1))
        if k >= len(stages):
            raise CellmorphError(f"layer {layer}: the network has stages stage0–stage{len(stages) - 1} "
                                 f"({', '.join(f'stage{i}={m}' for i, m in enumerate(stages))})")
        layer = stages[k]
    if layer not in modules or layer == "":
        import difflib

        close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; use stage0, stage1, … or a module path"
        raise CellmorphError(f"layer {layer!r}: no such module in {type(model).__name__}{hint}")
    return layer, modules[layer]


def gradcam_layer(model: nn.Module) -> str:
    """The default Grad-CAM layer: the last timm feature stage (the last conv stage of a CNN)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        raise CellmorphError(f"{type(model).__name__} declares no timm feature stages; name a Grad-CAM layer")
    return info[-1]["module"]


class _Reached(Exception):
    """Raised by the tap's hook: the forward pass has produced what was asked for."""


class _Tap:
    """Runs a network up to one module and returns that module's output (the rest is skipped)."""

    def __init__(self, model: nn.Module, module: nn.Module, name: str) -> None:
        self.model, self.module, self.name = model, module, name
        self.output: torch.Tensor | None = None

    def _hook(self, module, inputs, output):
        self.output = output[0] if isinstance(output, (tuple, list)) else output
        raise _Reached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        handle = self.module.register_forward_hook(self._hook)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        output, self.output = self.output, None
        if not isinstance(output, torch.Tensor):
            raise CellmorphError(f"layer {self.name}: the module is not on the network's forward path")
        if output.ndim not in (2, 3, 4):
            raise CellmorphError(f"layer {self.name}: output of shape {tuple(output.shape)} has no channels to "
                                 "maximise")
        return output


def _channel_means(act: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Mean activation of channel ``channels[i]`` of image ``i``: (n,).

    4-D (n, C, h, w) conv maps and 2-D (n, C) outputs index channels on dim 1; 3-D token maps
    (n, L, C) on the last.
    """
    rows = torch.arange(act.shape[0], device=act.device)
    picked = act[rows, :, channels] if act.ndim == 3 else act[rows, channels]
    return picked.flatten(1).mean(dim=1) if picked.ndim > 1 else picked


def _network_input(model: nn.Module, spec: InputSpec | None) -> InputSpec:
    spec = spec if spec is not None else getattr(model, "cellmorph_input", None)
    if spec is None:
        raise CellmorphError(f"{type(model).__name__}: give its InputSpec (mean/std of its input)")
    return spec


def _norm(spec: InputSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


@contextmanager
def _inference_of(model: nn.Module, threads: int | None):
    """Eval mode, the thread count and deterministic kernels for the block; all restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), deterministic():
            yield
    finally:
        model.train(was_training)


def _first_pass(tap: _Tap, x: torch.Tensor, size: int) -> torch.Tensor:
    """The first forward pass: a network that cannot take the image size says so in one line."""
    try:
        return tap(x)
    except CellmorphError:
        raise
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CellmorphError(f"image size {size} px: the network cannot take it ({reason[:160]}); "
                             f"choose another {option('size')}") from None


def layer_channels(model: nn.Module, layer: str, size: int, spec: InputSpec | None = None) -> int:
    """How many channels (filters) ``layer`` has, read off one forward pass of a blank image."""
    spec = _network_input(model, spec)
    name, module = resolve_layer(model, layer)
    device = next(model.parameters()).device
    with _inference_of(model, None), torch.no_grad():
        act = _first_pass(_Tap(model, module, name), torch.zeros(1, spec.channels, size, size, device=device), size)
    return int(act.shape[-1] if act.ndim == 3 else act.shape[1])


def spread_filters(n_channels: int, n: int) -> list[int]:
    """``n`` filter numbers spread evenly over ``n_channels`` (all of them if there are fewer)."""
    if n >= n_channels:
        return list(range(n_channels))
    return sorted({int(round(v)) for v in np.linspace(0, n_channels - 1, n)})


# --------------------------------------------------------------------------- filter images
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect" if radius < min(x.shape[-2:]) else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def maximise_filters(
    model: nn.Module,
    layer: str,
    filters: Sequence[int],
    config: FilterConfig,
    *,
    spec: InputSpec | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Images that maximise the mean activation of each of ``filters`` (channels) of ``layer``.

    Returns uint8 (len(filters), size, size, C): the network's input channels before its
    mean/std normalisation (``spec``, else ``model.cellmorph_input``). The same ``config.seed``
    gives the same images (same machine and thread count). The model runs on ``device`` (it is
    moved there) in eval mode; its mode is restored after, its weights get no gradients.
    """
    spec = _network_input(model, spec)
    device = torch.device(device)
    filters = [int(f) for f in filters]
    if not filters:
        raise CellmorphError(f"layer {layer}: no filters to maximise")
    name, module = resolve_layer(model, layer)
    model.to(device)
    tap = _Tap(model, module, name)
    size, n = config.size, len(filters)
    with _inference_of(model, config.threads):
        with torch.no_grad():
            probe = _first_pass(tap, torch.zeros(1, spec.channels, size, size, device=device), size)
        n_channels = int(probe.shape[-1] if probe.ndim == 3 else probe.shape[1])
        beyond = [f for f in filters if not 0 <= f < n_channels]
        if beyond:
            raise CellmorphError(f"layer {layer} ({name}) has filters 0–{n_channels - 1}; got {beyond}")
        mean, std = _norm(spec, device)
        low, high = (0.0 - mean) / std, (1.0 - mean) / std
        generator = torch.Generator().manual_seed(int(config.seed))
        start = (0.5 + 0.1 * torch.randn((n, spec.channels, size, size), generator=generator)).clamp(0.0, 1.0)
        x = ((start.to(device) - mean) / std).requires_grad_(True)
        optimiser = torch.optim.Adam([x], lr=config.lr)
        channels = torch.tensor(filters, device=device)
        for step in range(config.steps):
            if config.jitter:
                dy, dx = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator).tolist()
                seen = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            else:
                seen = x
            objective = _channel_means(tap(seen), channels)
            loss = -objective.sum() + config.l2 * x.pow(2).mean(dim=(1, 2, 3)).sum()
            (x.grad,) = torch.autograd.grad(loss, [x])  # only the image's gradient, none for the weights
            optimiser.step()
            with torch.no_grad():
                if config.blur_every and config.blur_sigma > 0 and (step + 1) % config.blur_every == 0:
                    x.copy_(_gaussian_blur(x, config.blur_sigma))
                x.copy_(torch.maximum(torch.minimum(x, high), low))
        pixels = (x.detach() * std + mean).clamp(0.0, 1.0)
    return (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def filter_activations(
    model: nn.Module,
    layer: str,
    images: np.ndarray,
    filters: Sequence[int],
    *,
    spec: InputSpec | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Mean activation of filter ``filters[i]`` of ``layer`` on image ``i`` (uint8 (n, H, W, C), as
    :func:`maximise_filters` returns them; ``filters`` of length 1 applies to every image): (n,) float."""
    spec = _network_input(model, spec)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != spec.channels or images.dtype != np.uint8:
        raise CellmorphError(f"images must be uint8 (n, H, W, {spec.channels}), got {images.dtype} {images.shape}")
    channels = list(filters) * len(images) if len(filters) == 1 else list(filters)
    if len(channels) != len(images):
        raise CellmorphError(f"{len(filters)} filters for {len(images)} images")
    name, module = resolve_layer(model, layer)
    device = next(model.parameters()).device
    mean, std = _norm(spec, device)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device).float().div(255.0)
    with _inference_of(model, threads), torch.no_grad():
        act = _first_pass(_Tap(model, module, name), (x - mean) / std, images.shape[1])
        return _channel_means(act, torch.tensor(channels, device=device)).cpu().numpy().astype(np.float64)


# --------------------------------------------------------------------------- figures
def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, C) → (n, H, W, 3): the first three channels as red, green, blue (two: red,
    green; one: grey)."""
    c = images.shape[-1]
    if c >= 3:
        return np.ascontiguousarray(images[..., :3])
    if c == 2:
        return np.concatenate([images, np.zeros_like(images[..., :1])], axis=-1)
    return np.repeat(images, 3, axis=-1)


def filter_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], filters: Sequence[int], title: str):
    """One row per network (label, uint8 images (n, H, W, C), their activations), one column per filter."""
    plt = pyplot()
    n = len(filters)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.45 * n + 1.1, 1.7 * len(rows) + 0.5), squeeze=False)
    for r, (label, images, activations) in enumerate(rows):
        for c, (image, value) in enumerate(zip(to_rgb(images), activations)):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{value:.3g}", fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(f"filter {filters[c]}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.text(0.5, 0.005, "below each image: the mean activation it reaches", ha="center", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def _save_png(fig, path: Path) -> Path:
    plt = pyplot()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def write_filter_comparison(
    comparison: Comparison, out_dir: Path, config: FilterConfig, device: str | torch.device = "cpu"
) -> list[Path]:
    """Per layer, ``OUT/<layer>.png``: the images that maximise the same filters of the ImageNet
    network (top row) and of the fine-tuned one (bottom row), each from the same start image and
    jitter; plus ``OUT/filters.json`` (filters, modules, activations, settings). Returns the PNGs."""
    out_dir = require_output_dir(Path(out_dir), "filter image folder")
    reference = comparison.imagenet
    paths, records = [], []
    for layer in config.layers:
        name, _ = resolve_layer(reference.module, layer)
        filters = spread_filters(layer_channels(reference.module, layer, config.size, reference.input),
                                 config.filters)
        rows, record = [], {"layer": layer, "module": name, "filters": filters, "activations": {}}
        for network in comparison.networks:
            images = maximise_filters(network.module, layer, filters, config, spec=network.input, device=device)
            reached = filter_activations(network.module, layer, images, filters, spec=network.input,
                                         threads=config.threads)
            rows.append((network.label, images, reached))
            record["activations"][network.label] = [round(float(v), 6) for v in reached]
        title = f"{comparison.model_name} {layer}" + (f" ({name})" if name != layer else "") + \
            f": images that maximise {len(filters)} filters, {config.steps} steps, seed {config.seed}"
        paths.append(_save_png(filter_figure(rows, filters, title), out_dir / f"{layer}.png"))
        records.append(record | {"png": paths[-1].name})
    write_json(out_dir / FILTERS_JSON, {"model": comparison.model_name, "source": comparison.source,
                                        "config": config.model_dump(mode="json"), "layers": records})
    return paths


# --------------------------------------------------------------------------- Grad-CAM
def _check_tiles(tiles: np.ndarray, spec: InputSpec) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.dtype != np.uint8 or tiles.shape[1] != spec.channels:
        raise CellmorphError(f"tiles must be uint8 (n, {spec.channels}, h, w), got {tiles.dtype} {tiles.shape}")
    return tiles


def gradcam_heatmaps(
    model: nn.Module,
    tiles: np.ndarray,
    spec: InputSpec,
    target_classes: Sequence[int],
    layer: str | None = None,
    *,
    threads: int | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM of class ``target_classes[i]`` on tile ``i`` (uint8 (n, C, h, w) from the cache), at
    ``layer`` (default: the last feature stage): (n, h, w) float32 in [0, 1], each map scaled to its
    own maximum. The model's mode is restored and its parameter gradients are cleared after."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise CellmorphError("Grad-CAM needs the grad-cam package: pip install grad-cam") from None
    from cellmorph.datasets import InputPipeline

    tiles = _check_tiles(tiles, spec)
    targets = [int(t) for t in target_classes]
    if len(targets) != len(tiles):
        raise CellmorphError(f"{len(targets)} target classes for {len(tiles)} tiles")
    n_classes = getattr(model, "num_classes", None)
    if n_classes is not None and any(not 0 <= t < n_classes for t in targets):
        raise CellmorphError(f"target classes must be 0–{n_classes - 1}, got {sorted(set(targets))}")
    name, module = resolve_layer(model, layer or gradcam_layer(model))
    device = next(model.parameters()).device
    pipeline = InputPipeline.from_spec(spec).to(device)
    out = np.zeros((len(tiles), *tiles.shape[2:]), dtype=np.float32)
    with _inference_of(model, threads):
        cam = GradCAM(model=model, target_layers=[module])  # (it puts the model in eval mode too)
        try:
            for start in range(0, len(tiles), batch_size):
                chunk = slice(start, start + batch_size)
                x = pipeline(torch.from_numpy(np.ascontiguousarray(tiles[chunk])))
                maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets[chunk]])
                maps = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
                if tuple(maps.shape[-2:]) != tuple(tiles.shape[2:]):
                    maps = F.interpolate(maps, size=tiles.shape[2:], mode="bilinear", align_corners=False)
                out[chunk] = maps[:, 0].clamp(0.0, 1.0).numpy()
        finally:
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
    return out


def overlay_heatmaps(tiles: np.ndarray, heatmaps: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Tiles (uint8 (n, C, h, w)) as RGB with ``heatmaps`` ((n, h, w) in [0, 1], jet colours) laid over
    them with opacity ``alpha``: uint8 (n, h, w, 3)."""
    from matplotlib import colormaps

    rgb = to_rgb(np.transpose(tiles, (0, 2, 3, 1))).astype(np.float32) / 255.0
    heat = colormaps["jet"](np.clip(heatmaps, 0.0, 1.0))[..., :3].astype(np.float32)
    return np.round(255.0 * ((1.0 - alpha) * rgb + alpha * heat)).clip(0, 255).astype(np.uint8)


def gradcam_overlays(
    model: nn.Module,
    tiles: np.ndarray,
    spec: InputSpec,
    target_classes: Sequence[int],
    layer: str | None = None,
    *,
    alpha: float = 0.45,
    threads: int | None = None,
) -> np.ndarray:
    """Grad-CAM heat maps (:func:`gradcam_heatmaps`) over the tiles shown as RGB: uint8 (n, h, w, 3)."""
    heatmaps = gradcam_heatmaps(model, tiles, spec, target_classes, layer, threads=threads)
    return overlay_heatmaps(np.asarray(tiles), heatmaps, alpha)


# --------------------------------------------------------------------------- where networks come from
def imagenet_network(model_name: str, n_classes: int, in_chans: int = 3, weights: str | Path | None = None,
                     label: str = "ImageNet") -> NamedNetwork:
    """``model_name`` with offline ImageNet weights (and a fresh head), in eval mode."""
    from cellmorph.models import create_model

    try:
        module = create_model(model_name, n_classes, init="imagenet", in_chans=in_chans,
                              weights=None if weights is None else Path(weights))
    except CellmorphError as exc:
        raise CellmorphError(f"the ImageNet counterpart of the fine-tuned {model_name}: {exc}") from None
    return NamedNetwork(label, module.eval(), module.cellmorph_input.with_channels(in_chans))


def _finetuned_label(init: str) -> str:
    return "fine-tuned" if init == "imagenet" else ("trained from Xavier init" if init == "xavier" else "trained")


def run_networks(run: Path) -> Comparison:
    """The last fold with saved weights of a cv run directory (``cv --keep-checkpoints last|all``),
    rebuilt from ``config.yaml`` and ``folds/<k>/state.pt``, and its ImageNet counterpart."""
    from cellmorph.cv.rundir import CONFIG_FILE, FOLD_STATE, REPLICATE_DIR, RunDir
    from cellmorph.models import network_from_weights

    run = Path(run)
    rundir = RunDir(run)
    if not (run / CONFIG_FILE).is_file() and (run / REPLICATE_DIR.format(0)).is_dir():
        first = run / REPLICATE_DIR.format(0)
        raise CellmorphError(f"{run}: holds replicate runs; pass one of them, e.g. {option('run')} {first}")
    from cellmorph.cv.ensemble import is_ensemble_run, member_dir

    if is_ensemble_run(run):
        raise CellmorphError(f"{run}: an ensemble's run holds no network of its own; pass one of its members, "
                             f"e.g. {option('run')} {member_dir(run, 1)}")
    header = rundir.read_config()
    config = header.get("config") or {}
    if config.get("mode") == "linear-probe":
        raise CellmorphError(f"{run}: a linear-probe run keeps the ImageNet backbone unchanged and saves no network; "
                             f"visualise a fine-tuning run (cv with {option('mode')} finetune "
                             f"{option('keep_checkpoints')} last)")
    kept = sorted(k for k in rundir.finished_folds() if (rundir.fold_dir(k) / FOLD_STATE).is_file())
    if not kept:
        raise CellmorphError(f"{run}: the run saved no fold weights; rerun cv with {option('keep_checkpoints')} last "
                             "(the default: keeps the last fold's model) to visualise its fine-tuned network")
    fold = kept[-1]
    state = rundir.fold_state(fold)
    try:
        name, classes, spec = state["model_name"], list(state["classes"]), InputSpec.from_record(state["input"])
        weights = state["model"]
    except (KeyError, TypeError):
        raise CellmorphError(f"{rundir.fold_dir(fold) / FOLD_STATE}: not a fold checkpoint of cellmorph cv") from None
    try:
        module = network_from_weights(name, len(classes), spec.channels, weights, float(config.get("drop_rate") or 0.0))
    except RuntimeError as exc:
        raise CellmorphError(f"{rundir.fold_dir(fold) / FOLD_STATE}: does not fit {name} "
                             f"({str(exc).splitlines()[0][:160]})") from None
    finetuned = NamedNetwork(f"{_finetuned_label(str(config.get('init', 'imagenet')))} (fold {fold})",
                             module, spec)
    imagenet = imagenet_network(name, len(classes), spec.channels, config.get("weights"))
    return Comparison(name, imagenet, finetuned, {"kind": "run", "path": str(run), "fold": fold})


def bundle_networks(model: Path) -> Comparison:
    """A model bundle's network (``cellmorph train``) and its ImageNet counterpart."""
    from cellmorph.bundle import load_bundle

    bundle = load_bundle(Path(model))
    if bundle.is_probe:
        raise CellmorphError(f"{model}: a linear probe keeps its ImageNet backbone unchanged (only its head was "
                             "fitted), so its filters are ImageNet's; there is nothing to compare")
    config = bundle.manifest.get("training", {}).get("config", {})
    finetuned = NamedNetwork(_finetuned_label(str(config.get("init", "imagenet"))), bundle.network(), bundle.input)
    imagenet = imagenet_network(bundle.model_name, len(bundle.classes), bundle.input.channels, config.get("weights"))
    return Comparison(bundle.model_name, imagenet, finetuned, {"kind": "bundle", "path": str(model), "fold": None})


def visualize_filters(out: Path, config: FilterConfig, run: Path | None = None, model: Path | None = None) -> dict:
    """``cellmorph visualize filters``: the comparison of ``run`` (a cv run) or ``model`` (a bundle) into ``out``."""
    if (run is None) == (model is None):
        raise CellmorphError(f"give exactly one of {option('run')} RUN (a cv run directory) or {option('model')} MODEL (a model bundle)")
    out = require_output_dir(Path(out), "filter image folder")
    comparison = run_networks(run) if run is not None else bundle_networks(model)
    paths = write_filter_comparison(comparison, out, config)
    return {"out": str(out), "model": comparison.model_name, "source": comparison.source,
            "pngs": [p.name for p in paths], "summary": FILTERS_JSON}


__all__ = [
    "DEFAULT_LAYERS",
    "Comparison",
    "FilterConfig",
    "NamedNetwork",
    "bundle_networks",
    "filter_activations",
    "filter_figure",
    "gradcam_heatmaps",
    "gradcam_layer",
    "gradcam_overlays",
    "imagenet_network",
    "layer_channels",
    "maximise_filters",
    "overlay_heatmaps",
    "resolve_layer",
    "run_networks",
    "spread_filters",
    "to_rgb",
    "visualize_filters",
    "write_filter_comparison",
]
