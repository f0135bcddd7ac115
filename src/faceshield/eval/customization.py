"""The customization attack harness: fine-tune Stable Diffusion on a person's photos (DreamBooth or LoRA), generate
new images of them, and score how much of the person the images carry (Anti-DreamBooth's evaluation, METHODS.md).

Metrics per prompt and overall (generated images ``G``, clean photos of the person ``C``):

- ``fdfr``: face detection failure rate, the share of ``G`` where RetinaFace finds no face;
- ``detector_confidence``: mean RetinaFace score of the best face over images with a face (MetaCloak's);
- ``ism``: per FR model of our zoo, the mean cosine of each detected face's embedding to the unit mean embedding
  of ``C``, failed detections excluded (None when no face at all); ``ism_judge``: the same through the independent
  judging pipeline (:mod:`faceshield.eval.judge`, MTCNN + OpenCV alignment);
- ``brisque``: mean BRISQUE (0 best … 100 worst, OpenCV's model).

The clean-set run is the floor: a protection works when its ISM is lower, and FDFR and BRISQUE higher, than the
clean set's under the same attack.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from faceshield.diffusion.loading import DEFAULT_MODEL
from faceshield.errors import FaceshieldError, InputError
from faceshield.settings import Settings, setting

log = logging.getLogger(__name__)

PROMPTS = ("a photo of sks person", "a dslr portrait of sks person")


@dataclass
class AttackConfig(Settings):
    """The attacker's settings; defaults: Anti-DreamBooth's evaluation (METHODS.md) unless said.

    Attributes:
        mode: ``dreambooth`` (the whole UNet + text encoder, lr 5e-7) or ``lora`` (UNet attention adapters,
            lr 1e-4, rank 4; diffusers' DreamBooth-LoRA example, the papers give none).
        diffusion_model: SD 1.x/2.x hub id or folder (SD 2.1-base in the papers).
        steps: fine-tuning steps (1000); batch_size (2); resolution (512).
        n_images: images generated per prompt (16); sample_steps: DDIM steps (100); guidance: CFG scale (7.5).
        prior_weight: prior preservation weight (0 = off; Anti-DreamBooth uses 1 with 200 class images).
        seed; device; dtype.
    """

    mode: str = setting("dreambooth", choices=("dreambooth", "lora"))
    diffusion_model: str = DEFAULT_MODEL
    steps: int = setting(1000, "[0, 100000]")
    lr: float = setting(5e-7, "(0, 1]")
    lora_lr: float = setting(1e-4, "(0, 1]")
    lora_rank: int = setting(4, "[1, 1024]")
    batch_size: int = setting(2, "[1, 64]")
    resolution: int = setting(512, "[64, 2048]")
    n_images: int = setting(16, "[1, 1000]")
    sample_steps: int = setting(100, "[1, 1000]")
    guidance: float = setting(7.5, "[1, 50]")
    prior_weight: float = setting(0.0, "[0, inf)")
    seed: int = 0
    device: str = "cpu"
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))


def photo_files(folder: Path) -> list[Path]:
    from faceshield.images import is_supported

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_supported(p)) if folder.is_dir() else []
    if not files:
        raise InputError(f"{folder}: no photos found (a folder of one person's JPEG/PNG photos is needed)")
    return files


def load_set(folder: Path, resolution: int) -> torch.Tensor:
    """The photos of ``folder`` as DreamBooth sees them: centred square, resized to ``resolution`` (N×3×R×R)."""
    from faceshield.images import load_image, to_tensor

    out = []
    for path in photo_files(folder):
        image = to_tensor(load_image(path).rgb)
        h, w = image.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        out.append(F.interpolate(image[..., top:top + side, left:left + side], size=(resolution, resolution),
                                 mode="bilinear", align_corners=False, antialias=True).clamp(0, 1))
    return torch.cat(out)


def to_uint8_list(images: torch.Tensor) -> list[np.ndarray]:
    return [(x.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy() for x in images]


class Scorer:
    """Scores generated images against the clean photos of the person (see the module docstring).

    Args:
        clean: the clean photos ``H×W×3`` uint8 (the reference identity).
        models: FR models of our zoo (default: the calibrated surrogate models, AUC ≥ 0.9).
        judge: also score through the independent judging pipeline (its default models).
        device: where the networks run.
    """

    def __init__(self, clean: Sequence[np.ndarray], models: Sequence[str] = (), judge: bool = True,
                 device: str = "cpu"):
        from faceshield.adversarial import surrogate_ensemble
        from faceshield.faces.detect import create_detector

        self.detector = create_detector("retinaface", device=device)
        self.ensemble = surrogate_ensemble(tuple(models), device)[0]
        self.judge = None
        if judge:
            from faceshield.eval.judge import IndependentJudge

            self.judge = IndependentJudge(device=device)
        own, judged = [], []
        for rgb in clean:
            found = self._embed(rgb)
            if found is not None:
                own.append(found[1])
            if self.judge is not None:
                e = self.judge.embed(rgb)
                if e is not None:
                    judged.append(e)
        if not own:
            raise FaceshieldError("no face found in any clean photo of the set; the identity cannot be scored")
        self.reference = {m: _unit(np.mean([e[m] for e in own], 0)) for m in self.ensemble.names}
        self.judge_reference = ({m: _unit(np.mean([e[m] for e in judged], 0)) for m in self.judge.models}
                                if judged else None)

    def _embed(self, rgb: np.ndarray) -> tuple[float, dict[str, np.ndarray]] | None:
        """(detector score, {model: unit embedding}) of the most confident RetinaFace face, or None."""
        from faceshield.faces.detect import detect_faces, landmark_tensor
        from faceshield.images import to_tensor

        faces = detect_faces(rgb, self.detector)
        if not faces:
            return None
        best = max(faces, key=lambda f: f.score)
        emb = self.ensemble.embed(to_tensor(rgb), landmark_tensor([best]))
        return best.score, {m: e[0].cpu().numpy() for m, e in emb.items()}

    def score(self, images: Sequence[np.ndarray]) -> dict:
        """Metrics of generated images ``H×W×3`` uint8 (module docstring), with per-image values."""
        from faceshield.eval.quality import brisque

        per_image = []
        for rgb in images:
            found = self._embed(rgb)
            record = {"face": found is not None, "detector_confidence": None, "ism": {}, "ism_judge": {},
                      "brisque": None}
            if found is not None:
                record["detector_confidence"] = round(float(found[0]), 4)
                record["ism"] = {m: round(float(e @ self.reference[m]), 4) for m, e in found[1].items()}
            if self.judge is not None and self.judge_reference is not None:
                sims = self.judge.similarity(rgb, self.judge_reference)
                record["ism_judge"] = {m: round(v, 4) for m, v in (sims or {}).items()}
            value = brisque(rgb)
            record["brisque"] = None if np.isnan(value) else round(value, 3)
            per_image.append(record)
        return {**summarise(per_image), "images": per_image}


def summarise(per_image: list[dict]) -> dict:
    """Means over images (ISM and confidence over images with a face only) of per-image records."""
    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    faces = [r for r in per_image if r["face"]]
    models = sorted({m for r in faces for m in r["ism"]})
    judged = sorted({m for r in per_image for m in r["ism_judge"]})
    return {
        "n": len(per_image),
        "fdfr": round(1 - len(faces) / len(per_image), 4) if per_image else None,
        "detector_confidence": mean([r["detector_confidence"] for r in faces]),
        "ism": {m: mean([r["ism"].get(m) for r in faces]) for m in models},
        "ism_judge": {m: mean([r["ism_judge"].get(m) for r in per_image]) for m in judged},
        "brisque": mean([r["brisque"] for r in per_image]),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def finetune_attack(sd, images: torch.Tensor, config: AttackConfig) -> list[float]:
    """Fine-tune ``sd`` in place on ``images`` (N×3×R×R) under "a photo of sks person"; returns the losses."""
    from faceshield.diffusion.finetune import FinetuneConfig, Finetuner, encode_for_training

    tuner = Finetuner(sd, FinetuneConfig(mode="full" if config.mode == "dreambooth" else "lora", lr=config.lr,
                                         lora_lr=config.lora_lr, lora_rank=config.lora_rank,
                                         batch_size=config.batch_size, prior_weight=config.prior_weight))
    tuner.prepare_prior(config.resolution, config.seed)
    latents = encode_for_training(sd, images.to(sd.device))
    return tuner.train(latents, config.steps, torch.Generator().manual_seed(config.seed))


def generate_set(sd, config: AttackConfig, prompts: Sequence[str] = PROMPTS, batch: int = 4) -> dict[str, torch.Tensor]:
    """``n_images`` images per prompt (``n×3×R×R`` in [0, 1]), seeds ``seed + i`` per batch."""
    from faceshield.diffusion.finetune import memory_guard
    from faceshield.diffusion.generation import generate

    out = {}
    with memory_guard("generating images", sd.device):
        for prompt in prompts:
            parts = []
            for i in range(0, config.n_images, batch):
                n = min(batch, config.n_images - i)
                parts.append(generate(sd, [prompt] * n, steps=config.sample_steps, guidance=config.guidance,
                                      seed=config.seed + i, height=config.resolution, width=config.resolution).cpu())
            out[prompt] = torch.cat(parts)
    return out


def attack_customize(photo_dir: Path, out_dir: Path, config: AttackConfig, scorer: Scorer | None = None,
                     clean_dir: Path | None = None, sd=None, models: Sequence[str] = ()) -> dict:
    """Fine-tune on ``photo_dir``, generate, score against ``clean_dir`` (default ``photo_dir``); write the images,
    ``report.json`` and ``report.html`` under ``out_dir``; return the report.

    Args:
        scorer: reuse a :class:`Scorer` (its clean set); default one built from ``clean_dir`` with FR ``models``.
        sd: a loaded model to fine-tune in place (default: a fresh load of ``config.diffusion_model``).
    """
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.images import load_image, save_image

    out_dir = Path(out_dir)
    images = load_set(photo_dir, config.resolution)
    sd = sd or load_stable_diffusion(config.diffusion_model, config.device, config.dtype)  # fails before scoring
    if scorer is None:
        scorer = Scorer([load_image(p).rgb for p in photo_files(clean_dir or photo_dir)], models=models,
                        device=config.device)
    clock = time.perf_counter()
    losses = finetune_attack(sd, images, config)
    seconds_finetune = time.perf_counter() - clock
    clock = time.perf_counter()
    generated = generate_set(sd, config)
    seconds_generate = time.perf_counter() - clock
    clock = time.perf_counter()
    report = {"photos": str(photo_dir), "clean": str(clean_dir or photo_dir), "config": asdict(config),
              "finetune_loss": [round(v, 5) for v in losses[-10:]], "prompts": {}}
    everything = []
    for k, (prompt, batch) in enumerate(generated.items()):
        rgbs = to_uint8_list(batch)
        folder = out_dir / "images" / f"prompt{k}"
        for i, rgb in enumerate(rgbs):
            save_image(folder / f"{i:03d}.png", rgb)
        scores = scorer.score(rgbs)
        everything += scores["images"]
        report["prompts"][prompt] = {**scores, "folder": str(folder)}
    report["overall"] = summarise(everything)
    report["seconds"] = {"finetune": round(seconds_finetune, 2), "generate": round(seconds_generate, 2),
                         "score": round(time.perf_counter() - clock, 2)}
    write_report(report, out_dir, {p: to_uint8_list(b) for p, b in generated.items()})
    return report


def _grid(images: Sequence[np.ndarray], columns: int = 8, size: int = 128) -> str:
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, rgb in enumerate(images):
        sheet.paste(Image.fromarray(rgb).resize((size, size)), ((i % columns) * size, (i // columns) * size))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _metric_row(label: str, s: dict) -> str:
    ism = ", ".join(f"{m} {v:.3f}" for m, v in s["ism"].items() if v is not None) or "–"
    judge = ", ".join(f"{m} {v:.3f}" for m, v in s["ism_judge"].items() if v is not None) or "–"
    conf = "–" if s["detector_confidence"] is None else f"{s['detector_confidence']:.3f}"
    bq = "–" if s["brisque"] is None else f"{s['brisque']:.1f}"
    return (f"<tr><td>{html.escape(label)}</td><td>{100 * s['fdfr']:.0f}%</td><td>{conf}</td>"
            f"<td>{html.escape(ism)}</td><td>{html.escape(judge)}</td><td>{bq}</td></tr>")


_HEAD = ("<tr><th></th><th>FDFR ↑</th><th>detector conf. ↓</th><th>ISM, our FR zoo ↓</th>"
         "<th>ISM, independent judge ↓</th><th>BRISQUE ↑</th></tr>")


def write_report(report: dict, out_dir: Path, images: dict[str, list[np.ndarray]]) -> tuple[Path, Path]:
    """``report.json`` and a self-contained ``report.html`` (metrics table, a grid per prompt) in ``out_dir``."""
    from faceshield.fileio import write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_metric_row(p, s) for p, s in report["prompts"].items()] + [_metric_row("all", report["overall"])]
    grids = "".join(f"<h3>{html.escape(p)}</h3><img src='{_grid(imgs)}'>" for p, imgs in images.items())
    page = (f"<!doctype html><meta charset='utf-8'><title>customization attack</title>"
            f"<h1>Customization attack ({html.escape(report['config']['mode'])}) on {html.escape(report['photos'])}"
            f"</h1><table border=1 cellpadding=4>{_HEAD}{''.join(rows)}</table>{grids}")
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_text_atomic(json_path, json.dumps(report, indent=2))
    write_text_atomic(html_path, page)
    return json_path, html_path


def evaluate_customization(set_dir: Path, methods: Sequence[str], out_dir: Path, config: AttackConfig,
                           method_settings: dict | None = None, reference_dir: Path | None = None,
                           scorer: Scorer | None = None, models: Sequence[str] = ()) -> dict:
    """Protect ``set_dir`` with each method, attack each protected set and the clean set (the floor), score all.

    Args:
        method_settings: overrides given to every method that has them (e.g. ``{"outer_steps": 10}``).
        reference_dir: clean photos of the person for ISM (default ``set_dir``).
        scorer: reuse a :class:`Scorer` (default: one built from the reference photos with FR ``models``).

    Writes ``<out_dir>/<method>/protected/*.png`` and ``<out_dir>/<method>/attack/``, and ``summary.json`` /
    ``summary.html`` (one row per run); returns the summary.
    """
    import dataclasses

    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor
    from faceshield.fileio import write_text_atomic
    from faceshield.images import load_image, save_image, to_tensor, to_uint8
    from faceshield.methods.base import get_method_class, method_config

    out_dir = Path(out_dir)
    files = photo_files(set_dir)
    for name in methods:  # bad names and settings fail before any model loads
        get_method_class(name)
    if scorer is None:
        scorer = Scorer([load_image(p).rgb for p in photo_files(reference_dir or set_dir)], models=models,
                        device=config.device)
    detector = create_detector("retinaface", device=config.device)
    rows = {}
    for name in ("clean", *methods):
        folder = Path(set_dir)
        if name != "clean":
            fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
            overrides = {k: v for k, v in {"diffusion_model": config.diffusion_model, "device": config.device,
                                           "dtype": config.dtype, "resolution": config.resolution,
                                           **(method_settings or {})}.items() if k in fields}
            method = get_method_class(name)(method_config(name, **overrides))
            photos = []
            for p in files:
                rgb = load_image(p).rgb
                faces = detect_faces(rgb, detector)
                if not faces:
                    raise InputError(f"{p}: no face found; every photo of the set needs one")
                photos.append((to_tensor(rgb), landmark_tensor(faces)))
            clock = time.perf_counter()
            results = method.protect_many(photos)
            seconds = time.perf_counter() - clock
            folder = out_dir / name / "protected"
            for p, result in zip(files, results):
                save_image(folder / f"{p.stem}.png", to_uint8(result.image))
        sd = load_stable_diffusion(config.diffusion_model, config.device, config.dtype)
        report = attack_customize(folder, out_dir / name / "attack", config, scorer, sd=sd)
        rows[name] = {**report["overall"], "protect_seconds": None if name == "clean" else round(seconds, 2),
                      "report": str(out_dir / name / "attack" / "report.html")}
        rows[name].pop("images", None)
    summary = {"set": str(set_dir), "config": asdict(config), "methods": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    table = "".join(_metric_row(n, r) for n, r in rows.items())
    write_text_atomic(out_dir / "summary.html", f"<!doctype html><meta charset='utf-8'><title>anti-customization"
                      f"</title><h1>Anti-customization on {html.escape(str(set_dir))}</h1>"
                      f"<table border=1 cellpadding=4>{_HEAD}{table}</table>")
    return summary
