"""Anti-customization speed: one surrogate step (LoRA and full fine-tuning) and one PGD step of ``aspl`` and ``haa``
on the SD-2-base architecture with random weights, peak memory, and the tiny model end to end.

Random weights: speed does not depend on the weight values. The photos are random pixels at ``--size`` with one
synthetic face (five landmarks) for HAA's local term; every stage runs the real code path (Finetuner.step,
ASPL/HAA.pgd_step). No warm-up on the CPU (each stage runs once): first-call overheads are included. Each stage's
result is printed as soon as it is measured (one JSON line), so a run cut short still reports what it finished.

Usage::

    python benchmarks/anti_customization_speed.py [--size 512] [--photos 4] [--device cuda] [--threads N]
        [--stages tiny,aspl,haa,lora,full] [--json out.json]

Threads: the tiny stage always runs on one thread. Its kernels take microseconds, so OpenMP's fork/join costs more
than it saves, and on a CPU shared with other jobs every parallel region waits for a descheduled worker: on a
2-core machine under a load of ~7, a 32-wide linear layer took 0.5 ms at two threads against 0.026 ms at one, and
the tiny stage 146 s against 17 s. ``--threads`` sets the SD-2 stages' threads (default: torch's, i.e.
OMP_NUM_THREADS).

Peak memory: on CUDA the peak allocated per stage (reset before each); on the CPU the process's peak RSS so far
(monotonic: a stage's figure includes every stage before it). The per-set projection is
``outer_steps × (pgd_steps × PGD step + 2 × surrogate_steps × surrogate step)`` at ASPL's defaults (50, 6, 3).

Full fine-tuning needs, beyond the model, a float32 gradient and AdamW's two moments per trainable weight (12 bytes,
≈ 14 GB for SD 2's UNet and text encoder). When the device has less free memory than that, the full step is
measured without its optimiser update (forward and backward through every weight: the same gradient work) and the
AdamW update is timed on ``ADAM_PROBE`` weights and scaled linearly to the trainable count (it is one pass over
memory per weight); the result says so (``"estimated_optimizer": true``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from faceshield.diffusion.finetune import FinetuneConfig, Finetuner, denoising_loss, draw_noise, \
    encode_for_training  # noqa: E402
from faceshield.diffusion.testing import SD2_BASE, TINY, build_random_stable_diffusion  # noqa: E402
from faceshield.methods.base import method_config  # noqa: E402
from faceshield.methods.haa import ASPL, HAA  # noqa: E402

STAGES = ("tiny", "aspl", "haa", "lora", "full")  # aspl, haa: one PGD step each
ADAM_PROBE = 50_000_000  # weights of the AdamW timing probe (0.8 GB with its gradient and moments)


def _peak(device: torch.device) -> float:
    """GiB: CUDA peak allocated since the last reset, or the process's peak RSS (Linux ru_maxrss is KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _free_bytes(device: torch.device) -> int | None:
    """Free device memory in bytes (CUDA: the driver's; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _timed(device: torch.device, fn) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": round(time.perf_counter() - start, 2), "peak_gib": round(_peak(device), 2)}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _report(result: dict, key: str, value) -> None:
    result[key] = value
    print(json.dumps({key: value}), flush=True)


def _photos(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=generator).to(device)
    face = torch.tensor([[0.38, 0.45], [0.62, 0.45], [0.5, 0.58], [0.41, 0.7], [0.59, 0.7]]) * size
    return images, [face[None].clone() for _ in range(n)]


def pgd_step_seconds(name: str, sd, images, marks, device) -> dict:
    """One PGD step of ``name`` on all photos at once (against a LoRA surrogate, as by default)."""
    from faceshield.faces.masks import face_mask_from_landmarks

    cls = ASPL if name == "aspl" else HAA
    method = cls(method_config(name, resolution=images.shape[-1], device=str(device)), model=sd)
    tuner = Finetuner(sd, method.finetune_config())
    masks = torch.stack([face_mask_from_landmarks(m.to(images), images.shape[-2:]).amax(0) for m in marks])
    state = method.start(images, masks)
    generator = torch.Generator().manual_seed(0)
    return _timed(device, lambda: method.pgd_step(tuner, images, torch.zeros_like(images), state, generator))


def surrogate_step_seconds(mode: str, sd, images, device) -> dict:
    """One fine-tuning step (batch 2) in ``mode`` with the default memory settings."""
    tuner = Finetuner(sd, FinetuneConfig(mode=mode))
    latents = encode_for_training(sd, images[:2])
    return _timed(device, lambda: tuner.step(latents, torch.Generator().manual_seed(0)))


def full_step_without_optimizer(sd, images, device) -> dict:
    """The full step's forward and backward (gradients for every UNet and text-encoder weight, Finetuner.step's
    loss) and the AdamW update timed on ``ADAM_PROBE`` weights, scaled to the trainable count."""
    tuner = Finetuner(sd, FinetuneConfig(mode="full"))
    latents = encode_for_training(sd, images[:2])
    generator = torch.Generator().manual_seed(0)

    def forward_backward() -> None:
        sd.unet.train()
        t, noise = draw_noise(sd, latents, generator)
        emb = tuner.embeddings([tuner.config.instance_prompt]).expand(latents.shape[0], -1, -1)
        denoising_loss(sd, latents, emb, t, noise, tuner.autocast)[0].mean().backward()
        torch.nn.utils.clip_grad_norm_(tuner.params, tuner.config.max_grad_norm)
        sd.unet.eval()

    out = _timed(device, forward_backward)
    n = sum(p.numel() for p in tuner.params)
    for p in tuner.params:
        p.grad = None
    probe = torch.zeros(ADAM_PROBE, device=device, requires_grad=True)
    probe.grad = torch.randn(ADAM_PROBE, device=device)
    adam = torch.optim.AdamW([probe], lr=5e-7, weight_decay=1e-2)
    adam.step()  # the first step allocates the moments
    update = _timed(device, adam.step)["seconds"] * n / ADAM_PROBE
    out["forward_backward_seconds"] = out["seconds"]
    out["optimizer_seconds"] = round(update, 2)
    out["seconds"] = round(out["seconds"] + update, 2)
    out["estimated_optimizer"] = True
    return out


def sd2_profile(size: int, photos: int, stages: set[str], device: torch.device, result: dict) -> None:
    _report(result, "sd2_setup", {"size": size, "photos": photos, "threads": torch.get_num_threads()})
    images, marks = _photos(photos, size, device)
    if stages & {"aspl", "haa", "lora"}:
        start = time.perf_counter()
        sd = build_random_stable_diffusion(SD2_BASE, device)
        _report(result, "build_seconds", round(time.perf_counter() - start, 1))
        for name in ("aspl", "haa"):  # before any fine-tuning: the LoRA surrogate of the default
            if name in stages:
                _report(result, f"pgd_step_{name}", pgd_step_seconds(name, sd, images, marks, device))
        if "lora" in stages:
            _report(result, "surrogate_step_lora", surrogate_step_seconds("lora", sd, images, device))
        del sd
    if "full" in stages:
        sd = build_random_stable_diffusion(SD2_BASE, device)  # a fresh model without adapters
        trainable = sum(p.numel() for p in sd.unet.parameters()) + sum(p.numel() for p in sd.text_encoder.parameters())
        need, free = 12 * trainable + 2 * 2**30, _free_bytes(device)  # gradient + 2 moments, 2 GiB of activations
        if free is not None and free < need:
            step = full_step_without_optimizer(sd, images, device)
            step["why_estimated"] = f"needs about {need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB available"
        else:
            step = surrogate_step_seconds("full", sd, images, device)
        _report(result, "surrogate_step_full", step)
        del sd
    for name in ("aspl", "haa"):
        if f"pgd_step_{name}" in result and "surrogate_step_lora" in result:
            per_set = 50 * (6 * result[f"pgd_step_{name}"]["seconds"] + 6 * result["surrogate_step_lora"]["seconds"])
            _report(result, f"projected_set_seconds_{name}_lora", round(per_set, 0))
        if f"pgd_step_{name}" in result and "surrogate_step_full" in result:
            per_set = 50 * (6 * result[f"pgd_step_{name}"]["seconds"] + 6 * result["surrogate_step_full"]["seconds"])
            _report(result, f"projected_set_seconds_{name}_full", round(per_set, 0))


def tiny_end_to_end(device: torch.device) -> dict:
    """aspl and haa at 64 px on 4 photos, 2 outer steps × (3 + 6 + 3), then a LoRA attack (10 steps, 2 images per
    prompt, 10 DDIM steps), generation only (scoring needs the FR models: see tests/test_customization.py)."""
    from faceshield.eval.customization import AttackConfig, finetune_attack, generate_set

    images, marks = _photos(4, 64, device)
    out = {}
    with _threads(1):  # see the module docstring
        for cls in (ASPL, HAA):
            sd = build_random_stable_diffusion(TINY, device)
            method = cls(method_config(cls.name, resolution=64, outer_steps=2, device=str(device)), model=sd)
            start = time.perf_counter()
            protected, _ = method.protect_set(images, marks)
            out[f"protect_{cls.name}_seconds"] = round(time.perf_counter() - start, 2)
        sd = build_random_stable_diffusion(TINY, device)
        config = AttackConfig(mode="lora", steps=10, n_images=2, sample_steps=10, resolution=64, device=str(device))
        start = time.perf_counter()
        finetune_attack(sd, protected, config)
        generate_set(sd, config)
        out["attack_lora_seconds"] = round(time.perf_counter() - start, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="Threads of the SD-2 stages.")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {','.join(STAGES)}.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if stages - set(STAGES):
        parser.error(f"unknown stages {sorted(stages - set(STAGES))}; choose from {','.join(STAGES)}")
    device = torch.device(args.device)
    result: dict = {}
    _report(result, "machine", {"device": str(device), "cpu": platform.processor() or platform.machine(),
                                "cores": os.cpu_count()})
    if "tiny" in stages:
        _report(result, "tiny", tiny_end_to_end(device))
    if stages - {"tiny"}:
        torch.set_num_threads(args.threads)
        sd2_profile(args.size, args.photos, stages, device, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
