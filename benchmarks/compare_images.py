"""Compare two ISMRMRD image files of the same slices: verdicts, scores and pixel values.

    python -m benchmarks.compare_images A.h5 B.h5 [-G images]

One line per image (verdict in each, score in each, largest difference over the image's
maximum), then a summary; exit status 1 when the files hold different numbers of images or
any verdict differs. ``benchmarks/gpu_check.sh`` compares a CPU run with a GPU run this way.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from recon.io.mrd_write import read_images
from recon.verdict import VERDICT_KEY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("-G", "--group", default="images")
    args = parser.parse_args()
    first, second = read_images(args.a, args.group), read_images(args.b, args.group)
    if len(first) != len(second):
        print(f"{args.a} holds {len(first)} images, {args.b} {len(second)}")
        return 1
    same, worst = 0, 0.0
    for n, ((image_a, meta_a), (image_b, meta_b)) in enumerate(zip(first, second, strict=True)):
        verdict_a, verdict_b = meta_a.get(VERDICT_KEY), meta_b.get(VERDICT_KEY)
        error = float(np.abs(image_a - image_b).max() / max(float(np.abs(image_a).max()), 1e-30))
        worst = max(worst, error)
        same += verdict_a == verdict_b
        print(
            f"image {n}: verdict {verdict_a} / {verdict_b}, score {meta_a.get('CycGuard.Score')} / {meta_b.get('CycGuard.Score')}, "
            f"largest difference {error:.2e} of the maximum"
        )
    print(f"verdicts equal on {same} of {len(first)} images; largest difference {worst:.2e} of an image's maximum")
    return 0 if same == len(first) else 1


if __name__ == "__main__":
    sys.exit(main())
