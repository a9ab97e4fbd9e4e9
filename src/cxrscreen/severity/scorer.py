"""What predict calls: :class:`SeverityScorer` adds ``res["severity"]`` to a classifier's result.

Severity is given only to an image the classifier does not call normal and the gate does not flag
(``applies``); otherwise ``res["severity"]`` is None. The scores: geographic extent (0-8) and opacity (0-6)
from the regressor; ``per_lung`` {right, left} (0-4) and six ``zones`` (Brixia layout) spread the
geographic extent over the lung boxes by the regressor's spatial map (``zones.ESTIMATE_NOTE``). Lung boxes
come from a localizer run when one is given (best box per lung scoring >= 0.3), else from the atlas
(``lung_boxes_source`` says which, per lung). A regressor on per-lung features ("lungs" pooling) always
averages its features over the atlas boxes, as it was fitted; the localizer's boxes only place the zones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import XRay
from cxrscreen.severity.features import FeatureExtractor, build_backbone
from cxrscreen.severity.model import CONFIG_FILE, SeverityRegressor
from cxrscreen.severity.scores import TARGETS
from cxrscreen.severity.zones import ESTIMATE_NOTE, LUNG_MAX, LUNGS, allocate, lung_zones, region_mean

MIN_LOCALIZER_SCORE = 0.3


class SeverityScorer:
    """Severity of one X-ray: the regressor on its backbone features, lung boxes, per-lung and zones."""

    def __init__(self, regressor: SeverityRegressor, classifier: Any = None, *, localizer: Any = None,
                 normal_class: str = "normal") -> None:
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
        pred = self.regressor.predict(self.extractor.features(maps, [geom]))[0]
        total = float(pred[TARGETS.index("geographic_extent")])
        size = img.shape[0]
        regions = self.extractor.regions(geom) if self.regressor.spec.pooling != "image" else None
        smap = self.regressor.spatial_map([m[0] for m in maps], size, regions)[TARGETS.index("geographic_extent")]
        boxes, source = self.lung_boxes(xray.pixels)
        zones = lung_zones(boxes)

        def weight(box: list[float]) -> float:
            v = region_mean(smap, geom.box_to_model(tuple(box)))  # type: ignore[arg-type]
            return 0.0 if v is None else max(v, 0.0)

        per_lung = dict(zip(LUNGS, allocate(total, [weight(boxes[lg]) for lg in LUNGS], LUNG_MAX), strict=True))
        for lg in LUNGS:
            mine = [z for z in zones if z["lung"] == lg]
            # a lung's 0-4 extent is its mean over its three equal zones: each zone gets 3 x the lung's share
            vals = allocate(3 * per_lung[lg], [weight(z["box"]) for z in mine], LUNG_MAX)
            for z, v in zip(mine, vals, strict=True):
                z["extent_estimate"] = round(v, 2)
                z["box"] = [round(c, 1) for c in z["box"]]
        return {
            "geographic_extent": round(total, 2),
            "opacity": round(float(pred[TARGETS.index("opacity")]), 2),
            "per_lung": {lg: round(v, 2) for lg, v in per_lung.items()},
            "zones": zones,
            "lung_boxes": {lg: [round(c, 1) for c in b] for lg, b in boxes.items()},
            "lung_boxes_source": source,
            "estimate": ESTIMATE_NOTE,
        }
