"""Run directories: config.json, weights, history, provenance, loading."""
