"""pneumoscan: pneumonia detection on chest X-rays."""

__version__ = "0.1.0"
