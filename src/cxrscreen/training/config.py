"""The training config (`TrainConfig`, stored in config.json under "training") and the finished-run check."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrscreen.errors import CXRError
from cxrscreen.models.registry import resolve_image_size
from cxrscreen.runs.run_dir import read_config
from cxrscreen.transforms.augment import AugmentConfig
from cxrscreen.transforms.preprocess import PreprocessConfig


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in config.json under "training")."""

    arch: str = "resnet18"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    weights: str = "none"
    seed: int = 0
    balance: str = "loss"  # "loss": class-weighted cross-entropy; "sampler": balanced sampling; "none"
    label_smoothing: float = 0.0
    patience: int = 5
    monitor: str = "val_loss"  # or "val_macro_f1", or "val_worst_source_loss" (the highest per-source val loss)
    linear_probe_epochs: int = 0  # first epochs train the head only (backbone frozen, in eval mode)
    linear_probe_lr: float | None = None  # the head's learning rate in those epochs (default: lr)
    backbone_lr_scale: float = 1.0  # after them, the backbone learns at lr * this, the head at lr
    frozen: list[str] = field(default_factory=list)  # parameter-name prefixes that never train ("blocks.0")
    max_train_images_per_epoch: int | None = None
    budget_minutes: float | None = None
    threads: int | None = None
    num_workers: int = 0
    device: str = "auto"
    cache_dir: str | None = None
    boxes: str | None = None  # detectors: lung boxes CSV (`cxrscreen localize label`); default <out>/boxes.csv
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists), as stored in config.json."""
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CXRError(f"unknown training options: {', '.join(sorted(unknown))}")
        if isinstance(d.get("preprocess"), dict):
            d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        if isinstance(d.get("augment"), dict):
            aug = dict(d["augment"])
            aug.pop("extra", None)  # a retired field that config.json files written before it went carry
            if "scale" in aug:
                aug["scale"] = tuple(aug["scale"])
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Load a YAML recipe; non-None overrides (from the command line) win."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CXRError(f"cannot read training config ({exc})", path) from exc
        return cls.from_recipe(data.get("train", data), **overrides)

    @classmethod
    def from_recipe(cls, data: dict[str, Any], **overrides: Any) -> TrainConfig:
        """A recipe dict (a YAML file's `train:` block; {} for none) with non-None overrides applied; the
        input size by `models.registry.resolve_image_size` (override, else recipe, else the arch's default)."""
        data = {**data, **{k: v for k, v in overrides.items() if v is not None and k != "image_size"}}
        pre = dict(data.get("preprocess") or {})
        arch = data.get("arch", cls.arch)
        pre["image_size"] = resolve_image_size(arch, overrides.get("image_size"), pre.get("image_size"))
        data["preprocess"] = pre
        return cls.from_dict(data)


def stored_run(cfg: TrainConfig, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The config of a finished run of `cfg` in out_dir, or None when there is none (or it is unfinished).

    A run directory that holds a run of another configuration is refused (CXRError). Stored training
    options are read through TrainConfig, so a field added since the run was made takes its default.
    """
    if not (out_dir / "config.json").is_file():
        return None
    old = read_config(out_dir)
    if TrainConfig.from_dict(old.get("training") or {}).to_dict() != cfg.to_dict():
        raise CXRError("run directory holds a run with another configuration; choose a new --out", out_dir)
    if old.get("finished"):
        log(f"{out_dir}: finished run found, not training again")
        return old
    return None

