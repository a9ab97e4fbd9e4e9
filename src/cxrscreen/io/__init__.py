"""Input and output: the one image reader, file hashing and atomic JSON."""
