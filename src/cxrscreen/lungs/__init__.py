"""Lung segmentation: a U-Net (segmentation_models_pytorch, EfficientNet-Lite0 encoder) that finds the right
and left lungs, and what other parts compute from its masks (areas, boxes, Brixia zones, heat inside lungs)."""
