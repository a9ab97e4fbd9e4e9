"""The engine: the one training loop and run setup."""
