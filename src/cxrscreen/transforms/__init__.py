"""Transforms: preprocessing with its geometry, augmentation presets, boxes and the preprocessed cache."""
