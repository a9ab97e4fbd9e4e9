"""The comparison's config: a YAML recipe (models, train options, CLAHE arms, seed, budget; `base: other.yaml`
merged under it), the run name of each arm and its TrainConfig, and the study's reported figures."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrscreen import CLASSES
from cxrscreen.data.splits import PAPER_COUNTS
from cxrscreen.errors import CXRError
from cxrscreen.models.registry import available_models, resolve_image_size
from cxrscreen.training.config import TrainConfig

BASE_KEY = "base"  # a comparison YAML's `base: other.yaml` (see the module doc)
TOP_LEVEL_KEYS = ("title", "models", "train", "clahe", "seed", "budget_minutes", "n_boot", "inference", "gpu_recipe")
# TrainConfig fields that change how a run is executed, not what it learns: a run may resume with new values.
OPERATIONAL_FIELDS = ("budget_minutes", "cache_dir", "device", "threads", "num_workers")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[Any, str]:
    """A comparison YAML with its ``base:`` file (recursively) merged under it: (mapping, text), the text being
    the file's own followed by its base's."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CXRError(f"cannot read comparison config ({exc})", path) from exc
    if not isinstance(data, dict) or BASE_KEY not in data:
        return data, text
    base = path.parent / str(data.pop(BASE_KEY))
    seen = (*seen, path.resolve())
    if base.resolve() in seen:
        raise CXRError(f"`{BASE_KEY}: {base.name}` leads back to a file that names it as its base", path)
    base_data, base_text = _read_yaml(base, seen)
    if not isinstance(base_data, dict):
        raise CXRError("the comparison config must be a mapping", base)
    return {**base_data, **data}, f"{text.rstrip()}\n\n# ---- {base} ({BASE_KEY} of the above) ----\n{base_text}"


@dataclass
class ModelEntry:
    """One `models:` entry: an architecture, its input size (None: the registry's default), its CLAHE arms
    (None: the config's `clahe:`; a list restricts this entry, e.g. a second seed of one arm) and overrides."""

    arch: str
    image_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    clahe: list[bool] | None = None

    def size(self) -> int:
        """The input size (the registry's default when not given; CXRError for an unknown architecture)."""
        return resolve_image_size(self.arch, configured=self.image_size)


@dataclass
class CompareConfig:
    """The comparison recipe read from YAML (`text` keeps the file verbatim for the report)."""

    models: list[ModelEntry]
    train: dict[str, Any] = field(default_factory=dict)
    clahe: list[bool] = field(default_factory=lambda: [True, False])
    seed: int = 0
    budget_minutes: float | None = None
    n_boot: int = 1000
    inference: dict[str, int] = field(default_factory=lambda: {"batch_size": 32, "images": 96})
    gpu_recipe: dict[str, Any] | None = None
    title: str = "Model comparison"
    text: str = ""
    path: str | None = None

    @classmethod
    def from_yaml(cls, path: Path) -> CompareConfig:
        """Read and validate a comparison YAML (and its ``base:``); CXRError naming the file on any problem."""
        data, text = _read_yaml(Path(path))
        try:
            cfg = cls.from_dict(data, text=text)
        except CXRError as exc:
            raise CXRError(exc.problem, path) from exc
        cfg.path = str(path)
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, text: str = "") -> CompareConfig:
        """Build from a parsed YAML mapping; every entry is checked by building its TrainConfig."""
        if not isinstance(data, dict):
            raise CXRError("the comparison config must be a mapping")
        unknown = set(data) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise CXRError(f"unknown keys {', '.join(sorted(unknown))}; known: {', '.join(TOP_LEVEL_KEYS)}")
        raw_models = data.get("models") or []
        if not isinstance(raw_models, list) or not raw_models:
            raise CXRError("`models:` must list at least one entry (arch, image_size, overrides)")
        models = []
        for i, m in enumerate(raw_models, 1):
            if isinstance(m, str):
                m = {"arch": m}
            if not isinstance(m, dict) or not m.get("arch"):
                raise CXRError(f"models entry {i} needs an `arch`")
            m = dict(m)
            arch = str(m.pop("arch"))
            size = m.pop("image_size", None)
            own_clahe = _clahe_list(m.pop("clahe"), f"models entry {i} ({arch}): `clahe:`") if "clahe" in m else None
            bad = set(m) - (set(TrainConfig.__dataclass_fields__) - {"arch"})
            if bad:
                raise CXRError(f"models entry {i} ({arch}): unknown option(s) {', '.join(sorted(bad))}")
            models.append(ModelEntry(arch=arch, image_size=None if size is None else int(size), overrides=m,
                                     clahe=own_clahe))
        clahe = _clahe_list(data.get("clahe", [True, False]), "`clahe:`")
        train_d = data.get("train") or {}
        if not isinstance(train_d, dict):
            raise CXRError("`train:` must be a mapping of TrainConfig options")
        inference = {"batch_size": 32, "images": 96, **(data.get("inference") or {})}
        budget = data.get("budget_minutes")
        cfg = cls(
            models=models,
            train=train_d,
            clahe=clahe,
            seed=int(data.get("seed", train_d.get("seed", 0))),
            budget_minutes=None if budget in (None, 0) else float(budget),
            n_boot=int(data.get("n_boot", 1000)),
            inference={k: int(v) for k, v in inference.items()},
            gpu_recipe=data.get("gpu_recipe"),
            title=str(data.get("title", "Model comparison")),
            text=text,
        )
        names = cfg.run_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CXRError(f"two entries give the same run name: {', '.join(dup)}")
        for e in models:
            if e.arch not in available_models():
                continue  # an unknown architecture is recorded as a failed row when the comparison runs
            try:
                train_config_for(cfg, e, cfg.clahe_of(e)[0], size=e.size())
            except (CXRError, TypeError, ValueError) as exc:
                raise CXRError(f"models entry {e.arch}: {exc}") from exc
        return cfg

    def clahe_of(self, entry: ModelEntry) -> list[bool]:
        """The CLAHE settings the entry is trained with: its own `clahe:` list, else the config's."""
        return self.clahe if entry.clahe is None else entry.clahe

    def pairs(self) -> list[tuple[ModelEntry, bool]]:
        """Every (entry, CLAHE) arm in config order."""
        return [(e, c) for e in self.models for c in self.clahe_of(e)]

    def run_names(self) -> list[str]:
        """The run names of `pairs()`, in the same order."""
        return [self.run_name(e, c) for e, c in self.pairs()]

    def run_name(self, entry: ModelEntry, clahe: bool) -> str:
        """runs/ folder name of a pair; 'default' stands for the size of an unknown architecture."""
        try:
            size: int | str = entry.size()
        except CXRError:
            size = "default"
        return run_name(entry.arch, size, clahe, weights=self.weights_of(entry), seed=self.seed_of(entry),
                        base_seed=self.seed)

    def weights_of(self, entry: ModelEntry) -> str:
        """The entry's starting weights: "imagenet" or "none"."""
        return str(entry.overrides.get("weights", self.train.get("weights", "none")) or "none")

    def seed_of(self, entry: ModelEntry) -> int:
        """The entry's training seed (the config's unless the entry sets its own)."""
        return int(entry.overrides.get("seed", self.seed))

    def with_gpu_recipe(self) -> CompareConfig:
        """A copy with `gpu_recipe` applied: its `train:` options and per-architecture `image_size`."""
        if not self.gpu_recipe:
            raise CXRError("the comparison config has no gpu_recipe section")
        new = copy.deepcopy(self)
        recipe = dict(self.gpu_recipe)
        sizes = recipe.get("image_size") or {}
        new.train = _merge(new.train, recipe.get("train") or {})
        if "budget_minutes" in recipe:
            new.budget_minutes = recipe["budget_minutes"]
        for e in new.models:
            if e.arch in sizes:
                e.image_size = int(sizes[e.arch])
            for k in set(e.overrides) & set(recipe.get("train") or {}):
                del e.overrides[k]  # the GPU recipe's options win over the CPU entries' own
        return new


def _clahe_list(value: Any, what: str) -> list[bool]:
    """A `clahe:` value as a list of distinct booleans (a bare true/false is a list of one)."""
    out = value if isinstance(value, list) else [value]
    if not out or any(not isinstance(c, bool) for c in out) or len(set(out)) != len(out):
        raise CXRError(f"{what} must list true and/or false once each, got {value!r}")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base updated by over; `preprocess` and `augment` mappings are merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in ("preprocess", "augment") and isinstance(v, dict):
            out[k] = {**(out.get(k) or {}), **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def run_name(arch: str, image_size: int | str, clahe: bool, *, weights: str = "none", seed: int = 0,
             base_seed: int = 0) -> str:
    """'<arch>_<size>[_imagenet][_seed<n>]_clahe-on' (or '-off'): '_imagenet' for ImageNet starting weights,
    '_seed<n>' when the entry's seed differs from the config's (so one config can hold both arms)."""
    tags = ("_imagenet" if weights == "imagenet" else "") + (f"_seed{seed}" if seed != base_seed else "")
    return f"{arch}_{image_size}{tags}_clahe-{'on' if clahe else 'off'}"


def train_config_for(
    cc: CompareConfig,
    entry: ModelEntry,
    clahe: bool,
    *,
    size: int | None = None,
    budget_minutes: float | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
) -> TrainConfig:
    """The TrainConfig of one pair: train defaults < seed / budget of the config < entry < CLAHE, size, CLI."""
    d = _merge(cc.train, {"seed": cc.seed})
    if cc.budget_minutes is not None:
        d["budget_minutes"] = cc.budget_minutes
    d = _merge(d, entry.overrides)
    d["arch"] = entry.arch
    d["preprocess"] = {**(d.get("preprocess") or {}), "image_size": size or entry.size(), "clahe": clahe}
    if budget_minutes is not None:
        d["budget_minutes"] = budget_minutes if budget_minutes > 0 else None
    if cache_dir is not None:
        d["cache_dir"] = str(cache_dir)
    if device is not None:
        d["device"] = device
    return TrainConfig.from_dict(d)


# The study's own figures: reported, never rerun here (its data and test set are not ours).
STUDY_REFERENCE: dict[str, Any] = {
    "name": "study (reported)",
    "arch": "ssd300_vgg16",
    "image_size": 300,
    "accuracy": None,
    "macro_f1": None,
    "covid_sensitivity": 0.9492,
    "covid_specificity": 0.9200,
    "covid_auc": None,
    "train_counts": dict(PAPER_COUNTS["train"]),
    "test_counts": dict(PAPER_COUNTS["test"]),
    "source": "reported by the study, not rerun",
    "note": (
        "SSD300-VGG16 on the study's own data (train {tr}; test {te}, covid/normal/pneumonia); "
        "accuracy not given; not comparable image for image with the rows above"
    ).format(
        tr="/".join(str(PAPER_COUNTS["train"][c]) for c in CLASSES),
        te="/".join(str(PAPER_COUNTS["test"][c]) for c in CLASSES),
    ),
}

