"""Output pictures stay inside their folder: a manifest's absolute or ".." image paths once made `predict
--heatmap DIR` write each heatmap beside its input X-ray (into the user's data folder), not into DIR."""

from __future__ import annotations

from pathlib import Path

from cxrscreen.predict.inputs import OutputNames, gather, safe_label


def test_labels_from_absolute_or_parent_paths_stay_relative():
    assert safe_label("/data/xrays/a.png") == Path("data/xrays/a.png")
    assert safe_label("../../etc/a.png") == Path("etc/a.png")
    assert safe_label("site/a.png") == Path("site/a.png")
    assert safe_label("/") == Path("input") and safe_label("..") == Path("input")


def test_output_paths_stay_inside_the_output_folder(tmp_path: Path):
    out = tmp_path / "heatmaps"
    names = OutputNames(out)
    for label in (Path("/data/xrays/a.png"), Path("../../a.png"), Path("a.png")):
        p = names.path(label, "heatmap")
        assert p.resolve().is_relative_to(out.resolve()), p


def test_manifest_with_absolute_image_paths_names_outputs_inside_the_folder(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.png").write_bytes(b"")
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "list.csv"
    csv.write_text(f"image\n{data / 'x.png'}\n../data/x.png\n")
    inputs = gather([csv]).inputs
    assert [i.path.resolve() for i in inputs] == [(data / "x.png").resolve()] * 2
    out = tmp_path / "heatmaps"
    names = OutputNames(out)
    written = [names.path(i.label, "heatmap") for i in inputs]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not any(p.parent == data for p in written) and len(set(written)) == 2
