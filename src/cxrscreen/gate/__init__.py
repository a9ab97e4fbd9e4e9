"""The input gate: withholds a diagnosis for inputs that are not frontal chest X-rays."""
