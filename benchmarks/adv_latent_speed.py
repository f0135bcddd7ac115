"""adv-latent speed by stage on the Stable-Diffusion-2-base architecture (random weights: speed does not depend on
the weight values), 256 px faces from ``shared/data/celebahq-pairs``, the surrogate FR ensemble of the method.

Stages (wall clock of :meth:`faceshield.methods.adv_latent.AdvLatent.protect_faces`, CUDA synchronised at each
stage end only): ``inversion`` (VAE encode, DDIM inversion over the protected steps, plain reconstruction),
``embeddings`` (learned unconditional embeddings), ``optimisation`` (latent steps, each: sampling with gradients,
VAE decode, FR ensemble, backward), ``decoding`` (final sampling and decode).

With ``--null-steps`` / ``--steps`` below the paper's (20 / 30) — as on a CPU, where the paper's run takes many
minutes — the two iterative stages are measured per iteration and projected to the paper's counts; the table says
which numbers are projected. One untimed warm-up run first (allocator, kernels, ``torch.compile``).

Usage::

    python benchmarks/adv_latent_speed.py [--device cuda] [--dtype auto] [--batch 1,8] [--null-steps 20]
        [--steps 30] [--compile] [--json out.json]
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

from faceshield.diffusion.testing import SD2_BASE, TINY, build_random_stable_diffusion  # noqa: E402
from faceshield.images import load_image, to_tensor  # noqa: E402
from faceshield.methods.adv_latent import AdvLatent, AdvLatentConfig  # noqa: E402

PAPER = {"null_steps": 20, "steps": 30}
STAGES = ("inversion", "embeddings", "optimisation", "decoding")


def faces(batch: int) -> torch.Tensor:
    """``batch`` real CelebA-HQ faces (already aligned 256², the paper's input)."""
    paths = sorted((SHARED / "data/celebahq-pairs/train").glob("*.png"), key=lambda p: int(p.stem))[:batch]
    return torch.cat([to_tensor(load_image(p).rgb) for p in paths])


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB (process peak RSS)


def measure(method: AdvLatent, batch: int) -> dict:
    cfg, device = method.config, method.model.device
    crops = faces(batch).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    _, _, history = method.protect_faces(crops)
    total = time.perf_counter() - start
    seconds = {s: history[f"seconds_{s}"][0] for s in STAGES}
    protected_steps = cfg.diffusion_steps - cfg.start_step
    per_iteration = {"embeddings": seconds["embeddings"] / max(1, cfg.null_steps * protected_steps),
                     "optimisation": seconds["optimisation"] / max(1, cfg.steps)}
    projected = dict(seconds)
    projected["embeddings"] = per_iteration["embeddings"] * PAPER["null_steps"] * protected_steps
    projected["optimisation"] = per_iteration["optimisation"] * PAPER["steps"]
    return {
        "batch": batch, "measured_seconds": seconds, "measured_total": total,
        "seconds_per_iteration": per_iteration,
        "paper_defaults_seconds": projected, "paper_defaults_total": sum(projected.values()),
        "paper_defaults_per_face": sum(projected.values()) / batch,
        "projected": (cfg.null_steps, cfg.steps) != (PAPER["null_steps"], PAPER["steps"]),
        "peak_memory_gib": peak_memory_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=("sd2-base", "tiny"), default="sd2-base",
                        help="tiny: the test model, to check the script in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (faces per batch)")
    parser.add_argument("--null-steps", type=int, default=PAPER["null_steps"])
    parser.add_argument("--steps", type=int, default=PAPER["steps"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    model = build_random_stable_diffusion(SD2_BASE if args.architecture == "sd2-base" else TINY, device,
                                         args.dtype)
    build_seconds = time.perf_counter() - start
    if args.compile:
        model.unet = torch.compile(model.unet)
        model.vae.decoder = torch.compile(model.vae.decoder)
    config = AdvLatentConfig(null_steps=args.null_steps, steps=args.steps, device=str(device), dtype=args.dtype)
    method = AdvLatent(config, model=model)
    batches = [int(b) for b in args.batch.split(",")]

    warm = AdvLatent(AdvLatentConfig(null_steps=1, steps=1, device=str(device), dtype=args.dtype), model=model)
    warm.protect_faces(faces(batches[0]).to(device))

    rows = [measure(method, b) for b in batches]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "architecture": args.architecture, "dtype": str(model.dtype), "torch": torch.__version__, "compile": args.compile,
        "surrogates": method.ensemble.names, "build_seconds": build_seconds,
        "measured_with": {"null_steps": args.null_steps, "steps": args.steps}, "rows": rows,
    }
    print(f"{args.architecture} on {result['device']}, {result['dtype']}, surrogates {', '.join(result['surrogates'])}; "
          f"measured with null_steps={args.null_steps}, steps={args.steps}")
    print("| batch | " + " | ".join(STAGES) + " | total | per face | peak memory |")
    print("|---" * (len(STAGES) + 4) + "|")
    for r in rows:
        mark = " (projected)" if r["projected"] else ""
        cells = " | ".join(f"{r['paper_defaults_seconds'][s]:.2f}" for s in STAGES)
        print(f"| {r['batch']} | {cells} | {r['paper_defaults_total']:.2f}{mark} | "
              f"{r['paper_defaults_per_face']:.2f} | {r['peak_memory_gib']:.1f} GiB |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
