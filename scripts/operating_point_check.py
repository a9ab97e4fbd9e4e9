"""COVID operating points chosen on val, checked on hospitals the heads never saw (issue 20).

`cxrscreen select` compares candidates at arg-max. A candidate can rank COVID well (AUC) and still call few
COVID films at arg-max (the lungs crops: external COVID AUC 0.83, COVID found 0.55), so this script asks what
each candidate does with the rule a hospital would ship: a COVID threshold chosen on the **val** subsets of the
cxr and siim grouped splits (the highest threshold whose val COVID sensitivity reaches `--sensitivity`), never
on the external set. For each named candidate (of one or more select YAMLs; C taken from `--c` or refitted by
grouped CV as `select` does) it reports, with patient-grouped 95 % CIs:
- the threshold and its val sensitivity / specificity;
- the cxr and siim grouped tests and the external set: COVID found (sensitivity) and others not called COVID;
- leave-one-source-out: the head refitted without the source, the threshold chosen again on the val images of
  the other sources, and on every image of the held-out source the share of its COVID films found and of its
  other films not called COVID.

    python scripts/operating_point_check.py --config configs/select.yaml --config configs/select_lungs.yaml \
        --candidate lite0_224_blocks2-6_merged --candidate lite0_224_blocks2-6_merged_lungs_no-clahe \
        --out docs/results/operating_point
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen import CLASSES
from cxrscreen.evaluation.calibration import softmax
from cxrscreen.evaluation.metrics import grouped_bootstrap_ci
from cxrscreen.io.files import write_json
from cxrscreen.runs.decision import DecisionRule, decide
from cxrscreen.runs.provenance import provenance
from cxrscreen.training.head import FittedHead
from cxrscreen.training.select import PARTS, Candidate, SelectConfig, _cat, _fit, _load

COVID = CLASSES.index("covid")


def val_threshold(labels: np.ndarray, p_covid: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose COVID sensitivity on (labels, p_covid) reaches `sensitivity`."""
    pos = np.sort(p_covid[labels == COVID])[::-1]
    if not len(pos):
        raise ValueError("no COVID image to choose a threshold on")
    k = int(np.ceil(sensitivity * len(pos))) - 1
    return float(pos[min(max(k, 0), len(pos) - 1)])


def rates(labels: np.ndarray, probs: np.ndarray, groups: list[str], threshold: float, n_boot: int
          ) -> dict[str, Any]:
    """COVID found and others not called COVID under the threshold rule, with grouped CIs (None where absent)."""
    pred = decide(probs, list(CLASSES), DecisionRule(threshold=threshold))
    out: dict[str, Any] = {"n": int(len(labels))}
    for name, mask_of, hit in (("covid_found", lambda i: labels[i] == COVID, lambda i: pred[i] == COVID),
                               ("others_not_covid", lambda i: labels[i] != COVID, lambda i: pred[i] != COVID)):
        def stat(i: np.ndarray, mask_of: Any = mask_of, hit: Any = hit) -> float | None:
            m = mask_of(i)
            return float(hit(i)[m].mean()) if m.any() else None

        v = stat(np.arange(len(labels)))
        ci = grouped_bootstrap_ci(stat, groups, n_boot=n_boot, seed=0) if v is not None else None
        out[name] = {"value": v, "ci95": None if ci is None else [ci[0], ci[1]]}
    return out


def check(cand: Candidate, cfg: SelectConfig, sensitivity: float, c: float | None, n_boot: int) -> dict[str, Any]:
    ld = _load(cand, cfg, print)
    train, x_train, in_parts = ld.train(cand)
    head = _fit(x_train, train, in_parts, cand.head, [c] if c else cand.head.cs)
    val = _cat([ld.subsets[(p, "val")] for p in PARTS])
    x_val = np.concatenate([ld.feats[(p, "val")] for p in PARTS])
    val_parts = np.isin(np.asarray([p for p in PARTS for _ in ld.subsets[(p, "val")].labels]), cand.train_on)

    def probs(h: FittedHead, x: np.ndarray) -> np.ndarray:
        return softmax(h.logits(x))

    pv = probs(head, x_val)[val_parts]
    lv = val.labels[val_parts]
    t = val_threshold(lv, pv[:, COVID], sensitivity)
    gv = list(np.asarray(val.groups)[val_parts])
    out: dict[str, Any] = {"name": cand.name, "chosen_C": head.c, "target_val_sensitivity": sensitivity,
                           "threshold": t, "val": rates(lv, pv, gv, t, n_boot)}
    for part in PARTS:
        s = ld.subsets[(part, "test")]
        out[f"{part}_test"] = rates(s.labels, probs(head, ld.feats[(part, "test")]), s.groups, t, n_boot)
    out["external"] = rates(ld.external.labels, probs(head, ld.x_ext), ld.external.groups, t, n_boot)
    everything = _cat([ld.subsets[k] for k in ld.subsets])
    x_all = np.concatenate([ld.feats[k] for k in ld.subsets])
    src_all, src_train, src_val = (np.asarray(d.sources) for d in (everything, train, val))
    loso: dict[str, Any] = {}
    for src in sorted(set(everything.sources)):
        held = _fit(x_train, train, in_parts & (src_train != src), cand.head, [head.c])
        keep = val_parts & (src_val != src)
        pk = probs(held, x_val[keep])
        if not (val.labels[keep] == COVID).any():
            continue
        th = val_threshold(val.labels[keep], pk[:, COVID], sensitivity)
        m = src_all == src
        loso[src] = {"threshold": th, **rates(everything.labels[m], probs(held, x_all[m]),
                                              list(np.asarray(everything.groups)[m]), th, n_boot)}
    out["loso"] = loso
    return out


def fmt(r: dict[str, Any], key: str) -> str:
    v = r.get(key)
    if not v or v["value"] is None:
        return "-"
    return f"{v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v["ci95"] else f"{v['value']:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# COVID operating points chosen on val, checked on unseen hospitals (`scripts/operating_point_check.py`)",
             "", "Threshold: the highest whose val COVID sensitivity reaches the target; never fitted on the external "
             "set. Grouped 95 % CIs.", "",
             "| candidate | target val sens | threshold | cxr test found / others not COVID | siim test found / "
             "others not COVID | external found | external others not COVID |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['target_val_sensitivity']} | {r['threshold']:.3f} | "
                     f"{fmt(r['cxr_test'], 'covid_found')} / {fmt(r['cxr_test'], 'others_not_covid')} | "
                     f"{fmt(r['siim_test'], 'covid_found')} / {fmt(r['siim_test'], 'others_not_covid')} | "
                     f"{fmt(r['external'], 'covid_found')} | {fmt(r['external'], 'others_not_covid')} |")
    lines += ["", "## Leave-one-source-out (threshold chosen again on the other sources' val images)", "",
              "| candidate | target | " + " | ".join(sorted(rows[0]["loso"])) + " |",
              "|---|---|" + "---|" * len(rows[0]["loso"])]
    for r in rows:
        cells = []
        for src in sorted(rows[0]["loso"]):
            h = r["loso"].get(src, {})
            cells.append(f"found {fmt(h, 'covid_found')}; others not COVID {fmt(h, 'others_not_covid')}")
        lines.append(f"| {r['name']} | {r['target_val_sensitivity']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, action="append", required=True, help="select YAML (repeatable)")
    ap.add_argument("--candidate", action="append", required=True, help="candidate name (repeatable)")
    ap.add_argument("--sensitivity", type=float, action="append", default=None,
                    help="target val COVID sensitivity (repeatable; default 0.90)")
    ap.add_argument("--c", type=float, default=None, help="the head's C (default: grouped CV as select does)")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfgs = [SelectConfig.from_yaml(p) for p in args.config]
    found = {c.name: (c, cfg) for cfg in cfgs for c in cfg.candidates}
    missing = [n for n in args.candidate if n not in found]
    if missing:
        raise SystemExit(f"no candidate named {', '.join(missing)} in {', '.join(map(str, args.config))}")
    rows = [check(*found[n], s, args.c, args.n_boot) for n in args.candidate for s in (args.sensitivity or [0.90])]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "operating_point.json", {"rows": rows, "provenance": provenance()})
    (args.out / "operating_point.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
