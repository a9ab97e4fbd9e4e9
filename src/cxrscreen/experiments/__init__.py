"""Experiments: the study's model comparison and its report."""
