"""cxrscreen: screen chest X-rays for COVID-19 and other pneumonia."""

from cxrscreen.errors import CXRError

__version__ = "0.1.0"
CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")

__all__ = ["CLASSES", "CXRError", "__version__"]
