"""Write the demo's calibration and validation data: scikit-learn's bundled digits.

The same 32x32 images and split the demo model (tests/fixtures/models/digits_cnn.onnx)
was trained and tested with; see tests/fixtures/datasets.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.datasets import digits_images, split


def main(out_dir: Path) -> None:
    images, labels = digits_images()
    parts = split(len(images))
    np.savez(out_dir / "calibration.npz", image=images[parts.calibration])
    np.savez(out_dir / "validation.npz", image=images[parts.validation])
    np.save(out_dir / "labels.npy", labels[parts.validation])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
