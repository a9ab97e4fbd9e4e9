"""Train / val / test splits of a manifest, always by ``split_group`` (no group in two subsets).

Every split function takes the manifest DataFrame (columns ``image``, ``label``, ``split_group``, and
``source`` for :func:`split_source`) and returns a DataFrame ``image, subset`` in manifest order. All are
deterministic for a seed (numpy ``default_rng(seed)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.data.manifest import LABELS, check_columns, read_csv_strings, read_manifest
from cxrscreen.errors import CXRError

SUBSETS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS: tuple[str, ...] = ("image", "subset")

# The reference study's protocol: images per class in train and test.
PAPER_COUNTS: dict[str, dict[str, int]] = {
    "train": {"covid": 104, "normal": 205, "pneumonia": 204},
    "test": {"covid": 100, "normal": 444, "pneumonia": 443},
}

_TRAIN, _VAL, _TEST = 0, 1, 2


# ---------------------------------------------------------------------------------------------- helpers
def _check_frame(df: pd.DataFrame, extra: Sequence[str] = ()) -> None:
    check_columns(df, ("image", "label", "split_group", *extra), None)
    if df["image"].duplicated().any():
        dup = df["image"][df["image"].duplicated()].iloc[0]
        raise CXRError(f"image {dup!r} appears twice in the manifest; a split needs unique images")
    bad = ~df["label"].isin(LABELS)
    if bad.any():
        raise CXRError(f"bad label {df['label'][bad].iloc[0]!r}; labels must be one of {', '.join(LABELS)}")


def _check_frac(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise CXRError(f"{name} must be in [0, 1), got {value}")


def _groups(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row -> group index (groups numbered by first appearance) and the group x label count matrix."""
    gidx, _ = pd.factorize(df["split_group"], sort=False)
    lidx = pd.Categorical(df["label"], categories=list(LABELS)).codes
    counts = np.zeros((gidx.max() + 1 if len(gidx) else 0, len(LABELS)), dtype=np.int64)
    np.add.at(counts, (gidx, lidx), 1)
    return gidx, counts


def _assign_greedy(counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assign each group (row of ``counts``, images per label) to a subset (row of ``targets``).

    Groups go largest first (ties in seeded random order); each goes to the subset with the most relative
    room left for its labels after taking it: ``sum_l c_l * (T_sl - C_sl - c_l) / T_sl``. Subsets with no
    target get nothing. Final counts come within about one image of the targets where groups allow.
    """
    n_groups = counts.shape[0]
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    usable = targets.sum(axis=1) > 0
    denom = np.maximum(targets, 1e-9)
    current = np.zeros_like(targets, dtype=float)
    out = np.full(n_groups, -1, dtype=np.int64)
    for g in order:
        c = counts[g]
        score = ((targets - current - c) / denom * c).sum(axis=1)
        score[~usable] = -np.inf
        s = int(np.argmax(score))
        out[g] = s
        current[s] += c
    return out


def _frame(df: pd.DataFrame, subset_idx: np.ndarray) -> pd.DataFrame:
    """Rows with a subset (index >= 0) as ``image, subset``, in manifest order."""
    keep = subset_idx >= 0
    names = np.array(SUBSETS, dtype=object)[subset_idx[keep]]
    return pd.DataFrame({"image": df["image"].to_numpy()[keep], "subset": names}).astype(str)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ------------------------------------------------------------------------------------------- protocols
def split_grouped(
    df: pd.DataFrame, *, seed: int, test_frac: float = 0.2, val_frac: float = 0.1
) -> pd.DataFrame:
    """Grouped, label-stratified split of every row.

    Input: manifest rows; ``test_frac`` of each label's images go to test, ``val_frac`` of the rest to val.
    Output: ``image, subset`` for every row, in manifest order. Groups stay whole, so proportions are met
    to within the largest groups' sizes (within about one image on the real manifest).
    """
    _check_frame(df)
    _check_frac("test_frac", test_frac)
    _check_frac("val_frac", val_frac)
    gidx, counts = _groups(df)
    n = counts.sum(axis=0).astype(float)
    test = test_frac * n
    val = val_frac * (n - test)
    targets = np.stack([n - test - val, val, test])
    assigned = _assign_greedy(counts, targets, np.random.default_rng(seed))
    return _frame(df, assigned[gidx])


def split_source(df: pd.DataFrame, *, holdout_source: str, seed: int, val_frac: float = 0.1) -> pd.DataFrame:
    """Leave one source out: its images, and every group that holds any of them, form the test set.

    Input: manifest rows with a ``source`` column. The other groups are split train / val (grouped,
    stratified, ``val_frac`` of them to val). Output: ``image, subset`` for every row, in manifest order.
    """
    _check_frame(df, ("source",))
    _check_frac("val_frac", val_frac)
    known = sorted(df["source"].unique())
    if holdout_source not in known:
        raise CXRError(f"unknown source {holdout_source!r} (known: {', '.join(known)})")
    gidx, counts = _groups(df)
    held_groups = np.zeros(counts.shape[0], dtype=bool)
    held_groups[gidx[(df["source"] == holdout_source).to_numpy()]] = True
    rest = counts * ~held_groups[:, None]
    n = rest.sum(axis=0).astype(float)
    targets = np.stack([n - val_frac * n, val_frac * n, np.zeros_like(n)])
    assigned = _assign_greedy(rest, targets, np.random.default_rng(seed))
    assigned[held_groups] = _TEST
    return _frame(df, assigned[gidx])


def _pick(pieces: list[tuple[int, int]], target: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pieces ``(group, n images)`` summing to exactly ``target`` (or the largest reachable sum below it).

    Pieces are visited in seeded random order; each is taken when the pieces after it can still make up the
    rest (a subset-sum table over the suffixes), otherwise skipped, so a group that would overshoot is
    passed over for smaller ones.
    """
    if target <= 0 or not pieces:
        return []
    order = [pieces[k] for k in rng.permutation(len(pieces))]
    mask = (1 << (target + 1)) - 1
    reach = [0] * (len(order) + 1)  # reach[k]: bit s set if pieces order[k:] can sum to s
    reach[-1] = 1
    for k in range(len(order) - 1, -1, -1):
        reach[k] = (reach[k + 1] | (reach[k + 1] << order[k][1])) & mask
    goal = target if reach[0] >> target & 1 else reach[0].bit_length() - 1
    chosen, left = [], goal
    for k, (g, n) in enumerate(order):
        if left == 0:
            break
        if n <= left and reach[k + 1] >> (left - n) & 1:
            chosen.append((g, n))
            left -= n
    return chosen


def _paper_class(
    pieces: list[tuple[int, int]],
    lock: np.ndarray,
    want: tuple[int, int, int],
    rng: np.random.Generator,
) -> dict[int, int]:
    """One class of :func:`split_paper`: ``{group: subset}``.

    ``pieces``: (group, images of this class); ``lock``: subset a group is fixed to (-1: free); ``want``:
    train, val, test counts. With enough images, test, train and val are each picked exactly; with too few,
    train is picked first, then val, and test takes every image left.
    """
    n_train, n_val, n_test = want
    taken: dict[int, int] = {}

    def free_for(sub: int) -> list[tuple[int, int]]:
        return [(g, n) for g, n in pieces if g not in taken and lock[g] in (-1, sub)]

    def take(chosen: list[tuple[int, int]], sub: int) -> None:
        taken.update((g, sub) for g, _ in chosen)

    if sum(n for _, n in pieces) >= n_train + n_val + n_test:
        take(_pick(free_for(_TEST), n_test, rng), _TEST)
        take(_pick(free_for(_TRAIN), n_train, rng), _TRAIN)
        take(_pick(free_for(_VAL), n_val, rng), _VAL)
    else:  # too few images: train first, then val from what is left, test takes the rest
        take(_pick(free_for(_TRAIN), n_train, rng), _TRAIN)
        take(_pick(free_for(_VAL), n_val, rng), _VAL)
        take(free_for(_TEST), _TEST)
    return taken


def split_paper(
    df: pd.DataFrame,
    *,
    seed: int,
    val_frac: float = 0.1,
    counts: dict[str, dict[str, int]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The reference study's protocol: fixed image counts per class in train and test (:data:`PAPER_COUNTS`).

    Input: manifest rows; ``counts`` overrides the protocol (``{"train": {label: n}, "test": {label: n}}``).
    Output: ``(split, messages)``: ``image, subset`` for the chosen rows only (the rest are left out), in
    manifest order; one message per count the data cannot meet.

    Train always gets the protocol's count (where the groups can sum to it): the study trained on exactly
    these images. Val (the study names none; early stopping needs one) takes ``round(val_frac * train
    count)`` (half up) images that the test does not need. Per class (scarcest relative to demand first):
    when the class has at least train + val + test images, test, train and val are filled in that order
    with whole groups picked in seeded random order, skipping any group that would overshoot (see
    :func:`_pick`), and the images left over are not used. When it has fewer, train is filled first, then
    val, and test takes every image left, so test falls short of the protocol (with a message). Up to 20
    seeded tries per class are made and the first exact one (else the closest) is kept; a count can only
    miss when the groups cannot sum to it. A group holding several labels is fixed to the subset its first
    chosen images went to; its images of other labels go there too or are left out.
    """
    _check_frame(df)
    _check_frac("val_frac", val_frac)
    wanted = counts or PAPER_COUNTS
    for sub in ("train", "test"):
        if sub not in wanted:
            raise CXRError(f"counts has no {sub!r} entry")
    rng = np.random.default_rng(seed)
    gidx, gcounts = _groups(df)
    lock = np.full(gcounts.shape[0], -1, dtype=np.int64)  # subset a group is fixed to, -1 if free
    chosen: dict[int, dict[int, int]] = {}  # label index -> {group: subset}
    messages: list[str] = []

    def demand(li: int) -> int:
        return wanted["train"].get(LABELS[li], 0) + wanted["test"].get(LABELS[li], 0)

    for li in sorted(range(len(LABELS)), key=lambda li: gcounts[:, li].sum() / max(demand(li), 1)):
        lab = LABELS[li]
        n_train, n_test = wanted["train"].get(lab, 0), wanted["test"].get(lab, 0)
        n_val = _round_half_up(val_frac * n_train)
        pieces = [(int(g), int(gcounts[g, li])) for g in np.flatnonzero(gcounts[:, li])]
        size = dict(pieces)
        total = sum(size.values())
        expect = {_TRAIN: min(n_train, total), _VAL: min(n_val, max(0, total - n_train)),
                  _TEST: min(n_test, max(0, total - n_train - n_val))}
        best: tuple[int, dict[int, int], dict[int, int]] | None = None
        for _ in range(20):
            taken = _paper_class(pieces, lock, (n_train, n_val, n_test), rng)
            got = dict.fromkeys(range(len(SUBSETS)), 0)
            for g, sub in taken.items():
                got[sub] += size[g]
            miss = sum(abs(got[s] - expect[s]) for s in expect)
            if best is None or miss < best[0]:
                best = (miss, taken, got)
            if miss == 0:
                break
        assert best is not None
        _, taken, got = best
        chosen[li] = taken
        for g, sub in taken.items():
            lock[g] = sub
        for sub, n_want in ((_TRAIN, n_train), (_VAL, n_val), (_TEST, n_test)):
            if got[sub] != n_want:
                short = sub == _TEST and total < n_train + n_val + n_test
                why = f" (the class has {total} images; train and val are filled first)" if short else ""
                messages.append(f"{lab}: {SUBSETS[sub]} has {got[sub]} images, the protocol asks for {n_want}{why}")

    subset_idx = np.full(len(df), -1, dtype=np.int64)
    lidx = pd.Categorical(df["label"], categories=list(LABELS)).codes
    for li, taken in chosen.items():
        rows = np.flatnonzero(lidx == li)
        subset_idx[rows] = [taken.get(int(g), -1) for g in gidx[rows]]
    return _frame(df, subset_idx), messages


# ------------------------------------------------------------------------------------------------- files
def write_split(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write ``image, subset`` to the csv ``path`` (folders created); return the path."""
    p = Path(path)
    validate_split(df, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    df[list(SPLIT_COLUMNS)].to_csv(p, index=False)
    return p


def validate_split(df: pd.DataFrame, path: str | Path | None = None) -> None:
    """CXRError (naming ``path``) for a missing column, empty or repeated image, or unknown subset."""
    check_columns(df, SPLIT_COLUMNS, path)
    images = df["image"].astype(str)
    if (images.str.strip() == "").any():
        row = int((images.str.strip() == "").to_numpy().argmax()) + 1
        raise CXRError(f"empty 'image' in row {row} (rows counted from 1 after the header)", path)
    dup = images.duplicated().to_numpy()
    if dup.any():
        row = int(dup.argmax())
        raise CXRError(f"image {images.iat[row]!r} listed twice (row {row + 1})", path)
    bad = (~df["subset"].isin(SUBSETS)).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        raise CXRError(
            f"bad subset {df['subset'].iat[row]!r} in row {row + 1} (rows counted from 1 after the header); "
            f"subsets must be one of {', '.join(SUBSETS)}",
            path,
        )


def read_split(path: str | Path) -> pd.DataFrame:
    """Read and validate a split csv; output ``image, subset`` (str), in file order."""
    df = read_csv_strings(path)
    validate_split(df, path)
    return df[list(SPLIT_COLUMNS)]


def join_split(manifest: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows that the split lists, with a ``subset`` column, in manifest order.

    CXRError if the split names an image the manifest lacks (a split made for another manifest).
    """
    unknown = ~split["image"].isin(manifest["image"])
    if unknown.any():
        raise CXRError(
            f"split lists {int(unknown.sum())} image(s) not in the manifest, "
            f"e.g. {split['image'][unknown].iloc[0]!r}"
        )
    subset = dict(zip(split["image"], split["subset"], strict=True))
    out = manifest[manifest["image"].isin(subset)].copy()
    out["subset"] = out["image"].map(subset)
    return out


def combine_splits(manifest: pd.DataFrame, parts: Sequence[tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """The split of a merged manifest that keeps every image in the subset its own source's split gives it.

    Input: the merged manifest (with ``sha1``) and, per part, ``(split, that part's manifest)``. Images are
    matched by file content (``sha1``), so the paths may differ between the manifests. Output: ``image,
    subset`` in manifest order. CXRError when a merged image is in no part, a file gets two subsets, or a
    ``split_group`` of the merged manifest would fall in two subsets.
    """
    check_columns(manifest, ("image", "sha1", "split_group"), None)
    by_sha: dict[str, str] = {}
    for split, part in parts:
        check_columns(part, ("image", "sha1"), None)
        sub = dict(zip(split["image"], split["subset"], strict=True))
        for image, sha in zip(part["image"], part["sha1"], strict=True):
            if image not in sub:
                continue
            if by_sha.setdefault(sha, sub[image]) != sub[image]:
                raise CXRError(f"file {image!r} is in two subsets of the parts' splits")
    subset = manifest["sha1"].map(by_sha)
    if subset.isna().any():
        missing = manifest["image"][subset.isna()]
        raise CXRError(f"{len(missing)} image(s) of the manifest are in none of the splits, e.g. {missing.iloc[0]!r}")
    per_group = subset.groupby(manifest["split_group"]).nunique()
    if (per_group > 1).any():
        raise CXRError(f"split_group {per_group[per_group > 1].index[0]!r} would fall in two subsets")
    return pd.DataFrame({"image": manifest["image"].to_numpy(), "subset": subset.to_numpy()})


# ------------------------------------------------------------------------------------------- protocols
# `cxrscreen data split --protocol NAME`: each takes the manifest and the command's options and returns the
# split and notes to show.
Protocol = Callable[..., tuple[pd.DataFrame, list[str]]]


def _protocol_grouped(df: pd.DataFrame, *, seed: int, test_frac: float, val_frac: float, **_: Any
                      ) -> tuple[pd.DataFrame, list[str]]:
    return split_grouped(df, seed=seed, test_frac=test_frac, val_frac=val_frac), []


def _protocol_paper(df: pd.DataFrame, *, seed: int, val_frac: float, **_: Any) -> tuple[pd.DataFrame, list[str]]:
    return split_paper(df, seed=seed, val_frac=val_frac)


def _protocol_source(df: pd.DataFrame, *, seed: int, val_frac: float, holdout_source: str | None = None, **_: Any
                     ) -> tuple[pd.DataFrame, list[str]]:
    if not holdout_source:
        raise CXRError("--protocol source needs --holdout-source NAME")
    return split_source(df, holdout_source=holdout_source, seed=seed, val_frac=val_frac), []


def _protocol_combine(df: pd.DataFrame, *, part: Sequence[str] | None = None, **_: Any
                      ) -> tuple[pd.DataFrame, list[str]]:
    pairs = [p.split("=", 1) for p in part or []]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise CXRError("--protocol combine needs --part SPLIT_CSV=DATA_DIR for each merged source")
    return combine_splits(df, [(read_split(csv), read_manifest(d)) for csv, d in pairs]), []


PROTOCOLS: dict[str, Protocol] = {
    "grouped": _protocol_grouped,
    "paper": _protocol_paper,
    "source": _protocol_source,
    "combine": _protocol_combine,
}


def split_by_protocol(name: str, df: pd.DataFrame, **options: Any) -> tuple[pd.DataFrame, list[str]]:
    """Run the protocol ``name`` of `PROTOCOLS` (options: seed, test_frac, val_frac, holdout_source, part)."""
    if name not in PROTOCOLS:
        *rest, last = PROTOCOLS
        raise CXRError(f"unknown protocol {name!r}; use {', '.join(rest)} or {last}")
    return PROTOCOLS[name](df, **options)
