"""LungSegmenter: right and left lung masks of an X-ray from the bundled U-Net (or a trained folder).

The network is segmentation_models_pytorch's U-Net on timm's EfficientNet-Lite0 encoder, one grey input
channel, three classes (0 background, 1 right lung, 2 left lung; the patient's right is the image's left).
An X-ray is padded to a square and resized to the model's side (`preprocess` in lungs.json). Each lung is kept as
its largest connected component with holes filled, first on the network's grid (what the lungs' sizes are read
from: the gate's lungs rule) and, when the full-size mask is asked for, on the original grid, onto which the
class probabilities are resized before the arg-max. Masks come back at the input's size. A decoded X-ray is
segmented once however many parts ask for its lungs (`segment_many` remembers results by pixel array).

A model folder holds ``lungs.safetensors`` and ``lungs.json`` (architecture, preprocessing, training record and
figures, and the weights' sha256, checked on load). The bundled one is in ``cxrscreen/weights``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
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
FREEZE_AFTER_IMAGES = 64  # a segmenter that has seen this many images runs a frozen graph (tracing: about 1 s)
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


def arch_record(decoder_channels: Sequence[int] = DECODER_CHANNELS) -> dict[str, Any]:
    """The architecture as lungs.json records it."""
    return {"library": "segmentation_models_pytorch", "model": "Unet", "encoder": ENCODER,
            "decoder_channels": [int(c) for c in decoder_channels], "classes": list(CLASSES)}


class LungResult:
    """One X-ray's lungs. From the segmenter it holds the network's class probabilities and the cleaned label map on
    the network's grid (the image's part of the square, padding cut off); the label map at the input's size
    (`mask`) is computed from the probabilities on first use only, so what needs just the lungs' sizes (the gate's
    lungs rule) never works at the input's full resolution. `LungResult(mask)` wraps a given full-size map."""

    def __init__(self, mask: np.ndarray | None = None, *, probs: np.ndarray | None = None,
                 geometry: Geometry | None = None) -> None:
        if mask is None and (probs is None or geometry is None):
            raise ValueError("a LungResult needs a mask, or probabilities and their geometry")
        self._mask = None if mask is None else np.asarray(mask, np.uint8)
        self.probs = probs  # float32 (3, S, S) on the network's square, or None
        self.geometry = geometry
        self.grid = self._mask if self._mask is not None else clean_label_map(
            image_part(probs, geometry).argmax(axis=0).astype(np.uint8))

    @property
    def mask(self) -> np.ndarray:
        """uint8 (H, W) at the input's size: 0 background, 1 right lung, 2 left lung (computed once)."""
        if self._mask is None:
            assert self.probs is not None and self.geometry is not None
            self._mask = full_size_labels(self.probs, self.geometry)
        return self._mask

    @property
    def fractions(self) -> dict[str, float]:
        """{right, left}: each lung's share of the image's area, counted on the network's grid (`grid`)."""
        return lung_fractions(self.grid)

    def boxes(self) -> dict[str, list[float] | None]:
        return {lg: lung_box(self.mask, lg) for lg in LUNG_LABELS}

    def summary(self) -> dict[str, Any]:
        """{area_fraction: {right, left}, boxes: {right, left}} of the full-size mask, rounded for JSON."""
        return {"area_fraction": {k: round(v, 4) for k, v in lung_fractions(self.mask).items()},
                "boxes": {k: None if b is None else [round(c, 1) for c in b] for k, b in self.boxes().items()}}


def image_part(probs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The part of a (C, S, S) map on the network's square that shows the image (the padding cut off)."""
    size = probs.shape[-1]
    s = size / geometry.square
    left, top, right, bottom = geometry.pad
    r0, r1 = int(round(top * s)), size - int(round(bottom * s))
    c0, c1 = int(round(left * s)), size - int(round(right * s))
    if r1 <= r0 or c1 <= c0:  # an image so thin that it covers less than a grid cell: keep the middle cell
        r0, r1 = min(r0, size - 1), min(r0, size - 1) + 1
        c0, c1 = min(c0, size - 1), min(c0, size - 1) + 1
    return probs[..., r0:r1, c0:c1]


def full_size_labels(probs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """One image's probabilities (3, S, S) -> the cleaned uint8 label map at the original size: the probabilities
    are resized onto the original grid (bilinear), the arg-max taken there, each lung kept as its largest
    component with holes filled."""
    full = np.stack([geometry.to_original(p, fill=1.0 if c == 0 else 0.0) for c, p in enumerate(probs)])
    return clean_label_map(full.argmax(axis=0).astype(np.uint8))


class LungSegmenter:
    """The lung U-Net of one model folder (default: the bundled one), on the CPU unless moved."""

    def __init__(self, model: Any, config: dict[str, Any], folder: Path | None = None) -> None:
        self.model = model
        self.config = config
        self.folder = folder
        self.preprocess = PreprocessConfig.from_dict(config["preprocess"])
        self._prep = SquarePreprocessor(self.preprocess)
        self._memo: dict[int, tuple[weakref.ref, LungResult]] = {}
        self._seen = 0  # images through the network; from FREEZE_AFTER_IMAGES on, a frozen graph runs it
        self._graph: Any = None
        self._freeze_lock = threading.Lock()
        self._freeze_tried = False

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
        # channels-last: the encoder's depthwise convolutions run faster on the CPU (128 px, 8 images a time, 2
        # threads: 10.7 -> 8.1 ms per image, idle machine); the probabilities agree within 1e-5
        return cls(model.eval().to(memory_format=torch.channels_last), config, folder)

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
                logits = (self._graph or self.model)(torch.from_numpy(x)).float().numpy()
            self._seen += len(x)
            if self._seen >= FREEZE_AFTER_IMAGES and not self._freeze_tried:
                self._freeze()
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def _freeze(self) -> None:
        """Run the network as a frozen TorchScript graph from now on (`models.frozen`; 128 px, 8 images a time,
        2 threads: about 8 -> 5-7 ms per image), or keep the eager module where it cannot be frozen."""
        with self._freeze_lock:
            if self._freeze_tried:
                return
            from cxrscreen.models.frozen import freeze_for_inference

            self._graph = freeze_for_inference(self.model, self.preprocess.image_size)
            self._freeze_tried = True

    def masks_from_probabilities(self, probs: np.ndarray, geometry: Geometry) -> np.ndarray:
        """One image's probabilities (3, S, S) -> cleaned uint8 label map at the original size."""
        return full_size_labels(probs, geometry)

    def segment(self, pixels: np.ndarray) -> LungResult:
        """Lungs of one grey X-ray (float [0, 1], H x W)."""
        return self.segment_many([pixels])[0]

    def segment_many(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[LungResult]:
        """Lungs of several grey X-rays, `batch_size` at a time through the network (8 ran faster than 16 or 4
        on a 2-core CPU).

        Each result is remembered for as long as its pixel array lives: the same array segmented again (the
        gate's lungs rule, then the severity zones, then the heat map's share inside the lungs, all on one
        decoded X-ray) is not segmented again. An array changed in place after segmentation is not noticed."""
        out: list[LungResult | None] = [self._remembered(p) for p in images]
        todo = [i for i, r in enumerate(out) if r is None]
        for j in range(0, len(todo), batch_size):
            chunk = todo[j : j + batch_size]
            prepared = [self.prepare(images[i]) for i in chunk]
            probs = self.probabilities(np.stack([img for img, _ in prepared]))
            for i, p, (_, g) in zip(chunk, probs, prepared, strict=True):
                out[i] = self._remember(images[i], LungResult(probs=p, geometry=g))
        return [r for r in out if r is not None]

    def _remembered(self, pixels: np.ndarray) -> LungResult | None:
        entry = self._memo.get(id(pixels))
        return entry[1] if entry is not None and entry[0]() is pixels else None

    def _remember(self, pixels: np.ndarray, result: LungResult) -> LungResult:
        key, memo = id(pixels), self._memo
        try:  # dropped when the array is freed (its id may then be reused)
            ref = weakref.ref(pixels, lambda _ref: memo.pop(key, None))
        except TypeError:  # not weak-referenceable (not an ndarray): not remembered
            return result
        memo[key] = (ref, result)
        return result


_BUNDLED: LungSegmenter | None = None


def bundled_segmenter() -> LungSegmenter:
    """The bundled segmenter, loaded once per process."""
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = LungSegmenter.load()
    return _BUNDLED
