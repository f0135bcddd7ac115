"""Milliseconds per forward and per forward+backward of each FR zoo model, one face at its own input size; then
one attack step of the whole ensemble on a real photo, the plain way and the way the attacks run it.

An attack step costs one forward+backward of every surrogate, so this table is what bounds the speed of the
pixel methods. The step rows align one CelebA-HQ face (256²) to every model and take the gradient of the mean
cosine: "one graph" is a single forward and backward through all models (how the attacks ran before session 7),
``loss_and_grad`` runs each model on its own thread (``FREnsemble.map_models``). Usage (from the repository root,
with ``FACESHIELD_MIRROR=../shared/models``):

    python benchmarks/fr_speed.py                     # the surrogate models, default thread count
    python benchmarks/fr_speed.py --threads 1 --models faceres,dlib-resnet
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from faceshield.adversarial import IdentityObjective
from faceshield.eval.calibration import shipped_table
from faceshield.models.ensemble import FREnsemble
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
    step_rows(names, args.repeats)


def step_rows(names: list[str], repeats: int) -> None:
    from faceshield.faces.detect import best_face_landmarks, default_detector
    from faceshield.images import load_image, to_tensor

    photo = sorted(Path("../shared/data/celebahq-pairs/train").glob("*.png"))[0]
    rgb = load_image(photo).rgb
    landmarks = best_face_landmarks(rgb, default_detector())
    image = to_tensor(rgb)
    noisy = (image + 0.03 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    objective = IdentityObjective(FREnsemble(names), image, landmarks)  # plain cosine: every model has a gradient

    def one_graph() -> None:
        x = noisy.clone().requires_grad_(True)
        torch.autograd.grad(objective.loss(objective.similarities(x)), x)

    threads = torch.get_num_threads()
    print(f"\none attack step, {len(names)} models, {photo.name}:\n\n| how | threads | ms |\n|---|---|---|")
    for how, fn in (("one graph", one_graph), ("loss_and_grad", lambda: objective.loss_and_grad(noisy))):
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            print(f"| {how} | {n} | {milliseconds(fn, repeats):.0f} |")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
