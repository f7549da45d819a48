"""curate: turn a web-scale pool of image-text pairs into a better CLIP training set,
recording why every sample was kept or dropped."""

import os as _os

__version__ = "0.1.0"

# img2dataset imports albumentations, which otherwise asks PyPI for a newer version at import.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
