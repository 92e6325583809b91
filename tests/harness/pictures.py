"""Small pictures the console tests draw: a base64 PNG heat map with one hot square."""

from __future__ import annotations

import base64

import cv2
import numpy as np


def heatmap_b64(side: int = 16) -> str:
    """A ``side`` x ``side`` uint8 heat map, 255 on [4:8, 4:8] and 0 elsewhere, as base64 PNG."""
    hm = np.zeros((side, side), np.uint8)
    hm[4:8, 4:8] = 255
    return base64.b64encode(cv2.imencode(".png", hm)[1].tobytes()).decode()
