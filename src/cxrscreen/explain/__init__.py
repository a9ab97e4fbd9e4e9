"""Explanations: Grad-CAM heatmaps and the overlays drawn on the X-ray."""
