"""Evaluation: the decision rule, metrics with CIs, run evaluation and calibration."""
