"""curate: turn a web-scale pool of image-text pairs into a better CLIP training set,
recording why every sample was kept or dropped."""

__version__ = "0.1.0"
