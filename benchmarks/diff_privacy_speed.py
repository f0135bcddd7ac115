"""Diff-Privacy speed by stage: seconds per MSI training step, anonymization step, inversion step, hiding step and
recovery step, extrapolated to the paper's step counts; peak memory; the tiny test model end to end.

Architectures (random weights: speed does not depend on the weight values): ``sd14`` = CompVis/stable-diffusion-v1-4
(UNet, VAE, text encoder: :data:`faceshield.diffusion.testing.SD14`) with the CLIP ViT-L/14 vision tower
(:data:`~faceshield.diffusion.testing.CLIP_VIT_L14_VISION`) of the MSI; the energy runs through one real FR model of
the zoo (``--fr-model``). Face: a real CelebA-HQ photo from ``shared/data/celebahq-pairs``.

Stages (each timed as the difference between two consecutive steps' progress callbacks, so set-up is apart):

- ``msi_step``: one AdamW step of the MSI (UNet forward + backward to the MSI, text encoder with gradient);
- ``anonymize_step``: one DDIM step of anonymization for ``--variants`` rows (UNet forward, then the energy's
  gradient through the VAE decoder and the FR model) — the paper samples 4 variants at once;
- ``inversion_step``: one step of the key's DDIM inversion (1 + ``inversion_iterations`` UNet calls);
- ``hide_step``: one hiding step (2 UNet calls for guidance + the energy's gradient);
- ``recover_step``: one recovery step (1 UNet call);
- ``clip`` (CLIP features, once per face), ``encode`` / ``decode`` (VAE, once per face).

Per face, extrapolated: MSI = msi_steps × msi_step (6100 paper, 600 fast); anonymization = 30 × anonymize_step
(×4/variants for the paper's 4 variants); hiding = 80 × (inversion_step + hide_step); recovery = 80 × recover_step.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/diff_privacy_speed.py [--size 512] [--device cpu|cuda] [--variants 1]
        [--fr-model mobilefacenet-ms1m] [--skip-sd14] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACESHIELD_MIRROR", str(SHARED / "models"))

from faceshield.diffusion import image_conditioning as ic  # noqa: E402
from faceshield.diffusion.testing import (  # noqa: E402
    CLIP_VIT_L14_VISION, SD14, build_random_clip_vision, build_random_stable_diffusion, save_tiny_clip_vision,
    save_tiny_stable_diffusion,
)
from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor  # noqa: E402
from faceshield.images import load_image, to_tensor  # noqa: E402
from faceshield.methods.diff_privacy import DiffPrivacy, DiffPrivacyConfig  # noqa: E402
from faceshield.models.ensemble import FREnsemble  # noqa: E402

PHOTO = SHARED / "data/celebahq-pairs/train/1.png"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB → GiB)


class StepClock:
    """Progress callback recording the time of each step; :meth:`per_step` = the last step's duration."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, [time.perf_counter()]

    def __call__(self, *args) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def per_step(self) -> float:
        return self.times[-1] - self.times[-2]


def note(what: str, seconds: float) -> None:
    print(f"{what}: {seconds:.2f} s", file=sys.stderr, flush=True)


def timed(fn, device: torch.device):
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def sd14_profile(size: int, device: torch.device, variants: int, fr_model: str, iterations: int) -> dict:
    """Seconds per stage of one face on SD v1.4 + CLIP ViT-L/14 with random weights at ``size``² crops."""
    start = time.perf_counter()
    sd = build_random_stable_diffusion(SD14, device, "auto")
    clip = ic.ClipVision(build_random_clip_vision(CLIP_VIT_L14_VISION).to(device).eval().requires_grad_(False),
                         CLIP_VIT_L14_VISION["image_size"], "random ViT-L/14")
    build = time.perf_counter() - start
    note("build SD14 + CLIP ViT-L/14", build)
    config = DiffPrivacyConfig(image_size=size, variants=variants, fr_models=(fr_model,), device=str(device),
                               inversion_iterations=iterations,
                               # 2 steps each: the second one is timed
                               msi_steps=2, anonymize_steps=50, anonymize_strength=0.04, hide_steps=100,
                               hide_strength=0.02)
    dp = DiffPrivacy(config, sd, clip, FREnsemble([fr_model], device=device))
    rgb = load_image(PHOTO).rgb
    image = to_tensor(rgb).to(device)
    crops, _ = dp.crops_of(image, landmark_tensor(detect_faces(rgb, create_detector())).float().to(device))
    out: dict = {"build_models": build}
    _, out["clip"] = timed(lambda: ic.clip_features(clip, crops), device)
    _, out["encode"] = timed(lambda: sd.encode_images(crops), device)
    msi = StepClock(device)
    prepared = dp.prepare_faces(crops, lambda stage, k, n: msi())
    out["msi_step"] = msi.per_step()
    note("clip / encode / msi step", out["msi_step"])
    anon = StepClock(device)
    dp.anonymize_faces(prepared, variants, anon)
    out["anonymize_step"] = anon.per_step()
    note("anonymize step", out["anonymize_step"])
    embeddings = dp.bucket_embeddings(prepared.tokens)
    path = dp.hide_path()
    _, inversion = timed(lambda: dp.invert(prepared.clean, embeddings, path), device)
    out["inversion_step"] = inversion / len(path)
    note("inversion step", out["inversion_step"])
    hide = StepClock(device)
    _, noise = dp.hide_faces(prepared, hide)
    out["hide_step"] = hide.per_step()
    note("hide step", out["hide_step"])
    recovered, seconds = timed(lambda: dp.recover_faces(noise, prepared.tokens, path), device)
    _, out["decode"] = timed(lambda: sd.decode_latents(recovered.latents), device)
    out["recover_step"] = (seconds - out["decode"]) / len(path)
    out["peak_memory_gib"] = peak_memory_gib(device)
    paper = {
        "msi_paper_6100": 6100 * out["msi_step"] + out["clip"] + out["encode"],
        "msi_fast_600": 600 * out["msi_step"] + out["clip"] + out["encode"],
        "anonymize_30_steps_4_variants": 30 * out["anonymize_step"] * 4 / variants + out["decode"],
        "hide_80_steps": 80 * (out["inversion_step"] + out["hide_step"]) + out["decode"],
        "recover_80_steps": 80 * out["recover_step"] + out["decode"],
    }
    return {"per_stage_seconds": out, "per_face_seconds_extrapolated": paper}


def tiny_end_to_end() -> dict:
    """The tiny test models (saved and loaded back) on a real photo: anonymize (2 variants), hide, recover."""
    from faceshield.diffusion.loading import load_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        sd_dir = save_tiny_stable_diffusion(Path(tmp) / "sd")
        clip = ic.load_clip_vision(save_tiny_clip_vision(Path(tmp) / "clip"))
        sd = load_stable_diffusion(sd_dir)
    config = DiffPrivacyConfig(image_size=128, msi_steps=20, variants=2, anonymize_steps=10, hide_steps=10,
                               fr_models=("mobilefacenet-ms1m",))
    dp = DiffPrivacy(config, sd, clip, FREnsemble(["mobilefacenet-ms1m"]))
    rgb = load_image(PHOTO).rgb
    image, landmarks = to_tensor(rgb), landmark_tensor(detect_faces(rgb, create_detector())).float()
    start = time.perf_counter()
    _, info = dp.anonymize(image, landmarks)
    anonymize = time.perf_counter() - start
    start = time.perf_counter()
    published, key, hinfo = dp.hide(image, landmarks)
    hide = time.perf_counter() - start
    _, rinfo = dp.recover(published, key)
    return {"settings": "128 px crops, 20 MSI steps, anonymize 10×0.6 steps × 2 variants, hide/recover 10×0.8 steps, "
                        "5 fixed-point iterations",
            "anonymize_total": anonymize, "msi": info["seconds_msi"], "anonymize": info["seconds_anonymize"],
            "hide_total": hide, "hide": hinfo["seconds_hide"], "recover": rinfo["seconds_recover"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="face crop side (512 as the paper)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", type=int, default=1, help="anonymization rows timed at once (paper: 4)")
    parser.add_argument("--fr-model", default="mobilefacenet-ms1m", help="FR model of the energy")
    parser.add_argument("--inversion-iterations", type=int, default=5)
    parser.add_argument("--skip-sd14", action="store_true", help="only the tiny model end to end")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                          "threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    result["tiny_end_to_end_seconds"] = tiny_end_to_end()
    note("tiny end to end", sum(v for v in result["tiny_end_to_end_seconds"].values() if isinstance(v, float)))
    if not args.skip_sd14:
        result[f"sd14_{args.size}px"] = sd14_profile(args.size, device, args.variants, args.fr_model,
                                                     args.inversion_iterations)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    sys.exit(None if main() else 1)
