"""Small pictures of the dataset's files for the audit's and the report's figures, and the short
names written under them.

Display only, never model input. A file is decoded by images.decode, the decoder under
load_image, so a thumbnail meets the same refusals as extract: not a regular file (a FIFO would
hang), over the pixel budget, a decompression bomb. Any file that cannot be shown (moved,
replaced or broken since extract) becomes "no thumbnail": a grey placeholder, and the figure is
drawn with the others.
"""
import os

import numpy as np

from ..data import images

SIDE = 128               # pixels: the longer side of a thumbnail
PLACEHOLDER = np.full((SIDE, SIDE, 3), 0.5)  # grey: the file could not be shown


def thumbnail(path):
    """(picture, shown): an RGB PIL image of `path` at most SIDE pixels a side and True, or
    PLACEHOLDER and False when the file cannot be decoded for any reason."""
    try:
        picture = images.decode(path, SIDE)  # in memory: no file stays open
        picture.thumbnail((SIDE, SIDE))
        return picture, True
    except Exception:  # PIL raises many types for corrupt, truncated or foreign files
        return PLACEHOLDER, False


def short_name(path, width=24):
    """The file name of `path` (no folders), cut to `width` characters with "..." at the end."""
    name = os.path.basename(str(path))
    return name if len(name) <= width else name[:width - 3] + "..."
