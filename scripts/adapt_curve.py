"""Site-adaptation learning curve with siim as the "new hospital".

A feature-head model trained without siim (the head fitted on the cxr train images, `configs/splits/cxr_grouped_seed0
.csv`) is adapted (`cxrscreen.training.adapt.adapt_head`: the site's films plus the replay of its training features)
with 25 / 50 / 100 / 200 siim films drawn by patient group from siim's train+val subsets (5 draws each), and tested
on siim's grouped test (COVID vs normal AUC, grouped 95 % CI) and, for forgetting, on the cxr grouped test (siim has
no pneumonia: its recall must survive). A "no replay" arm shows what the replay prevents. Features come from the
feature cache (the same frozen ImageNet weights the model holds).

    python scripts/adapt_curve.py --out docs/results/adapt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cxrscreen import CLASSES
from cxrscreen.data.subsets import load_subset
from cxrscreen.evaluation.calibration import softmax
from cxrscreen.evaluation.metrics import grouped_bootstrap_ci, safe_auc
from cxrscreen.runs.provenance import package_versions
from cxrscreen.training.adapt import adapt_head
from cxrscreen.training.feature_cache import FeatureCache
from cxrscreen.training.head import HeadRecipe, fit_logistic
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

COVID, NORMAL, PNEU = (CLASSES.index(c) for c in ("covid", "normal", "pneumonia"))


def figures(y: np.ndarray, p: np.ndarray, groups: list[str], n_boot: int) -> dict:
    """COVID AUC (with grouped CI), accuracy and per-class recall (arg-max) of one test set."""
    pred = p.argmax(1)

    def auc(i: np.ndarray) -> float | None:
        return safe_auc(y[i] == COVID, p[i, COVID])

    ci = grouped_bootstrap_ci(auc, groups, n_boot=n_boot, seed=0)
    return {"covid_auc": auc(np.arange(len(y))), "covid_auc_ci95": None if ci is None else list(ci),
            "accuracy": float((pred == y).mean()),
            "recall": {CLASSES[k]: float((pred[y == k] == k).mean()) for k in range(len(CLASSES)) if (y == k).any()}}


def draw_groups(groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole patient groups, drawn at random until n films are taken (the last group may be cut)."""
    order = rng.permutation(np.unique(groups))
    picked: list[int] = []
    for g in order:
        picked.extend(np.flatnonzero(groups == g).tolist())
        if len(picked) >= n:
            break
    return np.asarray(picked[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    ap.add_argument("--siim", type=Path, default=Path("../shared/data/siim"))
    ap.add_argument("--cxr-split", type=Path, default=Path("configs/splits/cxr_grouped_seed0.csv"))
    ap.add_argument("--siim-split", type=Path, default=Path("configs/splits/siim_grouped_seed0.csv"))
    ap.add_argument("--stages", default="blocks.2,blocks.3,blocks.4,blocks.5,blocks.6")
    ap.add_argument("--sizes", default="25,50,100,200")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("docs/results/adapt"))
    args = ap.parse_args()
    t0 = time.monotonic()
    recipe = HeadRecipe(stages=args.stages.split(","))
    pre = PreprocessedCache(recipe.preprocess, default_cache_dir())
    cache = FeatureCache(recipe.arch, recipe.preprocess, flip=recipe.flip)
    classes = list(CLASSES)

    def feats(data_dir: Path, split: Path, subset: str):  # noqa: ANN202
        d = load_subset(data_dir, split, subset, pre, classes)
        return cache.select_stages(cache.features(d.images), recipe.stages).astype(np.float64), d

    cx_tr, cxr_tr = feats(args.cxr, args.cxr_split, "train")
    cx_te, cxr_te = feats(args.cxr, args.cxr_split, "test")
    pools = [feats(args.siim, args.siim_split, s) for s in ("train", "val")]
    si_te, siim_te = feats(args.siim, args.siim_split, "test")
    pool_x = np.concatenate([p[0] for p in pools])
    pool_y = np.concatenate([p[1].labels for p in pools])
    pool_g = np.asarray([g for p in pools for g in p[1].groups])

    base = fit_logistic(cx_tr, cxr_tr.labels, cxr_tr.groups, n_classes=3, cs=recipe.cs)
    rng = np.random.default_rng(0)
    replay_idx = np.concatenate([rng.permutation(np.flatnonzero(cxr_tr.labels == k))[:300] for k in range(3)])
    rx, ry = cx_tr[replay_idx], cxr_tr.labels[replay_idx]

    def test(head) -> dict:  # noqa: ANN001
        return {"siim_test": figures(siim_te.labels, softmax(head.logits(si_te)), siim_te.groups, args.n_boot),
                "cxr_test": figures(cxr_te.labels, softmax(head.logits(cx_te)), cxr_te.groups, args.n_boot)}

    result: dict = {"model": {"recipe": recipe.to_dict(), "trained_on": "cxr train only", "C": base.c,
                              "replay_rows": int(len(ry))},
                    "before": test(base), "curve": [], "draws": args.draws, "n_boot": args.n_boot}
    for n in (int(s) for s in args.sizes.split(",")):
        for arm, (ax, ay) in (("replay", (rx, ry)), ("no replay", (rx[:0], ry[:0]))):
            runs = []
            for d in range(args.draws):
                idx = draw_groups(pool_g, n, np.random.default_rng(1000 * n + d))
                if len(np.unique(np.concatenate([pool_y[idx], ay]))) < 2:
                    continue
                head = adapt_head(pool_x[idx], pool_y[idx], list(pool_g[idx]), ax, ay, n_classes=3, cs=recipe.cs,
                                  seed=d)
                runs.append({"draw": d, "site_per_class": np.bincount(pool_y[idx], minlength=3).tolist(),
                             "C": head.c, **test(head)})
            aucs = [r["siim_test"]["covid_auc"] for r in runs]
            pneu = [r["cxr_test"]["recall"]["pneumonia"] for r in runs]
            cxr_auc = [r["cxr_test"]["covid_auc"] for r in runs]
            result["curve"].append({"films": n, "arm": arm, "runs": runs,
                                    "siim_auc_mean": float(np.mean(aucs)), "siim_auc_min": float(np.min(aucs)),
                                    "siim_auc_max": float(np.max(aucs)),
                                    "cxr_covid_auc_mean": float(np.mean(cxr_auc)),
                                    "cxr_pneumonia_recall_mean": float(np.mean(pneu))})
            print(f"{arm} {n}: siim AUC {np.mean(aucs):.3f} cxr pneumonia recall {np.mean(pneu):.3f}", flush=True)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["versions"] = package_versions()
    result["command"] = "python scripts/adapt_curve.py --out " + str(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapt_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adapt_curve.md").write_text(markdown(result))
    plot(result, args.out / "adapt_curve.png")


def markdown(r: dict) -> str:
    b = r["before"]
    ci = b["siim_test"]["covid_auc_ci95"]
    lines = ["# Site adaptation curve: siim as the new hospital (`python scripts/adapt_curve.py`)", "",
             f"Model: frozen {r['model']['recipe']['arch']} stages {r['model']['recipe']['stages']}, head fitted on "
             f"cxr train only (C = {r['model']['C']}); replay: {r['model']['replay_rows']} cxr training feature rows. "
             f"Each size: {r['draws']} draws of whole patient groups from siim train+val; tested on siim's grouped "
             "test (COVID vs normal AUC) and the cxr grouped test (forgetting: siim holds no pneumonia).", "",
             f"Before adaptation: siim test COVID AUC {b['siim_test']['covid_auc']:.3f} "
             f"[{ci[0]:.3f}, {ci[1]:.3f}], cxr test COVID AUC {b['cxr_test']['covid_auc']:.3f}, cxr pneumonia recall "
             f"{b['cxr_test']['recall']['pneumonia']:.3f}.", "",
             "| siim films | arm | siim test COVID AUC mean (min-max over draws) | first draw's grouped 95 % CI "
             "| cxr test COVID AUC | cxr pneumonia recall |", "|---|---|---|---|---|---|"]
    for c in r["curve"]:
        ci0 = c["runs"][0]["siim_test"]["covid_auc_ci95"]
        lines.append(f"| {c['films']} | {c['arm']} | {c['siim_auc_mean']:.3f} ({c['siim_auc_min']:.3f}-"
                     f"{c['siim_auc_max']:.3f}) | [{ci0[0]:.3f}, {ci0[1]:.3f}] | {c['cxr_covid_auc_mean']:.3f} | "
                     f"{c['cxr_pneumonia_recall_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("replay", "o-"), ("no replay", "s--")):
        rows = [c for c in r["curve"] if c["arm"] == arm]
        n = [c["films"] for c in rows]
        mean = np.array([c["siim_auc_mean"] for c in rows])
        lo = mean - np.array([c["siim_auc_min"] for c in rows])
        hi = np.array([c["siim_auc_max"] for c in rows]) - mean
        axes[0].errorbar(n, mean, yerr=[lo, hi], fmt=style, capsize=3, label=arm)
        axes[1].plot(n, [c["cxr_pneumonia_recall_mean"] for c in rows], style, label=arm)
    axes[0].axhline(r["before"]["siim_test"]["covid_auc"], color="grey", ls=":", label="before adaptation")
    axes[1].axhline(r["before"]["cxr_test"]["recall"]["pneumonia"], color="grey", ls=":", label="before adaptation")
    axes[0].set(xscale="log", xlabel="siim films used to adapt", ylabel="siim test COVID AUC",
                title="new hospital (siim test)")
    axes[1].set(xscale="log", xlabel="siim films used to adapt", ylabel="cxr test pneumonia recall",
                title="what it knew (cxr test)", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.set_xticks([c["films"] for c in r["curve"] if c["arm"] == "replay"])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
