"""``cellmorph weights verify``: do the resolved weights still classify ImageNet photos?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cellmorph.models.weights.registry import IMAGENET_CLASSES
from cellmorph.models.weights.resolve import ResolvedWeights, load_pretrained, resolve_weights

# ImageNet-1k classes that count as a plausible top-1 for the bundled scikit-image photos.
COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}
CAT_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    286: "cougar",
    287: "lynx",
}


@dataclass
class ImageCheck:
    image: str
    top5: list[tuple[int, str, float]]
    passed: bool
    expected: str

    @property
    def top1(self) -> tuple[int, str, float]:
        return self.top5[0]


@dataclass
class VerifyResult:
    model: str
    resolved: ResolvedWeights
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _prepare_image(img, size: int, mean, std, crop_pct: float = 0.875) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    x = TF.resize(x, int(size / crop_pct), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    return TF.normalize(x, list(mean), list(std)).unsqueeze(0)


def verify_weights(name: str, weights: Path | None = None, allow_network: bool = False) -> VerifyResult:
    """Classify scikit-image's bundled coffee and cat photos with the ImageNet head.

    Passes when coffee's top-1 is espresso/cup/coffee mug and chelsea's top-1 is a cat class.
    """
    import timm
    from skimage import data as skdata
    from timm.data import ImageNetInfo

    resolved = resolve_weights(name, weights, allow_network)
    model = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES)
    load_pretrained(model, resolved, include_classifier=True)
    model.eval()
    info = ImageNetInfo()
    result = VerifyResult(name, resolved)
    cases = [
        ("coffee", skdata.coffee(), COFFEE_CLASSES, "espresso, cup or coffee mug"),
        ("chelsea", skdata.chelsea(), CAT_CLASSES, "a cat class (tabby, tiger cat, Egyptian cat, ...)"),
    ]
    for label, img, ok_classes, expected in cases:
        x = _prepare_image(img, resolved.input_size, resolved.mean, resolved.std)
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        values, idx = probs.topk(5)
        top5 = [(int(i), info.index_to_description(int(i)), float(v)) for v, i in zip(values, idx)]
        result.checks.append(ImageCheck(label, top5, top5[0][0] in ok_classes, expected))
    return result
