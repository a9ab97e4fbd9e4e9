"""Training: train() for every task, its config and stages, and the lung localizer."""
