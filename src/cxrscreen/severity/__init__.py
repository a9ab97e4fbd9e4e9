"""COVID-19 severity: geographic extent (0-8) and opacity (0-6) regressed from backbone features, the
per-lung extent and the six-zone (Brixia-layout) map derived from them (issue 13).

scores (the radiologists' scores matched to the manifest), features (pooled backbone feature maps),
model (ridge regressor, its spatial map), cv (repeated grouped K-fold), zones (lung zones and overlay),
scorer (what predict calls).
"""
