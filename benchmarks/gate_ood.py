"""Benchmark the "not a frontal chest X-ray" gate; prints one JSON object.

- real: the evaluation half of ../shared/data/cxr (md5(split_group) odd: no patient the gate was fitted on),
  accepted fraction overall and per source; target: >= 99 % accepted;
- seen kinds: fresh images (other seeds) of the kinds the gate was fitted on; unseen kinds: kinds never
  used for fitting (cxrscreen.gate.recipe.UNSEEN_KINDS); flagged fraction per kind; target: >= 95 % flagged;
- as_upload: the same non-X-rays decoded from bytes (as the web app does), where the colour rule cannot
  re-read the file: what the grey-level model alone catches;
- grey-level and aspect rules on every real X-ray (both halves; target: none flagged);
- transforms (information, no target): a fixed sample of evaluation X-rays saved as RGB JPEG, with a mild
  or a sepia colour cast, rotated, upside down, inverted, with gamma 0.7 / 1.4 or lower contrast, as a
  1-bit PNG, posterised to 8 levels, squeezed to 220 x 512 or 512 x 220, and as DICOM (no window: min-max
  scaled on reading) with ViewPosition PA / LL or Modality CT.

    .venv/bin/python benchmarks/gate_ood.py [--gate PATH] [--data ../shared/data/cxr]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrscreen.gate import recipe  # the data recipe shared with the fit (scripts/fit_gate.py)
from cxrscreen.gate.model import Gate, bundled_gate_path
from cxrscreen.io.xray import XRay, read_xray, read_xray_bytes
from cxrscreen.synthetic import to_uint8, write_dicom

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()


def _reason(flags: list[str]) -> str:
    """Which layer flagged: 'rule:<what>', 'logistic', 'novelty', 'logistic+novelty' or 'accepted'."""
    if not flags:
        return "accepted"
    first = flags[0]
    if first.startswith("not a chest radiograph"):
        return "rule:modality"
    if first.startswith("not a frontal view"):
        return "rule:view"
    if first.startswith("blank image"):
        return "rule:blank"
    if first.startswith("colour picture"):
        return "rule:colour"
    if first.startswith(("bilevel", "only ")):
        return "rule:grey_levels"
    if first.startswith("extreme aspect"):
        return "rule:aspect"
    kinds = ["logistic" if f.startswith("not a frontal chest X-ray") else "novelty" for f in flags]
    return "+".join(kinds)


def _frac(flags_per_item: list[list[str]], flagged: bool) -> dict[str, Any]:
    hits = sum(bool(f) == flagged for f in flags_per_item)
    n = len(flags_per_item)
    return {"fraction": round(hits / n, 4) if n else None, "n": n}


def bench_real(gate: Gate, data_dir: Path) -> tuple[dict[str, Any], list[XRay], list[float]]:
    """Accepted fraction of the evaluation half, overall and per source."""
    rows = recipe.real_manifest(data_dir, "eval")
    xrays, flags, times = [], [], []
    for p in rows["image"]:
        x = read_xray(data_dir / p)
        t = time.perf_counter()
        flags.append(gate.flags(x))
        times.append(time.perf_counter() - t)
        xrays.append(x)
    out: dict[str, Any] = {"accepted": _frac(flags, flagged=False), "per_source": {}}
    for src in sorted(rows["source"].unique()):
        out["per_source"][src] = _frac([f for f, s in zip(flags, rows["source"], strict=True) if s == src],
                                       flagged=False)
    out["rejected"] = [{"image": p, "flags": f} for p, f in zip(rows["image"], flags, strict=True) if f]
    return out, xrays, times


def bench_kinds(gate: Gate, kinds: dict[str, recipe.Generator], n: int, seed: int,
                folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flagged per kind as files, flagged per kind decoded from bytes) for ``n`` images per kind."""
    per_kind: dict[str, list[list[str]]] = {}
    upload: dict[str, list[list[str]]] = {}
    reasons: Counter[str] = Counter()
    for kind, x in recipe.make_others(kinds, n, folder, seed=seed, role="eval"):
        f = gate.flags(x)
        per_kind.setdefault(kind, []).append(f)
        reasons[_reason(f)] += 1
        xb = read_xray_bytes(Path(x.path).read_bytes(), name="<upload>")
        upload.setdefault(kind, []).append(gate.flags(xb))
    allf = [f for v in per_kind.values() for f in v]
    allu = [f for v in upload.values() for f in v]
    files = {"flagged": _frac(allf, flagged=True), "by_reason": dict(reasons.most_common()),
             "per_kind": {k: _frac(v, flagged=True) for k, v in per_kind.items()}}
    uploads = {"flagged": _frac(allu, flagged=True),
               "per_kind_below_95": {k: _frac(v, flagged=True) for k, v in upload.items()
                                     if _frac(v, flagged=True)["fraction"] < 0.95}}
    return files, uploads


def _dicom(path: Path, x: XRay, *, modality: str = "DX", view: str | None = "PA") -> Path:
    """``x`` as an 8-bit DICOM file with the given modality and view (None: no ViewPosition)."""
    return write_dicom(path, to_uint8(x.pixels), Modality=modality, **({"ViewPosition": view} if view else {}))


def _save(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.ascontiguousarray(arr)).save(path, quality=90)
    return path


def _save1(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def bench_new_rules_all_real(gate: Gate, data_dir: Path) -> dict[str, Any]:
    """Every real X-ray (both halves) against the grey-level and aspect rules: none may be flagged."""
    rows = recipe.real_manifest(data_dir)
    flagged, levels, portrait, landscape = [], [], [], []
    for p in rows["image"]:
        x = read_xray(data_dir / p)
        f = [r for r in gate.rules(x) if r.startswith(("bilevel", "only ", "extreme aspect"))]
        if f:
            flagged.append({"image": p, "flags": f})
        h, w = x.pixels.shape
        levels.append(x.meta["grey_levels"])
        portrait.append(h / w)
        landscape.append(w / h)
    return {"n": len(rows), "flagged": flagged, "min_grey_levels_seen": int(min(levels)),
            "max_height_over_width_seen": round(max(portrait), 4),
            "max_width_over_height_seen": round(max(landscape), 4),
            "limits": {"min_grey_levels": gate.min_grey_levels, "max_portrait": gate.max_portrait,
                       "max_landscape": gate.max_landscape}}


def bench_transforms(gate: Gate, xrays: list[XRay], n: int, seed: int, folder: Path) -> dict[str, Any]:
    """Flagged fraction of ``n`` evaluation X-rays under each transform (information only)."""
    rng = np.random.default_rng(seed)
    sample = [xrays[i] for i in rng.choice(len(xrays), size=min(n, len(xrays)), replace=False)]
    folder.mkdir(parents=True, exist_ok=True)
    casts = {"mild_tint": np.array([1.0, 0.96, 0.88]), "sepia": np.array([1.0, 0.8, 0.55])}
    out: dict[str, list[list[str]]] = {}
    for i, x in enumerate(sample):
        g = to_uint8(x.pixels)
        made = {
            "grey_as_rgb_jpeg": _save(np.repeat(g[..., None], 3, axis=2), folder / f"{i}_rgb.jpg"),
            "rotated_90": _save(np.rot90(g), folder / f"{i}_rot.png"),
            "upside_down": _save(g[::-1], folder / f"{i}_ud.png"),
            "inverted": _save(255 - g, folder / f"{i}_inv.png"),
            "gamma_0.7": _save(to_uint8(x.pixels ** 0.7), folder / f"{i}_g07.png"),
            "gamma_1.4": _save(to_uint8(x.pixels ** 1.4), folder / f"{i}_g14.png"),
            "low_contrast_0.8": _save(to_uint8(0.1 + 0.8 * x.pixels), folder / f"{i}_c08.png"),
            "one_bit_png": _save1(Image.fromarray(g).convert("1"), folder / f"{i}_1bit.png"),
            "posterised_8_levels": _save((g // 32 * 36).astype(np.uint8), folder / f"{i}_post8.png"),
            "squeezed_220x512": _save(np.asarray(Image.fromarray(g).resize((220, 512))), folder / f"{i}_sq.png"),
            "squeezed_512x220": _save(np.asarray(Image.fromarray(g).resize((512, 220))), folder / f"{i}_sql.png"),
            "dicom_dx_pa": _dicom(folder / f"{i}_pa.dcm", x),
            "dicom_view_ll": _dicom(folder / f"{i}_ll.dcm", x, view="LL"),
            "dicom_modality_ct": _dicom(folder / f"{i}_ct.dcm", x, modality="CT", view=None),
        }
        for name, cast in casts.items():
            rgb = np.clip(np.rint(g[..., None] * cast), 0, 255).astype(np.uint8)
            made[name] = _save(rgb, folder / f"{i}_{name}.jpg")
        for name, path in made.items():
            out.setdefault(name, []).append(gate.flags(read_xray(path)))
    return {k: {"flagged": _frac(v, flagged=True), "by_reason": dict(Counter(_reason(f) for f in v))}
            for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    """Run every part and print the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", type=Path, default=None, help="gate JSON (default: the bundled one)")
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-seen-kind", type=int, default=30)
    ap.add_argument("--per-unseen-kind", type=int, default=40)
    ap.add_argument("--transforms", type=int, default=200, help="X-rays per transform")
    args = ap.parse_args(argv)

    import cv2
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(1)
    threadpool_limits(1)
    gate_path = args.gate or bundled_gate_path()
    if gate_path is None:
        raise SystemExit("no gate JSON: run scripts/fit_gate.py first")
    gate = Gate.from_json(gate_path)
    t0 = time.perf_counter()
    real, xrays, times = bench_real(gate, args.data)
    new_rules = bench_new_rules_all_real(gate, args.data)
    with tempfile.TemporaryDirectory(prefix="gate_bench_") as tmp:
        seen, seen_up = bench_kinds(gate, recipe.SEEN_KINDS, args.per_seen_kind, args.seed, Path(tmp) / "s")
        unseen, unseen_up = bench_kinds(gate, recipe.UNSEEN_KINDS, args.per_unseen_kind, args.seed,
                                        Path(tmp) / "u")
        transforms = bench_transforms(gate, xrays, args.transforms, args.seed, Path(tmp) / "t")
    report = {
        "gate": str(gate_path),
        "gate_info": {k: gate.info.get(k) for k in ("fitted", "seed", "n_real", "n_other", "feature_version")},
        "thresholds": {"p": gate.p_threshold, "novelty_nll": gate.novelty_threshold,
                       "colour_fraction": gate.colour_fraction},
        "real_eval_half": real,
        "grey_level_and_aspect_rules_on_all_real": new_rules,
        "seen_kinds": seen,
        "unseen_kinds": unseen,
        "as_upload_no_colour_rule": {"seen_kinds": seen_up, "unseen_kinds": unseen_up},
        "real_transforms_information_only": transforms,
        "targets": {
            "real_accepted_ge_0.99": real["accepted"]["fraction"] >= 0.99,
            "seen_flagged_ge_0.95": seen["flagged"]["fraction"] >= 0.95,
            "unseen_flagged_ge_0.95": unseen["flagged"]["fraction"] >= 0.95,
            "no_real_flagged_by_level_or_aspect_rules": not new_rules["flagged"],
        },
        "gate_ms_per_image_median": round(1000 * float(np.median(times)), 2),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
