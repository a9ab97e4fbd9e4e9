import numpy as np

from cxrscreen.evaluation.metrics import (
    binary_rates,
    classification_report,
    covid_vs_rest,
    expected_calibration_error,
    grouped_bootstrap_ci,
)


def test_binary_rates():
    y = np.array([1, 1, 0, 0, 0], bool)
    pred = np.array([1, 0, 0, 0, 1], bool)
    assert binary_rates(y, pred) == (0.5, 2 / 3)


def test_ci_contains_value_and_groups_widen_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = np.eye(3)[y] * 0.3 + rng.random((300, 3))
    p /= p.sum(1, keepdims=True)
    res = covid_vs_rest(y, p, [str(i) for i in range(300)], n_boot=300)
    for k in ("sensitivity", "specificity", "auc"):
        lo, hi = res[k]["ci95"]
        assert lo <= res[k]["value"] <= hi and hi - lo > 0


def test_grouped_ci_is_wider_when_images_repeat_within_patients():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40)
    p = np.eye(3)[y] * 0.3 + rng.random((40, 3))
    p /= p.sum(1, keepdims=True)
    y10, p10 = np.repeat(y, 10), np.repeat(p, 10, axis=0)  # each patient imaged 10 times
    naive = covid_vs_rest(y10, p10, [str(i) for i in range(400)], n_boot=400)["auc"]["ci95"]
    grouped = covid_vs_rest(y10, p10, [str(i // 10) for i in range(400)], n_boot=400)["auc"]["ci95"]
    assert grouped[1] - grouped[0] > 2 * (naive[1] - naive[0])


def test_bootstrap_resamples_whole_groups():
    seen = []

    def stat(idx):
        seen.append(idx)
        return 0.0

    groups = ["a", "a", "b", "b", "b"]
    grouped_bootstrap_ci(stat, groups, n_boot=20)
    for idx in seen:
        s = set(idx.tolist())
        assert ({0, 1} <= s) or not (s & {0, 1})  # group a's images come together or not at all


def test_report_keys_and_perfect_case():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[y]
    r = classification_report(y, p, list("abcdef"), ["covid", "normal", "pneumonia"], n_boot=50)
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0
    assert set(r["classes"]["covid"]) >= {"precision", "recall", "f1", "auc"}
    assert r["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert r["covid_vs_rest"]["sensitivity"]["value"] == 1.0


def test_threshold_changes_the_call():
    y = np.array([0, 1])
    p = np.array([[0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    assert covid_vs_rest(y, p, ["a", "b"], n_boot=10)["sensitivity"]["value"] == 0.0
    assert covid_vs_rest(y, p, ["a", "b"], threshold=0.25, n_boot=10)["sensitivity"]["value"] == 1.0


def test_ece_zero_for_calibrated_and_high_for_overconfident():
    y = np.zeros(100, int)
    assert expected_calibration_error(y, np.tile([1.0, 0, 0], (100, 1))) < 1e-9
    y2 = np.array([0] * 50 + [1] * 50)
    p2 = np.tile([0.99, 0.01, 0.0], (100, 1))
    assert expected_calibration_error(y2, p2) > 0.4
