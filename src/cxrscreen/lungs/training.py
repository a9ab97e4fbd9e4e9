"""Training the lung U-Net: data from lung label maps, grouped cross-validation, the outside check across
annotation sources, the atlas-box baseline, and the final fit on all masks (`fit_and_save`).

Inputs are (image path, mask path, split_group, annotator source) rows (`lung_mask_table`). Images and masks
are put through the model's preprocessing once (pad to a square, resize; masks by nearest neighbour) and
augmented on the fly with small affine moves and contrast changes, never flipped: a flip would swap the
patient's right and left. Loss: cross-entropy + soft Dice on the two lungs. Metrics are computed at the
original image size on the cleaned label maps the segmenter returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cxrscreen.errors import CXRError
from cxrscreen.lungs.masks import LEFT, LUNG_LABELS, RIGHT, dice_iou, mask_to_model, read_mask
from cxrscreen.lungs.segmenter import (
    CONFIG_FILE,
    DECODER_CHANNELS,
    DEFAULT_PREPROCESS,
    WEIGHTS_FILE,
    LungSegmenter,
    arch_record,
    build_unet,
)
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor


@dataclass(frozen=True)
class TrainOptions:
    """epochs, batch size, learning rate (AdamW, cosine to 0), weight decay, seed, torch threads; the network's
    input side (pixels, a multiple of 32) and the U-Net's decoder channels (coarse to fine)."""

    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1
    imagenet: bool = True
    image_size: int = DEFAULT_PREPROCESS.image_size
    decoder_channels: tuple[int, ...] = DECODER_CHANNELS

    @property
    def preprocess(self) -> PreprocessConfig:
        """The segmenter's preprocessing at this input side."""
        return replace(DEFAULT_PREPROCESS, image_size=self.image_size)

    @property
    def arch(self) -> dict[str, Any]:
        """The architecture record (lungs.json "arch") with these decoder channels."""
        return arch_record(self.decoder_channels)


def lung_mask_table(data_dir: str | Path, lesions_dir: str | Path | None = None) -> pd.DataFrame:
    """Rows `image, mask, split_group, source, set` for ../shared's lung masks: `set` "cxr" for
    annotations/lung_masks (source v7 or generalblockchain) and "lesions" for ../lesions/masks (source
    generalblockchain). Paths are absolute. CXRError naming the file when a table is missing."""
    data_dir = Path(data_dir)
    table = data_dir / "annotations" / "lung_masks.csv"
    if not table.is_file():
        raise CXRError("no lung mask table", table)
    masks = pd.read_csv(table, dtype=str, keep_default_na=False)
    man = pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)[["image", "split_group"]]
    df = masks.merge(man, on="image", how="left")
    if (df["split_group"] == "").any() or df["split_group"].isna().any():
        raise CXRError("a lung mask's image is not in the manifest", table)
    rows = pd.DataFrame({"image": [str(data_dir / p) for p in df["image"]],
                         "mask": [str(data_dir / p) for p in df["mask"]], "split_group": df["split_group"],
                         "source": df["annotator_source"], "set": "cxr"})
    if lesions_dir is not None and (Path(lesions_dir) / "manifest.csv").is_file():
        les = pd.read_csv(Path(lesions_dir) / "manifest.csv", dtype=str, keep_default_na=False)
        stems = [Path(p).stem for p in les["image"]]
        rows = pd.concat([rows, pd.DataFrame({
            "image": [str(Path(lesions_dir) / p) for p in les["image"]],
            "mask": [str(Path(lesions_dir) / "masks" / f"{s}.png") for s in stems],
            "split_group": les["split_group"], "source": "generalblockchain", "set": "lesions"})], ignore_index=True)
    return rows.reset_index(drop=True)


@dataclass
class Example:
    """One preprocessed training item: uint8 image (S, S), label map (S, S), the original-size truth."""

    image: np.ndarray
    target: np.ndarray
    truth: np.ndarray
    pixels: np.ndarray


def load_examples(rows: pd.DataFrame, preprocess: PreprocessConfig = DEFAULT_PREPROCESS) -> list[Example]:
    """Read and preprocess the rows' images and masks (CXRError naming a bad file)."""
    from cxrscreen.io.xray import read_xray

    prep = Preprocessor(preprocess)
    out = []
    for img_path, mask_path in zip(rows["image"], rows["mask"], strict=True):
        px = read_xray(img_path).pixels
        truth = read_mask(mask_path, px.shape)
        img, geom = prep(px)
        out.append(Example(img, mask_to_model(truth, geom), truth, px))
    return out


def augment(img: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random small rotation (+-10 deg), scale (0.9-1.1), shift (+-6 %) and contrast / brightness change
    applied to an image and its label map alike. No flip (it would swap the lungs)."""
    s = img.shape[0]
    m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * s
    a = cv2.warpAffine(img, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
    t = cv2.warpAffine(target, m, (s, s), flags=cv2.INTER_NEAREST, borderValue=0)
    gamma = math.exp(rng.uniform(-0.3, 0.3))
    a = np.clip(255.0 * (a / 255.0) ** gamma * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15), 0, 255)
    return a.astype(np.uint8), t


def _loss(logits: Any, target: Any) -> Any:
    import torch.nn.functional as F  # noqa: N812

    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + 1) / (probs.sum(dims) + onehot.sum(dims) + 1)
    return ce + (1 - dice[1:]).mean()


def train_model(examples: Sequence[Example], opts: TrainOptions, preprocess: PreprocessConfig | None = None,
                log: Callable[[str], None] = print) -> Any:
    """Fit a fresh U-Net on `examples`; returns it in eval mode."""
    import torch

    from cxrscreen.transforms.preprocess import to_model_array

    preprocess = preprocess or opts.preprocess
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    rng = np.random.default_rng(opts.seed)
    model = build_unet(opts.arch, imagenet=opts.imagenet)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps = opts.epochs * math.ceil(len(examples) / opts.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=opts.lr, total_steps=steps, pct_start=0.1)
    for epoch in range(opts.epochs):
        model.train()
        t0, total = time.monotonic(), 0.0
        order = rng.permutation(len(examples))
        for i in range(0, len(order), opts.batch_size):
            batch = [augment(examples[j].image, examples[j].target, rng) for j in order[i : i + opts.batch_size]]
            x = torch.from_numpy(to_model_array(np.stack([b[0] for b in batch]), preprocess))
            y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
            loss = _loss(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item() * len(batch)
        log(f"epoch {epoch + 1}/{opts.epochs}: loss {total / len(examples):.4f} ({time.monotonic() - t0:.0f} s)")
    return model.eval()


def score_examples(seg: LungSegmenter, examples: Sequence[Example]) -> list[dict[str, float]]:
    """Per image: Dice and IoU of the right lung, the left lung and both lungs together (original size)."""
    out = []
    for i in range(0, len(examples), 16):
        chunk = examples[i : i + 16]
        probs = seg.probabilities(np.stack([e.image for e in chunk]))
        for e, p in zip(chunk, probs, strict=True):
            pred = seg.masks_from_probabilities(p, seg.prepare(e.pixels)[1])
            out.append(mask_scores(pred, e.truth))
    return out


def mask_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """{dice_right, iou_right, dice_left, iou_left, dice_lungs, iou_lungs} of two label maps."""
    row = {}
    for lg, k in LUNG_LABELS.items():
        row[f"dice_{lg}"], row[f"iou_{lg}"] = dice_iou(pred == k, truth == k)
    row["dice_lungs"], row["iou_lungs"] = dice_iou(pred > 0, truth > 0)
    return row


def atlas_label_map(hw: tuple[int, int]) -> np.ndarray:
    """The atlas lung boxes of `data.lung_boxes` as a filled label map of shape hw (the old way)."""
    from cxrscreen.data.lung_boxes import DEFAULT_ATLAS, atlas_boxes

    ab = atlas_boxes(DEFAULT_ATLAS, hw)
    out = np.zeros(hw, np.uint8)
    for box, lung in zip(ab.boxes, ab.lungs, strict=True):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        out[y0:y1, x0:x1] = RIGHT if lung == RIGHT else LEFT
    return out


def summarise(rows: Sequence[dict[str, float]], groups: Sequence[str] | None = None, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Mean and median of each metric, with a 95 % bootstrap CI of the mean over split groups."""
    df = pd.DataFrame(list(rows))
    out: dict[str, Any] = {"n": len(df)}
    if not len(df):
        return out
    g = np.asarray(groups) if groups is not None else np.arange(len(df)).astype(str)
    uniq = np.unique(g)
    idx = [np.nonzero(g == u)[0] for u in uniq]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([idx[j] for j in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]
    for col in df.columns:
        v = df[col].to_numpy(np.float64)
        boots = np.array([v[d].mean() for d in draws])
        out[col] = {"mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
                    "ci95": [round(float(np.quantile(boots, 0.025)), 4), round(float(np.quantile(boots, 0.975)), 4)]}
    return out


def segmenter_of(model: Any, opts: TrainOptions | None = None) -> LungSegmenter:
    """A LungSegmenter around a just-trained model (for scoring), with `opts`' preprocessing and arch."""
    opts = opts or TrainOptions()
    return LungSegmenter(model, {"preprocess": opts.preprocess.to_dict(), "arch": opts.arch})


def grouped_folds(groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) per row, whole split groups per fold (`severity.model.group_folds`)."""
    from cxrscreen.severity.model import group_folds

    return group_folds(groups, k, seed)


def cross_validate(table: pd.DataFrame, examples: Sequence[Example], opts: TrainOptions, k: int = 2,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Grouped k-fold CV on the "cxr" rows (folds by split_group); each fold's model is also scored on the
    "lesions" rows whose split_group is not among its training groups, and the atlas boxes on the same test
    images. Returns the figures and each row's fold (-1: not tested)."""
    cxr = np.nonzero((table["set"] == "cxr").to_numpy())[0]
    les = np.nonzero((table["set"] == "lesions").to_numpy())[0]
    folds = grouped_folds(table["split_group"].to_numpy()[cxr], k, opts.seed)
    per: dict[str, list[dict[str, float]]] = {"cv": [], "lesions": [], "atlas_cv": [], "atlas_lesions": []}
    grp: dict[str, list[str]] = {key: [] for key in per}
    tested_lesions: set[int] = set()
    fold_of = np.full(len(table), -1)
    for f in range(k):
        train_idx, test_idx = cxr[folds != f], cxr[folds == f]
        train_groups = set(table["split_group"].iloc[train_idx])
        if set(table["split_group"].iloc[test_idx]) & train_groups:
            raise AssertionError("a split group is on both sides of a fold")
        les_idx = [i for i in les if table["split_group"].iloc[i] not in train_groups and i not in tested_lesions]
        tested_lesions.update(les_idx)
        fold_of[test_idx] = f
        fold_of[les_idx] = f
        log(f"fold {f + 1}/{k}: train {len(train_idx)} images, test {len(test_idx)} cxr + {len(les_idx)} lesions")
        seg = segmenter_of(train_model([examples[i] for i in train_idx], opts, log=log), opts)
        for key, idx in (("cv", test_idx), ("lesions", les_idx)):
            per[key] += score_examples(seg, [examples[i] for i in idx])
            per[f"atlas_{key}"] += [mask_scores(atlas_label_map(examples[i].truth.shape), examples[i].truth)
                                    for i in idx]
            for name in (key, f"atlas_{key}"):
                grp[name] += list(table["split_group"].iloc[idx])
    return {"k": k, "figures": {key: summarise(per[key], grp[key]) for key in per}, "fold_of": fold_of.tolist()}


def cross_source(table: pd.DataFrame, examples: Sequence[Example], opts: TrainOptions,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """The outside check: fit on V7's masks (cxr rows of source v7 whose split group holds no General
    Blockchain image), test on General Blockchain's (the cxr rows of that source and the lesions set)."""
    gb = np.nonzero((table["source"] == "generalblockchain").to_numpy())[0]
    gb_groups = set(table["split_group"].iloc[gb])
    train_idx = [i for i in range(len(table)) if table["source"].iloc[i] == "v7" and table["set"].iloc[i] == "cxr"
                 and table["split_group"].iloc[i] not in gb_groups]
    log(f"cross-source: train on {len(train_idx)} v7 masks, test on {len(gb)} generalblockchain masks")
    seg = segmenter_of(train_model([examples[i] for i in train_idx], opts, log=log), opts)
    rows = score_examples(seg, [examples[i] for i in gb])
    groups = list(table["split_group"].iloc[gb])
    return {"train": "v7", "test": "generalblockchain", "n_train": len(train_idx),
            "figures": summarise(rows, groups),
            "atlas": summarise([mask_scores(atlas_label_map(examples[i].truth.shape), examples[i].truth)
                                for i in gb], groups)}


def fit_and_save(table: pd.DataFrame, examples: Sequence[Example], opts: TrainOptions, out_dir: str | Path, *,
                 record: dict[str, Any], log: Callable[[str], None] = print) -> Path:
    """Fit on every "cxr" row and write lungs.safetensors (float16) + lungs.json (arch, preprocessing, options,
    data counts, `record`: the CV figures and provenance, weights sha256) into out_dir. Returns the JSON path."""
    import torch
    from safetensors.torch import save_file

    from cxrscreen.io.files import file_sha256, write_json
    from cxrscreen.runs.provenance import provenance

    idx = np.nonzero((table["set"] == "cxr").to_numpy())[0]
    log(f"final fit on {len(idx)} images")
    model = train_model([examples[i] for i in idx], opts, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE))
    cfg = {"arch": opts.arch, "preprocess": opts.preprocess.to_dict(), "training": asdict(opts),
           "seed": opts.seed, "data": {"n_images": len(idx), "sources": table["source"].iloc[idx].value_counts()
                                       .to_dict(), "masks": "../shared/data/cxr/annotations/lung_masks (CC BY 4.0)"},
           **record, **provenance(), "weights_dtype": "float16", "weights_sha256": file_sha256(out / WEIGHTS_FILE)}
    write_json(out / CONFIG_FILE, cfg)
    return out / CONFIG_FILE


def attach_record(out_dir: str | Path, record: dict[str, Any], opts: TrainOptions) -> Path:
    """Record CV figures in an existing lungs.json (weights untouched). ValueError when the model there was
    fitted with other options than `opts` (the figures would describe another recipe)."""
    import json

    from cxrscreen.io.files import write_json

    path = Path(out_dir) / CONFIG_FILE
    cfg = json.loads(path.read_text())  # read just before writing: two parts may attach in turn
    fitted = dict(cfg.get("training") or {})
    if fitted:  # recorded before the input side and decoder were options: read them from the model's record
        fitted.setdefault("image_size", cfg.get("preprocess", {}).get("image_size"))
        fitted.setdefault("decoder_channels", cfg.get("arch", {}).get("decoder_channels"))
        fitted["decoder_channels"] = [int(c) for c in fitted["decoder_channels"] or []]
    wanted = {**asdict(opts), "decoder_channels": [int(c) for c in opts.decoder_channels]}
    if fitted != wanted:
        raise ValueError(f"{path} was fitted with {cfg.get('training')}, not {wanted}")
    cfg.update(record)
    write_json(path, cfg)
    return path
