"""LungSegmenter: right and left lung masks of an X-ray from the bundled U-Net (or a trained folder).

The network is segmentation_models_pytorch's U-Net on timm's EfficientNet-Lite0 encoder, one grey input
channel, three classes (0 background, 1 right lung, 2 left lung; the patient's right is the image's left).
An X-ray is padded to a square and resized to the model's side (128 px; `preprocess` in lungs.json); the class
probabilities are mapped back to the original grid, the arg-max taken there, and each lung kept as its largest
connected component with holes filled. Masks come back at the input's size.

A model folder holds ``lungs.safetensors`` and ``lungs.json`` (architecture, preprocessing, training record and
figures, and the weights' sha256, checked on load). The bundled one is in ``cxrscreen/weights``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.lungs.masks import LUNG_LABELS, clean_label_map, lung_box, lung_fractions
from cxrscreen.transforms.ops import Geometry, PreprocessConfig, SquarePreprocessor, to_model_array

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "lungs.json"
WEIGHTS_FILE = "lungs.safetensors"
CLASSES: tuple[str, ...] = ("background", "right_lung", "left_lung")
ENCODER = "tf_efficientnet_lite0"
DECODER_CHANNELS: tuple[int, ...] = (96, 48, 24, 16, 8)
DEFAULT_PREPROCESS = PreprocessConfig(image_size=128, clahe=True, resize_mode="pad", mean=0.5, std=0.25)


def bundled_dir() -> Path:
    """The package's weights folder (src/cxrscreen/weights)."""
    return Path(__file__).resolve().parent.parent / "weights"


def build_unet(arch: dict[str, Any] | None = None, *, imagenet: bool = False) -> nn.Module:
    """The U-Net described by `arch` ({"encoder", "decoder_channels"}; default: EfficientNet-Lite0, the
    DECODER_CHANNELS); `imagenet` loads the offline ImageNet weights into the encoder (RGB stem summed to grey).
    Input (N, 1, S, S) with S a multiple of 32; output logits (N, 3, S, S)."""
    import segmentation_models_pytorch as smp

    arch = arch or {}
    encoder = str(arch.get("encoder", ENCODER))
    model = smp.Unet(f"tu-{encoder}", encoder_weights=None, in_channels=1, classes=len(CLASSES),
                     decoder_channels=tuple(arch.get("decoder_channels", DECODER_CHANNELS)))
    if imagenet:
        from cxrscreen.models.efficientnet_lite import load_lite_imagenet

        source = load_lite_imagenet(encoder).state_dict()
        target = model.encoder.model.state_dict()
        stem = source["conv_stem.weight"]
        source["conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
        missing = [k for k in target if k not in source or source[k].shape != target[k].shape]
        if missing:
            raise CXRError(f"ImageNet {encoder} weights do not fit the U-Net encoder: {missing[:3]}")
        model.encoder.model.load_state_dict({k: source[k] for k in target})
    return model


def arch_record() -> dict[str, Any]:
    """The architecture as lungs.json records it."""
    return {"library": "segmentation_models_pytorch", "model": "Unet", "encoder": ENCODER,
            "decoder_channels": list(DECODER_CHANNELS), "classes": list(CLASSES)}


@dataclass
class LungResult:
    """One X-ray's lungs: the label map at the input's size and what is derived from it."""

    mask: np.ndarray  # uint8 (H, W): 0 background, 1 right lung, 2 left lung

    @property
    def fractions(self) -> dict[str, float]:
        return lung_fractions(self.mask)

    def boxes(self) -> dict[str, list[float] | None]:
        return {lg: lung_box(self.mask, lg) for lg in LUNG_LABELS}

    def summary(self) -> dict[str, Any]:
        """{area_fraction: {right, left}, boxes: {right, left}} rounded for JSON."""
        return {"area_fraction": {k: round(v, 4) for k, v in self.fractions.items()},
                "boxes": {k: None if b is None else [round(c, 1) for c in b] for k, b in self.boxes().items()}}


class LungSegmenter:
    """The lung U-Net of one model folder (default: the bundled one), on the CPU unless moved."""

    def __init__(self, model: Any, config: dict[str, Any], folder: Path | None = None) -> None:
        self.model = model
        self.config = config
        self.folder = folder
        self.preprocess = PreprocessConfig.from_dict(config["preprocess"])
        self._prep = SquarePreprocessor(self.preprocess)

    @classmethod
    def load(cls, folder: str | Path | None = None) -> LungSegmenter:
        """Read lungs.json + lungs.safetensors from `folder` (None: the bundled model); CXRError when they are
        missing, broken, or the weights' sha256 differs from the recorded one."""
        import torch
        from safetensors.torch import load_file

        from cxrscreen.io.files import read_checked_bundle

        folder = Path(folder) if folder is not None else bundled_dir()
        config, wpath = read_checked_bundle(folder, CONFIG_FILE, WEIGHTS_FILE, "lung segmentation model")
        model = build_unet(config.get("arch"))
        state = load_file(str(wpath))
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
        return cls(model.eval(), config, folder)

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """Grey X-ray float [0, 1] (H, W) -> the model's uint8 square and its geometry."""
        return self._prep(pixels)

    def probabilities(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Class probabilities (N, 3, S, S) float32 of preprocessed uint8 squares (N, S, S). A model that
        `takes_numpy` (the ONNX Runtime engine) gets the float32 batch; a PyTorch one a tensor."""
        x = to_model_array(np.asarray(images), self.preprocess)
        if getattr(self.model, "takes_numpy", False):
            logits = np.asarray(self.model(x), np.float32)
        else:
            import torch

            with torch.no_grad():
                logits = self.model(torch.from_numpy(x)).float().numpy()
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def masks_from_probabilities(self, probs: np.ndarray, geometry: Geometry) -> np.ndarray:
        """One image's probabilities (3, S, S) -> cleaned uint8 label map at the original size."""
        full = np.stack([geometry.to_original(p, fill=1.0 if c == 0 else 0.0) for c, p in enumerate(probs)])
        return clean_label_map(full.argmax(axis=0).astype(np.uint8))

    def segment(self, pixels: np.ndarray) -> LungResult:
        """Lungs of one grey X-ray (float [0, 1], H x W)."""
        return self.segment_many([pixels])[0]

    def segment_many(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[LungResult]:
        """Lungs of several grey X-rays, `batch_size` at a time."""
        out: list[LungResult] = []
        for i in range(0, len(images), batch_size):
            prepared = [self.prepare(p) for p in images[i : i + batch_size]]
            probs = self.probabilities(np.stack([img for img, _ in prepared]))
            out += [LungResult(self.masks_from_probabilities(p, g)) for p, (_, g) in zip(probs, prepared,
                                                                                        strict=True)]
        return out


_BUNDLED: LungSegmenter | None = None


def bundled_segmenter() -> LungSegmenter:
    """The bundled segmenter, loaded once per process."""
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = LungSegmenter.load()
    return _BUNDLED
