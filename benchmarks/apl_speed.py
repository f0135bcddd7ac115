"""APL speed: seconds per training step (and per 1k steps), generation time with and without the prefix, peak memory.

Random weights (speed does not depend on the weight values): the SD 1.5 architecture
(:data:`faceshield.diffusion.testing.SD15`, 768-d text, a 10×768 prefix) or the tiny test model. Training images
are random pixels at ``--size`` written to a temporary APL data folder, so the step runs the real code path
(image → VAE latent, cached after first use as in training → prefix-encoded prompt → UNet forward and backward).
One untimed warm-up step and generation first.

Usage::

    python benchmarks/apl_speed.py [--arch sd15|tiny] [--size 512] [--train-steps 2] [--gen-steps 2]
        [--device cuda] [--dtype auto] [--json out.json]

Generation time is per image at ``--gen-steps`` DDIM steps with guidance (two UNet passes per step) and is also
projected to the evaluation's 20 and the default 50 steps (per-step time × steps + the VAE decode).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from faceshield.diffusion.generation import generate  # noqa: E402
from faceshield.diffusion.testing import SD15, TINY, build_random_stable_diffusion  # noqa: E402
from faceshield.images import save_image  # noqa: E402
from faceshield.methods.apl import APLConfig, APLData, APLTrainer, DATA_MANIFEST  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--gen-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    sd = build_random_stable_diffusion(SD15 if args.arch == "sd15" else TINY, device, args.dtype)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(4):
            save_image(root / f"{i}.png", rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
        (root / DATA_MANIFEST).write_text(json.dumps({
            "identities": [{"name": "Tom Hanks", "neutral": "", "images": ["0.png", "1.png"]}],
            "general": [{"image": "2.png", "caption": "a red car"}, {"image": "3.png", "caption": "a bowl of fruit"}]}))
        trainer = APLTrainer(APLConfig(resolution=args.size, device=args.device, dtype=args.dtype),
                             APLData.load(root), sd=sd)
        for i in range(4):  # warm-up, and every image's latent cached (as after the first epoch of training)
            trainer.latent(f"{i}.png")
        trainer.step(0)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(1, 1 + args.train_steps):
            trainer.step(step)
        _sync(device)
        per_step = (time.perf_counter() - start) / args.train_steps
        train_peak = _peak_mb(device)
    prompt = "A close-up portrait of Tom Hanks"
    times = {}
    for label, text in (("without", prompt), ("with", trainer.prefix.apply(prompt))):
        generate(sd, [text], steps=1, height=args.size, width=args.size)  # warm-up
        _sync(device)
        start = time.perf_counter()
        generate(sd, [text], steps=args.gen_steps, height=args.size, width=args.size)
        _sync(device)
        times[label] = time.perf_counter() - start
    decode_start = time.perf_counter()
    with torch.no_grad():
        sd.decode_latents(torch.zeros(1, 4, args.size // 8, args.size // 8, device=device, dtype=sd.dtype))
    _sync(device)
    decode = time.perf_counter() - decode_start
    per_gen_step = {k: max(v - decode, 0) / args.gen_steps for k, v in times.items()}
    result = {
        "arch": args.arch, "size": args.size, "device": str(device), "dtype": str(sd.dtype),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
        "train": {"seconds_per_step": per_step, "seconds_per_1k_steps": 1000 * per_step,
                  "hours_per_10k_steps": 10_000 * per_step / 3600, "peak_mb": train_peak},
        "generate": {f"{k}_prefix": {"seconds": v, "steps": args.gen_steps, "per_step": per_gen_step[k],
                                     "projected_20_steps": per_gen_step[k] * 20 + decode,
                                     "projected_50_steps": per_gen_step[k] * 50 + decode}
                     for k, v in times.items()},
        "vae_decode_seconds": decode, "peak_mb": _peak_mb(device),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
