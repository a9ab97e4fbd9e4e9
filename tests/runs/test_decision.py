"""The one decision rule (cxrscreen.decision) and its use by metrics."""

import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import classification_report
from cxrscreen.runs.decision import DecisionRule, decide, decide_names

CLASSES = ["covid", "normal", "pneumonia"]
P = np.array([[0.30, 0.50, 0.20],   # covid at threshold 0.25, normal by arg-max
              [0.10, 0.30, 0.60],   # pneumonia either way
              [0.24, 0.26, 0.50],   # under 0.25: the best other class, pneumonia
              [0.80, 0.15, 0.05]])


def test_argmax_and_operating_point():
    assert decide_names(P, CLASSES, DecisionRule()) == ["normal", "pneumonia", "pneumonia", "covid"]
    assert decide_names(P, CLASSES, DecisionRule(threshold=0.25)) == ["covid", "pneumonia", "pneumonia", "covid"]
    assert decide_names(P, CLASSES, DecisionRule(threshold=0.9)) == ["normal", "pneumonia", "pneumonia", "normal"]
    assert int(decide(P[0], CLASSES, DecisionRule(threshold=0.3))) == 0  # the threshold itself counts


def test_rule_round_trip_and_checks():
    for rule in (DecisionRule(), DecisionRule(threshold=0.104)):
        assert DecisionRule.from_dict(rule.to_dict()) == rule
    assert DecisionRule().to_dict() == {"rule": "argmax"}
    assert "0.104" in DecisionRule(threshold=0.104).describe()
    with pytest.raises(CXRError, match="probability"):
        DecisionRule(threshold=1.5)
    with pytest.raises(CXRError, match="not one of"):
        decide(P, ["a", "b", "c"], DecisionRule(threshold=0.5))


def test_report_counts_the_decided_classes():
    y = np.array([0, 2, 1, 0])
    groups = ["a", "b", "c", "d"]
    arg = classification_report(y, P, groups, CLASSES, n_boot=10)
    op = classification_report(y, P, groups, CLASSES, threshold=0.25, n_boot=10)
    assert arg["decision"] == {"rule": "argmax"} and op["decision"]["threshold"] == 0.25
    assert arg["accuracy"] == pytest.approx(0.5) and op["accuracy"] == pytest.approx(0.75)
    assert op["confusion_matrix"][0] == [2, 0, 0] and arg["confusion_matrix"][0] == [1, 1, 0]
    assert op["covid_vs_rest"]["sensitivity"]["value"] == 1.0 and arg["covid_vs_rest"]["sensitivity"]["value"] == 0.5
