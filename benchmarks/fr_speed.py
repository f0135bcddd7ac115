"""Milliseconds per forward and per forward+backward of each FR zoo model, one face at its own input size.

An attack step costs one forward+backward of every surrogate, so this table is what bounds the speed of the
pixel methods. Usage (from the repository root, with ``FACESHIELD_MIRROR=../shared/models``):

    python benchmarks/fr_speed.py                     # the surrogate models, default thread count
    python benchmarks/fr_speed.py --threads 1 --models faceres,dlib-resnet
"""

from __future__ import annotations

import argparse
import time

import torch

from faceshield.eval.calibration import shipped_table
from faceshield.models.registry import cached_fr_model


def milliseconds(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up: first calls allocate and pick kernels
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated; default: the calibrated surrogate models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.models.split(",") if m] or shipped_table().surrogate_models()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | input | forward ms | forward+backward ms |\n|---|---|---|---|")
    total = 0.0
    for name in names:
        model = cached_fr_model(name, "cpu")
        size = model.config.input_size
        x = torch.rand(1, 3, size, size, requires_grad=True)
        with torch.no_grad():
            forward = milliseconds(lambda: model(x), args.repeats)
        both = milliseconds(lambda: torch.autograd.grad(model(x).sum(), x), args.repeats)
        total += both
        print(f"| {name} | {size}² | {forward:.1f} | {both:.1f} |")
    print(f"| all | | | {total:.1f} |")


if __name__ == "__main__":
    main()
