"""Prediction: a run or the bundled model on files, folders and uploads."""
