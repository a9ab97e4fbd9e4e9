"""What predict calls: :class:`SeverityScorer` adds ``res["severity"]`` to a classifier's result.

Severity is given only to an image the classifier does not call normal and the gate does not flag
(``applies``); otherwise ``res["severity"]`` is None. The scores: geographic extent (0-8) and opacity (0-6)
from the regressor; ``per_lung`` {right, left} (0-4) and six ``zones`` (Brixia layout: thirds of each
lung's height) spread the geographic extent over the lungs by the regressor's spatial map
(``zones.ESTIMATE_NOTE``). The lungs are those the lung segmenter finds (``cxrscreen.lungs``); a lung it does
not find (under MIN_LUNG_FRACTION of the image) falls back to its box from a localizer run when one is given
(best box per lung scoring >= 0.3), else from the atlas (``lung_boxes_source`` says which, per lung). A
regressor on per-lung features averages its features as it was fitted: over the atlas boxes ("lungs" pooling) or
over the segmented lungs ("lung_masks", the atlas box standing in for a lung not found), whose spatial map then
shares out its extent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import XRay
from cxrscreen.lungs.masks import LUNG_LABELS, lung_box, zone_masks
from cxrscreen.severity.features import FeatureExtractor, build_backbone
from cxrscreen.severity.model import CONFIG_FILE, SeverityRegressor
from cxrscreen.severity.scores import TARGETS
from cxrscreen.severity.zones import ESTIMATE_NOTE, LUNG_MAX, LUNGS, allocate, brixia_of_extent, lung_zones


def box_region(box: list[float], hw: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) map that is True inside box [x0, y0, x1, y1] (clipped to the image)."""
    h, w = hw
    out = np.zeros((h, w), bool)
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w)), int(np.clip(np.floor(box[1]), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, w)), int(np.clip(np.ceil(box[3]), 0, h))
    out[y0:y1, x0:x1] = True
    return out

MIN_LOCALIZER_SCORE = 0.3
MIN_LUNG_FRACTION = 0.01  # a segmented lung below 1 % of the image counts as not found


class SeverityScorer:
    """Severity of one X-ray: the regressor on its backbone features, lung boxes, per-lung and zones."""

    def __init__(self, regressor: SeverityRegressor, classifier: Any = None, *, localizer: Any = None,
                 normal_class: str = "normal", lungs: Any = None) -> None:
        self.regressor = regressor
        want = regressor.meta.get("classifier_weights_sha256")
        if regressor.spec.backbone == "model" and classifier is not None and want and \
                classifier.config.get("weights_sha256") != want:
            raise CXRError("this severity regressor was fitted on another classifier's features (weights sha256 "
                           f"{want[:12]}...); refit it with `cxrscreen severity fit`", classifier.run_dir)
        module = classifier.model if classifier is not None else None
        self.extractor = FeatureExtractor(build_backbone(regressor.spec, module), regressor.spec)
        self.localizer = localizer
        self.normal_class = normal_class
        self._lungs = lungs  # a LungSegmenter; None: the bundled one on first use; False: boxes only

    def lung_mask(self, pixels: np.ndarray) -> np.ndarray | None:
        """The segmented lungs' label map (original size), None when segmentation is switched off."""
        if self._lungs is False:
            return None
        if self._lungs is None:
            from cxrscreen.lungs.segmenter import bundled_segmenter

            self._lungs = bundled_segmenter()
        return self._lungs.segment(pixels).mask

    @classmethod
    def for_run(cls, run: Any, *, localizer: Any = None) -> SeverityScorer:
        """The regressor saved in a run directory (the bundled model's: src/cxrscreen/weights)."""
        if not (Path(run.run_dir) / CONFIG_FILE).is_file():
            raise CXRError("this model ships no severity regressor (severity.json); fit one with "
                           "`cxrscreen severity fit`", run.run_dir)
        return cls(SeverityRegressor.load(run.run_dir), run, localizer=localizer)

    def applies(self, res: dict[str, Any]) -> bool:
        """True for a result with a class that is not normal, no error and no gate flag."""
        return (not res.get("error") and not res.get("flags") and res.get("class") is not None
                and res["class"] != self.normal_class)

    def annotate(self, res: dict[str, Any], xray: XRay) -> dict[str, Any]:
        """Set res["severity"]: the scores when `applies`, else None. Returns res."""
        res["severity"] = self.score(xray) if self.applies(res) else None
        return res

    def lung_boxes(self, pixels: np.ndarray) -> tuple[dict[str, list[float]], dict[str, str]]:
        """{right, left: [x0, y0, x1, y1]} in original pixels and where each came from."""
        from cxrscreen.data.lung_boxes import DEFAULT_ATLAS, LEFT, RIGHT, atlas_boxes

        h, w = pixels.shape
        atlas = atlas_boxes(DEFAULT_ATLAS, (h, w))
        boxes = {lg: [float(v) for v in atlas.boxes[list(atlas.lungs).index(k)]] for lg, k in zip(LUNGS, (RIGHT, LEFT),
                                                                                                     strict=True)}
        source = dict.fromkeys(LUNGS, "atlas")
        if self.localizer is not None:
            from cxrscreen.tasks.detection import best_per_lung, detect, to_original
            from cxrscreen.transforms.preprocess import Preprocessor

            img, geom = Preprocessor(self.localizer.preprocess)(pixels)
            best = to_original(best_per_lung(detect(self.localizer.model, img[None])[0]), geom)
            for lg, k in zip(LUNGS, (RIGHT, LEFT), strict=True):
                m = (best["labels"] == k) & (best["scores"] >= MIN_LOCALIZER_SCORE)
                if m.any():
                    boxes[lg] = [float(v) for v in best["boxes"][m][0]]
                    source[lg] = "localizer"
        return boxes, source

    def score(self, xray: XRay) -> dict[str, Any]:
        """The severity dict of one X-ray (see the module)."""
        img, geom = self.extractor.prepare(xray.pixels)
        maps = self.extractor.maps([img])
        size = img.shape[0]
        mask = self.lung_mask(xray.pixels)
        if self.regressor.spec.pooling == "lung_masks":  # the segmented lungs (atlas boxes for one not found)
            from cxrscreen.lungs.masks import mask_to_model

            grid = mask_to_model(mask if mask is not None else np.zeros(geom.original_hw, np.uint8), geom)
            pred = self.regressor.predict(self.extractor.features(maps, [geom], [grid]))[0]
            smap = self.regressor.spatial_map([m[0] for m in maps], size,
                                              weights=self.extractor.lung_weights(grid, geom))
        else:
            pred = self.regressor.predict(self.extractor.features(maps, [geom]))[0]
            regions = self.extractor.regions(geom) if self.regressor.spec.pooling != "image" else None
            smap = self.regressor.spatial_map([m[0] for m in maps], size, regions)
        smap = smap[TARGETS.index("geographic_extent")]
        total = float(pred[TARGETS.index("geographic_extent")])
        boxes, source = self.lung_boxes(xray.pixels)
        heat = geom.to_original(smap, fill=0.0)  # the spatial map on the original grid
        h, w = heat.shape
        regions: dict[str, np.ndarray] = {}  # lung -> boolean region; zone letter -> boolean region
        zones = lung_zones(boxes)
        seg_zones = {z["brixia"]: z for z in zone_masks(mask)} if mask is not None else {}
        for lg in LUNGS:
            found = mask is not None and (mask == LUNG_LABELS[lg]).mean() >= MIN_LUNG_FRACTION
            if found:
                regions[lg] = mask == LUNG_LABELS[lg]
                boxes[lg] = lung_box(mask, lg)  # type: ignore[assignment]
                source[lg] = "segmentation"
            else:
                regions[lg] = box_region(boxes[lg], (h, w))
            for z in zones:
                if z["lung"] != lg:
                    continue
                if found:
                    z["box"] = seg_zones[z["brixia"]]["box"]
                    regions[z["brixia"]] = seg_zones[z["brixia"]]["mask"]
                else:
                    regions[z["brixia"]] = box_region(z["box"], (h, w))

        def weight(key: str) -> float:
            r = regions[key]
            return max(float(heat[r].mean()), 0.0) if r.any() else 0.0

        per_lung = dict(zip(LUNGS, allocate(total, [weight(lg) for lg in LUNGS], LUNG_MAX), strict=True))
        for lg in LUNGS:
            mine = [z for z in zones if z["lung"] == lg]
            # a lung's 0-4 extent is its mean over its three equal zones: each zone gets 3 x the lung's share
            vals = allocate(3 * per_lung[lg], [weight(z["brixia"]) for z in mine], LUNG_MAX)
            for z, v in zip(mine, vals, strict=True):
                z["extent_estimate"] = round(v, 2)
                z["brixia_score"] = brixia_of_extent(v)
                z["box"] = None if z["box"] is None else [round(c, 1) for c in z["box"]]
        return {
            "geographic_extent": round(total, 2),
            "opacity": round(float(pred[TARGETS.index("opacity")]), 2),
            "per_lung": {lg: round(v, 2) for lg, v in per_lung.items()},
            "zones": zones,
            "lung_boxes": {lg: [round(c, 1) for c in b] for lg, b in boxes.items()},
            "lung_boxes_source": source,
            "estimate": ESTIMATE_NOTE,
        }
