"""Which data generalises? Frozen ImageNet features + logistic regression, trained on cxr alone or on the
merge with siim, tested inside (cxr test, siim test) and leave-one-source-out (LOSO).

A cheap stand-in for fine-tuning (minutes, not hours) that answers the data question of issue 10 before
the expensive run. Prints JSON (and writes it with --out).

    python scripts/frozen_probe.py --data data/merged --split configs/splits/merged_grouped_seed0.csv \
        --out docs/results/data_choice/frozen_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxrscreen import CLASSES
from cxrscreen.data.subsets import load_subset
from cxrscreen.models.registry import create_model
from cxrscreen.runs.provenance import package_versions
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir
from cxrscreen.transforms.preprocess import PreprocessConfig, to_model_tensor

CXR_SOURCES = ("cohen", "covid-cxnet", "nih", "rsna")


@torch.no_grad()
def features(arch: str, images: np.ndarray, pre: PreprocessConfig, batch: int = 64) -> np.ndarray:
    """Global-pooled ImageNet features (N, D) of preprocessed uint8 images."""
    model = create_model(arch, num_classes=3, weights="imagenet").eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([to_model_tensor(im, pre) for im in images[i:i + batch]])
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def figures(y: np.ndarray, p: np.ndarray, sources: np.ndarray) -> dict:
    """Accuracy, macro-F1, COVID-vs-rest AUC / sensitivity / specificity (arg-max), and per source."""
    covid = CLASSES.index("covid")
    pred = p.argmax(1)

    def block(m: np.ndarray) -> dict:
        yc, pc = y[m] == covid, pred[m] == covid
        return {
            "n": int(m.sum()),
            "accuracy": round(float((pred[m] == y[m]).mean()), 4),
            "macro_f1": round(float(f1_score(y[m], pred[m], average="macro")), 4),
            "covid_auc": round(float(roc_auc_score(yc, p[m, covid])), 4) if 0 < yc.sum() < len(yc) else None,
            "covid_sensitivity": round(float(pc[yc].mean()), 4) if yc.any() else None,
            "covid_specificity": round(float((~pc[~yc]).mean()), 4) if (~yc).any() else None,
        }

    out = block(np.ones(len(y), bool))
    out["per_source"] = {s: block(sources == s) for s in sorted(set(sources))}
    return out


def fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(scaler.transform(x), y)
    return scaler, clf


def probs(model: tuple[StandardScaler, LogisticRegression], x: np.ndarray) -> np.ndarray:
    scaler, clf = model
    p = np.zeros((len(x), len(CLASSES)))
    p[:, clf.classes_] = clf.predict_proba(scaler.transform(x))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the merged manifest folder")
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--c", type=float, default=0.05, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre = PreprocessConfig(image_size=args.image_size, clahe=True, center_fraction=0.9, mean=0.5, std=0.5)
    cache = PreprocessedCache(pre, default_cache_dir())
    t0 = time.monotonic()
    subsets = {s: load_subset(args.data, args.split, s, cache, list(CLASSES)) for s in ("train", "val", "test")}
    feats = {s: features(args.arch, d.images, pre) for s, d in subsets.items()}
    t_feat = time.monotonic() - t0
    tr, te = subsets["train"], subsets["test"]
    tr_src, te_src = np.asarray(tr.sources), np.asarray(te.sources)
    in_cxr_tr, in_cxr_te = np.isin(tr_src, CXR_SOURCES), np.isin(te_src, CXR_SOURCES)

    result: dict = {"arch": args.arch, "preprocess": pre.to_dict(), "C": args.c, "feature_seconds": round(t_feat, 1)}
    for name, keep in (("cxr", in_cxr_tr), ("merged", np.ones(len(tr_src), bool))):
        model = fit(feats["train"][keep], tr.labels[keep], args.c)
        p = probs(model, feats["test"])
        internal = {"cxr_test": figures(te.labels[in_cxr_te], p[in_cxr_te], te_src[in_cxr_te]),
                    "siim_test": figures(te.labels[~in_cxr_te], p[~in_cxr_te], te_src[~in_cxr_te])}
        loso = {}
        for src in sorted(set(te_src)):
            if not keep[tr_src == src].any():  # a source this arm never trains on is already held out
                m = te_src == src
                loso[src] = figures(te.labels[m], p[m], te_src[m])
                continue
            held = fit(feats["train"][keep & (tr_src != src)], tr.labels[keep & (tr_src != src)], args.c)
            m = te_src == src
            loso[src] = figures(te.labels[m], probs(held, feats["test"][m]), te_src[m])
        result[f"train_{name}"] = {
            "train_images": int(keep.sum()), "internal": internal, "loso": loso,
            "loso_worst_accuracy": min(v["accuracy"] for v in loso.values()),
        }
    result["versions"] = package_versions()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
