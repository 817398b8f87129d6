"""Frames with rare bright spots and a dead calibration pixel, for the recovery fixtures.

Built where they are used (nothing committed): background texture in [0, 0.5] on
every channel; a spot is a full-brightness cross on channel 0. Spots are rare in
the calibration frames (2 of 200) and in a third of the validation frames, and one
calibration frame has a dead pixel reading `dead_pixel` on channel 1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.float32)

Frames = npt.NDArray[np.float32]


def spot_frames(
    rng: np.random.Generator, count: int, channels: int, size: int, spots: range | list[int]
) -> Frames:
    """`count` frames of `channels` x `size` x `size`, with a spot in the frames `spots`."""
    frames = rng.uniform(0, 0.5, (count, channels, size, size)).astype(np.float32)
    for index in spots:
        y, x = rng.integers(2, size - 2, 2)
        patch = frames[index, 0, y - 1 : y + 2, x - 1 : x + 2]
        frames[index, 0, y - 1 : y + 2, x - 1 : x + 2] = np.maximum(patch, CROSS)
    return frames


def calibration_and_validation(
    rng: np.random.Generator, channels: int, size: int, dead_pixel: float
) -> tuple[Frames, Frames]:
    """200 calibration frames (spots in 2, a dead pixel in one), 300 validation frames."""
    calibration = spot_frames(rng, 200, channels, size, [3, 120])
    calibration[0, 1, 5, 7] = dead_pixel
    validation = spot_frames(rng, 300, channels, size, range(0, 300, 3))
    return calibration, validation
