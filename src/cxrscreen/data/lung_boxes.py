"""lung_boxes: the COCO lung boxes (``annotations/lung_boxes.coco.json``: right lung = category 1, left = 2,
``bbox`` [x, y, w, h]) read once by `LungAnnotations`; `LungBoxes` is the audit's view of them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256
from cxrscreen.io.xray import read_xray

LUNG_CLASSES: tuple[str, ...] = ("right_lung", "left_lung")  # detector labels 1 and 2 (= COCO category ids)
RIGHT, LEFT = 1, 2
LUNG_CATEGORIES: dict[int, str] = {RIGHT: "right", LEFT: "left"}  # COCO category id -> lung (patient's side)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in model pixels, half-open
FLIP_SWAP: dict[int, int] = {RIGHT: LEFT, LEFT: RIGHT}
ANNOTATIONS = "annotations/lung_boxes.coco.json"
BOXES_COLUMNS = ["image", "lung", "x0", "y0", "x1", "y1", "score", "source"]
# Mean normalised boxes (x0 / W, y0 / H, x1 / W, y1 / H) of the 151 annotated images of ../shared/data/cxr.
DEFAULT_ATLAS: dict[int, tuple[float, float, float, float]] = {
    RIGHT: (0.0782, 0.1072, 0.4580, 0.8220),
    LEFT: (0.5462, 0.1044, 0.9104, 0.8331),
}


def default_annotations_path(data_dir: str | Path) -> Path:
    """<manifest folder>/annotations/lung_boxes.coco.json."""
    return manifest_root(data_dir) / ANNOTATIONS


@dataclass
class ImageBoxes:
    """Lung boxes of one image in its original pixels: boxes (K, 4) x0 y0 x1 y1, lungs (K,) 1 / 2,
    scores (K,) (NaN for the atlas), and where they came from ("annotation", "localizer", "atlas")."""

    boxes: np.ndarray
    lungs: np.ndarray
    scores: np.ndarray
    source: str


class PathIndex:
    """A dict keyed by manifest ``image`` paths, looked up by any path that ends with the key.

    This matches a relative COCO ``file_name`` / boxes-file ``image`` to the absolute path of a file.
    """

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = {str(PurePosixPath(*Path(k).parts)): v for k, v in items.items()}
        self._lengths = sorted({len(PurePosixPath(k).parts) for k in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def get(self, path: str | Path) -> Any:
        parts = Path(path).parts
        for n in self._lengths:
            key = str(PurePosixPath(*parts[-n:])) if n <= len(parts) else None
            if key in self.items:
                return self.items[key]
        return None


def atlas_boxes(atlas: dict[int, tuple[float, float, float, float]], hw: tuple[int, int]) -> ImageBoxes:
    """The atlas boxes scaled to an image of shape (H, W)."""
    h, w = hw
    lungs = sorted(atlas)
    boxes = np.array([[x0 * w, y0 * h, x1 * w, y1 * h] for x0, y0, x1, y1 in (atlas[k] for k in lungs)], np.float32)
    return ImageBoxes(boxes, np.array(lungs, np.int64), np.full(len(lungs), np.nan, np.float32), "atlas")


@dataclass
class LungAnnotations:
    """The COCO lung boxes: per file_name ((H, W) annotated, ImageBoxes), and their atlas.

    annotated: COCO file_name -> ((H, W) of the annotated image, boxes x0, y0, x1, y1 as read, in file order).
    atlas: mean boxes as fractions (x0 / W, y0 / H, x1 / W, y1 / H), per lung label.
    """

    index: PathIndex
    atlas: dict[int, tuple[float, float, float, float]]
    path: str
    sha256: str
    annotated: dict[str, tuple[tuple[int, int], list[Box]]]

    @classmethod
    def from_coco(cls, path: str | Path) -> LungAnnotations:
        """Read a COCO file whose categories 1 and 2 are the right and left lung; CXRError if unusable."""
        try:
            coco = json.loads(Path(path).read_text())
            images = {im["id"]: im for im in coco["images"]}
            anns = list(coco["annotations"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CXRError(f"not a readable COCO lung-box file ({exc})", path) from exc
        per: dict[str, tuple[tuple[int, int], list[Box], list[int]]] = {}
        fractions: dict[int, list[tuple[float, ...]]] = {RIGHT: [], LEFT: []}
        for a in anns:
            if a.get("category_id") not in fractions or a.get("image_id") not in images:
                continue
            im = images[a["image_id"]]
            w, h = float(im["width"]), float(im["height"])
            x, y, bw, bh = map(float, a["bbox"])
            entry = per.setdefault(str(im["file_name"]), ((int(h), int(w)), [], []))
            entry[1].append((x, y, x + bw, y + bh))
            entry[2].append(int(a["category_id"]))
            fractions[a["category_id"]].append((x / w, y / h, (x + bw) / w, (y + bh) / h))
        if any(not v for v in fractions.values()):
            raise CXRError("the COCO file has no boxes for one of the lungs (categories 1, 2)", path)
        atlas = {k: tuple(float(f) for f in np.mean(v, axis=0)) for k, v in fractions.items()}
        index = {
            k: (hw, ImageBoxes(np.array(b, np.float32), np.array(lg, np.int64), np.ones(len(lg), np.float32),
                               "annotation"))
            for k, (hw, b, lg) in per.items()
        }
        annotated = {k: (hw, b) for k, (hw, b, _) in per.items()}
        return cls(PathIndex(index), atlas, str(path), file_sha256(path), annotated)  # type: ignore[arg-type]

    def boxes_for(self, path: str | Path, hw: tuple[int, int]) -> ImageBoxes | None:
        """The annotated boxes of a file scaled to shape (H, W), or None when it is not annotated."""
        hit = self.index.get(path)
        if hit is None:
            return None
        (ah, aw), ib = hit
        scale = np.array([hw[1] / aw, hw[0] / ah, hw[1] / aw, hw[0] / ah], np.float32)
        return dataclasses.replace(ib, boxes=ib.boxes * scale)


def read_boxes_file(path: str | Path) -> PathIndex:
    """A boxes CSV (``BOXES_COLUMNS``, as ``label_boxes`` writes it) -> PathIndex of ImageBoxes."""
    try:
        df = pd.read_csv(path, dtype={"image": str, "lung": str, "source": str})
    except (OSError, ValueError) as exc:
        raise CXRError(f"not a readable boxes file ({exc})", path) from exc
    missing = [c for c in BOXES_COLUMNS if c not in df.columns]
    if missing:
        raise CXRError(f"boxes file lacks column {missing[0]!r} (needs {', '.join(BOXES_COLUMNS)})", path)
    bad = ~df["lung"].isin(LUNG_CLASSES)
    if bad.any():
        raise CXRError(f"bad lung {df['lung'][bad].iloc[0]!r}; lungs are {', '.join(LUNG_CLASSES)}", path)
    out: dict[str, ImageBoxes] = {}
    for image, g in df.groupby("image", sort=False):
        out[str(image)] = ImageBoxes(
            g[["x0", "y0", "x1", "y1"]].to_numpy(np.float32),
            np.array([LUNG_CLASSES.index(lg) + 1 for lg in g["lung"]], np.int64),
            g["score"].to_numpy(np.float32),
            ",".join(sorted(set(g["source"]))),
        )
    return PathIndex(out)


class BoxSource:
    """Lung boxes for any image: the annotations first, then a boxes file, then the atlas."""

    def __init__(
        self,
        annotations: LungAnnotations | None = None,
        boxes_file: str | Path | None = None,
    ) -> None:
        self.annotations = annotations
        self.boxes_file = None if boxes_file is None else Path(boxes_file)
        self.file_index = None if boxes_file is None else read_boxes_file(boxes_file)
        self.atlas = annotations.atlas if annotations is not None else DEFAULT_ATLAS

    @classmethod
    def for_data(cls, data_dir: str | Path, boxes_file: str | Path | None = None) -> BoxSource:
        """The data folder's annotation file if it has one, and the boxes file if it exists."""
        ann = default_annotations_path(data_dir)
        bf = Path(boxes_file) if boxes_file is not None and Path(boxes_file).is_file() else None
        return cls(LungAnnotations.from_coco(ann) if ann.is_file() else None, bf)

    def get(self, path: str | Path, hw: tuple[int, int]) -> ImageBoxes:
        """Boxes of the file at ``path`` (original shape hw), from the first source that has it."""
        if self.annotations is not None and (ib := self.annotations.boxes_for(path, hw)) is not None:
            return ib
        if self.file_index is not None and (ib := self.file_index.get(path)) is not None:
            return ib
        return atlas_boxes(self.atlas, hw)

    def describe(self) -> dict[str, Any]:
        """What config.json records as "boxes_source"."""
        return {
            "order": "annotation, then boxes file, then atlas",
            "annotations": None if self.annotations is None else self.annotations.path,
            "annotations_sha256": None if self.annotations is None else self.annotations.sha256,
            "boxes_file": None if self.boxes_file is None else str(self.boxes_file),
            "boxes_file_sha256": None if self.boxes_file is None else file_sha256(self.boxes_file),
            "atlas": {LUNG_CLASSES[k - 1]: list(v) for k, v in sorted(self.atlas.items())},
            "atlas_from": "annotations" if self.annotations is not None else "DEFAULT_ATLAS",
        }


def image_sizes(data_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Resolved file path -> (H, W) from the manifest's width / height columns (where given)."""
    df = read_manifest(data_dir)
    if not {"width", "height"} <= set(df.columns):
        return {}
    out = {}
    for p, w, h in zip(resolve_image_paths(df, manifest_root(data_dir)), df["width"], df["height"], strict=True):
        if str(w).strip().isdigit() and str(h).strip().isdigit():
            out[str(p)] = (int(h), int(w))
    return out


def size_of(path: str | Path, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(H, W) of a file: from ``sizes`` or, failing that, by decoding it."""
    return sizes.get(str(path)) or tuple(read_xray(path).pixels.shape)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- lung boxes
@dataclass
class LungBoxes:
    """The audit's view of `LungAnnotations`: boxes as (x0, y0, x1, y1) tuples and the atlas keyed by
    "right" / "left".

    annotated: COCO file_name -> ((height, width) of the annotated image, boxes x0, y0, x1, y1).
    atlas: mean boxes as fractions (x0 / W, y0 / H, x1 / W, y1 / H), one per lung.
    """

    annotations: LungAnnotations

    @classmethod
    def from_coco(cls, path: str | Path) -> LungBoxes:
        """Read a COCO file whose categories 1 and 2 are the right and left lung (`LungAnnotations.from_coco`)."""
        return cls(LungAnnotations.from_coco(path))

    def __post_init__(self) -> None:
        self._index = PathIndex(self.annotations.annotated)

    @property
    def annotated(self) -> dict[str, tuple[tuple[int, int], list[Box]]]:
        return self.annotations.annotated

    @property
    def atlas(self) -> dict[str, Box]:
        return {LUNG_CATEGORIES[k]: v for k, v in sorted(self.annotations.atlas.items())}  # type: ignore[misc]

    @property
    def path(self) -> str:
        return self.annotations.path

    @property
    def sha256(self) -> str:
        return self.annotations.sha256

    def boxes_for(self, path: str | Path, hw: tuple[int, int]) -> tuple[list[Box], str]:
        """Boxes in the original pixels of an image of shape hw, and "annotated" or "atlas".

        An image is matched when its path ends with a COCO file_name (manifest `image` paths).
        """
        h, w = hw
        hit = self._index.get(path)
        if hit is not None:
            (ah, aw), boxes = hit
            sx, sy = w / aw, h / ah
            return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes], "annotated"
        return [(fx0 * w, fy0 * h, fx1 * w, fy1 * h) for fx0, fy0, fx1, fy1 in self.atlas.values()], "atlas"
