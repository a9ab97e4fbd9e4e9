"""The audit's masking part with segmented lungs: synthetic X-rays, the bundled segmenter, a tiny random run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrscreen.audit.masking import (
    CONDITIONS,
    MaskingSet,
    apply_region,
    lung_mask,
    margin_px,
    masking_report,
    pixel_boxes,
    segmented_region,
)
from cxrscreen.data.subsets import SubsetData
from cxrscreen.evaluation.evaluate import run_probabilities
from cxrscreen.lungs.masks import LEFT, RIGHT, lung_box
from cxrscreen.lungs.segmenter import bundled_segmenter
from cxrscreen.runs.decision import DecisionRule, decide
from cxrscreen.runs.run_dir import load_run
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor
from tests.batch_fixtures import make_tiny_run
from tests.conftest import synthetic_cxr

pytestmark = pytest.mark.usefixtures("one_thread")


def ellipse_lungs(h: int, w: int) -> np.ndarray:
    """Two elliptical lungs (right lung on the image's left), as synthetic_cxr draws them."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), np.uint8)
    for cx, k in ((0.3 * w, RIGHT), (0.7 * w, LEFT)):
        out[((xx - cx) / (0.17 * w)) ** 2 + ((yy - 0.5 * h) / (0.32 * h)) ** 2 < 1] = k
    return out


def test_segmented_region_follows_the_lungs_not_their_boxes() -> None:
    h, w = 300, 240
    pre = Preprocessor(PreprocessConfig(image_size=64, clahe=False))
    img, geom = pre(synthetic_cxr(h, w))
    labels = ellipse_lungs(h, w)
    region = segmented_region(labels, geom, margin=0.05)
    boxes = pixel_boxes(geom, [lung_box(labels, "right"), lung_box(labels, "left")])
    box_region = lung_mask(64, boxes)
    r = margin_px(64, 0.05)
    assert r == 3
    # the lungs' centres are inside, the corners of the lung boxes outside (the ellipses do not fill them)
    x0, y0, x1, y1 = boxes[0]
    assert region[(y0 + y1) // 2, (x0 + x1) // 2]
    assert box_region[y0, x0] and not region[y0, x0]
    # dilation: a pixel r - 1 beyond the undilated lung is in the region, one 2 r + 2 beyond is not
    undilated = segmented_region(labels, geom, margin=0.0)
    assert undilated.sum() < box_region.sum() < region.sum()
    assert margin_px(64, 0.0) == 1  # at least one pixel
    cy = (y0 + y1) // 2
    left_edge = int(np.nonzero(undilated[cy])[0].min())
    assert region[cy, left_edge - r + 1] and not region[cy, left_edge - 2 * r - 2]
    # lungs_masked keeps every pixel outside the segmented lungs, including the box corners
    masked, only = apply_region(img, region, "lungs_masked"), apply_region(img, region, "lungs_only")
    assert (masked[region] == 0).all() and (masked[~region] == img[~region]).all()
    assert (only[~region] == 0).all() and (only[region] == img[region]).all()
    assert masked[y0, x0] == img[y0, x0] != 0
    with pytest.raises(ValueError):
        apply_region(img, region, "lungs")


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny random 64 px run and a MaskingSet of 24 synthetic X-rays: segmented lungs from the bundled
    segmenter, boxes that cover the whole lung fields (wider than the lungs)."""
    run = load_run(make_tiny_run(tmp_path_factory.mktemp("run")))
    pre = Preprocessor(run.preprocess)
    seg = bundled_segmenter()
    images, geoms, boxes, regions = [], [], [], []
    for i in range(24):
        h, w = 220 + 4 * i, 200 + 3 * (i % 5)
        lesion = (40 + 3 * i, 60 + 2 * i) if i % 3 else None
        pixels = synthetic_cxr(h, w, lesion=lesion, seed=i)
        img, geom = pre(pixels)
        images.append(img)
        geoms.append(geom)
        fields = [(0.05 * w, 0.1 * h, 0.48 * w, 0.9 * h), (0.52 * w, 0.1 * h, 0.95 * w, 0.9 * h)]
        boxes.append(pixel_boxes(geom, fields))
        regions.append(segmented_region(seg.segment(pixels).mask, geom))
    n = len(images)
    data = SubsetData(images=np.stack(images), labels=np.arange(n) % 3, groups=[f"g{i}" for i in range(n)],
                      sources=["a" if i % 2 else "b" for i in range(n)], paths=[f"img{i}.png" for i in range(n)],
                      errors={})
    ms = MaskingSet(data=data, geometries=geoms, boxes=boxes, kinds=["atlas"] * n, segmented=regions,
                    lung_source="segmenter")
    return run, ms


def test_masking_set_uses_the_segmented_lungs(synthetic_set: tuple) -> None:
    _, ms = synthetic_set
    assert ms.sources() == ["segmenter", "boxes"]
    masked = ms.images("lungs_masked")
    for i in range(len(ms.boxes)):
        seg, box = ms.region(i), ms.region(i, "boxes")
        assert seg.any() and (seg != box).any()
        # pixels outside the segmented lungs are kept, even where a box would have blacked them out
        assert (masked[i][~seg] == ms.data.images[i][~seg]).all() and (masked[i][seg] == 0).all()
        assert (box & ~seg & (ms.data.images[i] > 0)).any()
    assert (ms.images("lungs_masked", "boxes")[0][ms.region(0, "boxes")] == 0).all()
    boxes_only = MaskingSet(ms.data, ms.geometries, ms.boxes, ms.kinds)
    assert boxes_only.sources() == ["boxes"]
    with pytest.raises(ValueError, match="segmenter"):
        boxes_only.region(0, "segmenter")


def test_masking_report_names_the_source_and_compares_with_boxes(synthetic_set: tuple) -> None:
    run, ms = synthetic_set
    rep = masking_report(run, ms, n_boot=10, seed=0)
    assert rep["lung_source"] == "segmenter" and "dilated" in rep["segment_note"]
    assert rep["subsets"] == rep["segmented"]["subsets"] and rep["boxes"]["lung_source"] == "boxes"
    # the main figures are those of the segmented images, not of the boxed ones
    rule = DecisionRule(threshold=run.decision_rule().threshold)
    for source, key in (("segmenter", "segmented"), ("boxes", "boxes")):
        pred = decide(run_probabilities(run, ms.images("lungs_masked", source)), run.classes, rule)
        got = rep[key]["subsets"]["all"]["lungs_masked"]["predicted"]
        assert got == {c: int((pred == k).sum()) for k, c in enumerate(run.classes)}, source
        cov = np.mean([ms.region(i, source).mean() for i in range(len(ms.kinds))])
        assert rep[key]["mean_coverage"] == pytest.approx(cov)
    assert rep["segmented"]["mean_coverage"] < rep["boxes"]["mean_coverage"]
    cmp = rep["comparison"]
    for c in CONDITIONS[1:]:
        auc = cmp[c]["covid_auc"]
        assert auc["segmented"] == rep["segmented"]["subsets"]["all"][c]["covid_auc"]["value"]
        assert auc["boxes"] == rep["boxes"]["subsets"]["all"][c]["covid_auc"]["value"]
        assert auc["difference"] == pytest.approx(auc["segmented"] - auc["boxes"])
    assert "segmented lungs instead of lung boxes" in cmp["finding"] and cmp["finding"] in rep["finding"]
    assert "segmented lungs" in rep["finding"]
    # boxes as the main source: the same box figures, no comparison
    boxed = MaskingSet(ms.data, ms.geometries, ms.boxes, ms.kinds)
    rb = masking_report(run, boxed, n_boot=10, seed=0)
    assert rb["lung_source"] == "boxes" and "comparison" not in rb and "segmented" not in rb
    assert rb["subsets"] == rep["boxes"]["subsets"]


def test_unknown_lung_source_is_refused(tmp_path: Path) -> None:
    from cxrscreen.audit.masking import masking_set

    run = load_run(make_tiny_run(tmp_path / "run"))
    with pytest.raises(ValueError, match="lung_source"):
        masking_set(run, tmp_path, tmp_path / "split.csv", None, lung_source="atlas")  # type: ignore[arg-type]


def test_run_audit_refuses_an_unknown_lung_source(tmp_path: Path) -> None:
    from cxrscreen.audit.run import run_audit
    from cxrscreen.errors import CXRError

    with pytest.raises(CXRError, match="unknown lung source 'atlas'"):
        run_audit(tmp_path, tmp_path, tmp_path / "split.csv", tmp_path / "out", lung_source="atlas")
