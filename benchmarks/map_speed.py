"""map (Machine Pareidolia) speed by stage: seconds per fine-tuning step and per protected face.

Architectures (random weights: speed does not depend on the weight values): ``celebahq`` = the
``google/ddpm-ema-celebahq-256`` UNet2DModel (ch 128, mult 1,1,2,2,4,4, attention at 16; 256 px) and ``tiny`` (the
test model, 64 px). Faces: real CelebA-HQ photos from ``shared/data/celebahq-pairs`` (already aligned; resized for
the tiny model). FR surrogates: ``--surrogates`` (default: the method's default, every calibrated model with
AUC ≥ 0.9) and the real ``emotion`` model.

Training stages (:class:`faceshield.methods.map.MAPTrainer`, CUDA synchronised at each stage end): ``sampling``
(``generative_steps`` UNet calls with gradients), ``losses`` (FR ensemble + emotion + Laplacian),
``backward_identity`` / ``backward_expression`` / ``backward_laplacian`` (one vector-Jacobian product each through
the sampling chain), ``score_matching`` (one UNet call per face, forward and backward), ``projection`` and
``update`` (Adam + EMA). Setup (inverting the training faces once: ``inversion_steps`` UNet calls per face) is
reported apart. Protection stages: ``inversion`` (pretrained network) and ``sampling`` (fine-tuned network).

Usage::

    python benchmarks/map_speed.py [--architecture celebahq|tiny] [--device cpu|cuda] [--batch 1,8]
        [--train-steps 1] [--surrogates mobilefacenet-ms1m] [--gradient-checkpointing]
        [--inversion-steps 20] [--generative-steps 6] [--json out.json]

With fewer inversion/generative steps than the defaults (20/6), the chain-length stages are also projected
linearly to the defaults (``projected_*``: each UNet call costs the same at every timestep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACESHIELD_MIRROR", str(SHARED / "models"))

from faceshield.adversarial import surrogate_ensemble  # noqa: E402
from faceshield.diffusion.ddpm import (  # noqa: E402
    CELEBAHQ_DDPM_ARCHITECTURE, TINY_DDPM_ARCHITECTURE, PixelDiffusion, build_random_ddpm,
)
from faceshield.images import load_image, to_tensor  # noqa: E402
from faceshield.methods.map import MAPTrainConfig, MAPTrainer, StageClock, protect_aligned  # noqa: E402

DEFAULTS = MAPTrainConfig()
ARCHITECTURES = {"celebahq": CELEBAHQ_DDPM_ARCHITECTURE, "tiny": TINY_DDPM_ARCHITECTURE}


def faces(batch: int, size: int) -> torch.Tensor:
    paths = sorted((SHARED / "data/celebahq-pairs/train").glob("*.png"), key=lambda p: int(p.stem))[:batch]
    images = torch.cat([to_tensor(load_image(p).rgb) for p in paths])
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB → GiB)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, batch: int) -> dict:
    device = torch.device(args.device)
    architecture = ARCHITECTURES[args.architecture]
    size = architecture["sample_size"]
    pretrained = build_random_ddpm(architecture, device, "float32")
    ensemble, _ = surrogate_ensemble(tuple(args.surrogates), device)
    config = MAPTrainConfig(image_size=size, batch_size=batch, surrogates=tuple(ensemble.names), device=args.device,
                            inversion_steps=args.inversion_steps, generative_steps=args.generative_steps,
                            gradient_checkpointing=args.gradient_checkpointing)
    crops = faces(batch, size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer = MAPTrainer(config, pretrained, crops, ensemble, target=None)
    sync(device)
    setup = time.perf_counter() - start
    trainer.clock = StageClock(device, profile=True)
    for _ in range(args.warmup):
        trainer.step()
    trainer.clock.seconds.clear()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        trainer.step()
    sync(device)
    step_seconds = (time.perf_counter() - start) / args.train_steps
    train_peak = peak_memory_gib(device)

    # the fine-tuned network (its EMA) as protection would load it
    tuned = PixelDiffusion(trainer.ema_unet, pretrained.scheduler_config, pretrained.schedule, "ema", device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    paths = (config.t0, config.inversion_steps, config.generative_steps)
    for _ in range(args.warmup):
        protect_aligned(pretrained, tuned, crops, *paths)
    start = time.perf_counter()
    _, history = protect_aligned(pretrained, tuned, crops, *paths)
    sync(device)
    protect_seconds = time.perf_counter() - start
    stages = {k: v / args.train_steps for k, v in trainer.clock.seconds.items()}
    protect_stages = {k.removeprefix("seconds_"): v[0] for k, v in history.items()}
    # Reduced step counts (as on a CPU): the chain-length stages scale linearly with the number of UNet calls.
    g, i = DEFAULTS.generative_steps / args.generative_steps, DEFAULTS.inversion_steps / args.inversion_steps
    chain = ("sampling", "backward_identity", "backward_expression", "backward_laplacian")
    projected_stages = {k: v * (g if k in chain else 1) for k, v in stages.items()}
    projected_protect = {"inversion": protect_stages["inversion"] * i, "sampling": protect_stages["sampling"] * g}
    return {
        "batch": batch, "inversion_steps": args.inversion_steps, "generative_steps": args.generative_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "projected_train_step_seconds_per_face": sum(projected_stages.values()) / batch,
        "projected_train_stages_seconds_per_step": projected_stages,
        "projected_protect_seconds_per_face": sum(projected_protect.values()) / batch,
        "image_size": size, "surrogates": ensemble.names,
        "setup_seconds_per_face": setup / batch,  # inverting the training faces + loading the emotion model
        "train_step_seconds": step_seconds, "train_step_seconds_per_face": step_seconds / batch,
        "train_stages_seconds_per_step": stages,
        "train_peak_memory_gib": train_peak,
        "protect_seconds_per_face": protect_seconds / batch,
        "protect_stages_seconds": protect_stages,
        "protect_peak_memory_gib": peak_memory_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="celebahq")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (faces per step)")
    parser.add_argument("--train-steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--surrogates", default="", help="comma-separated FR models (default: calibrated ones)")
    parser.add_argument("--inversion-steps", type=int, default=DEFAULTS.inversion_steps,
                        help="fewer than the default 20 on a CPU: measured, then projected linearly to 20")
    parser.add_argument("--generative-steps", type=int, default=DEFAULTS.generative_steps,
                        help="fewer than the default 6 on a CPU: measured, then projected linearly to 6")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.surrogates = [s for s in args.surrogates.split(",") if s]
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    rows = [measure(args, int(b)) for b in args.batch.split(",")]
    report = {"architecture": args.architecture, "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, "rows": rows}
    json.dump(report, sys.stdout, indent=2)
    print()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
