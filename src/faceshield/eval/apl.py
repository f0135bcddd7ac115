"""``faceshield evaluate-apl``: does a learned prompt prefix hide named people and leave other prompts alone?

Identity (the authors' protocol, METHODS.md): for each name, ``images_per_name`` (4) images of
``"A close-up portrait of <name>"`` with and without the prefix (DDIM 20, guidance 7, seed 2238, one batch);
each image's identity score is the cosine of its best face to the reference embedding of the real person (the
normalised mean over the reference photos), and **a failed detection counts as 0**. Mean and max over the images
of a name, then averaged over the names. Scored twice: by our FR zoo (RetinaFace + differentiable alignment,
:class:`~faceshield.models.ensemble.FREnsemble`) and by the independent judging pipeline (MTCNN + OpenCV
alignment, :class:`~faceshield.eval.judge.IndependentJudge`), with the share of images above each model's
threshold at FAR 1e-2.

Preservation on general prompts: the same seed with and without the prefix; per image the relative change of the
predicted noise ``‖ε(z_t, prefix+c) − ε(z_t, c)‖ / ‖ε(z_t, c)‖`` at four noise levels of the no-prefix image's own
latent, and the pixel change of the final image (mean |Δ| and PSNR); the same numbers for the identity prompts
show the contrast. CLIP score (``100·max(cos, 0)``, torchmetrics' convention) of each general image, with and
without the prefix, against its caption when CLIP weights are given. Plug-and-play: everything again
on a second SD 1.x model with the same prefix file. Output: ``report.json``, ``report.html`` with image grids,
and the grids as PNG files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from faceshield.errors import FaceshieldError
from faceshield.fileio import write_text_atomic
from faceshield.methods.apl import APL_DEFAULT_MODEL, DTYPES, _read_lines, parse_names, slug
from faceshield.settings import Settings, setting

log = logging.getLogger(__name__)

NOISE_TIMESTEPS = (999, 749, 499, 249)  # noise levels of the preservation measurement (spread over the schedule)
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default (the advice in errors)


class ReferencePhotoError(FaceshieldError):
    """No reference photo (or no face in them) for a named person."""


@dataclass
class APLEvalConfig(Settings):
    """Settings of ``evaluate-apl``; defaults are the authors' identity protocol (METHODS.md).

    Attributes:
        diffusion_model: the SD 1.x model the prefix is evaluated on; second_model: another SD 1.x model for the
            plug-and-play check ("" = none).
        template: identity prompt opening (followed by the name); images_per_name: 4.
        steps, guidance, seed: DDIM steps (20), guidance (7), seed (2238) of every generation.
        size: image side (0 = the model's native size).
        fr_models: zoo models that score identity (empty = calibrated models with AUC ≥ 0.9);
        judge_models: models of the independent judge (empty = its strong ones).
        clip_model: local folder or hub id of a CLIP model (transformers layout) for CLIP score ("" = skip).
    """

    diffusion_model: str = APL_DEFAULT_MODEL
    second_model: str = ""
    template: str = "A close-up portrait of"
    images_per_name: int = setting(4, "[1, 64]")
    steps: int = setting(20, "[1, 1000]")
    guidance: float = setting(7.0, "[1, inf)")
    seed: int = setting(2238, "[0, inf)")
    size: int = setting(0, "[0, 2048]")
    fr_models: tuple[str, ...] = ()
    judge_models: tuple[str, ...] = ()
    clip_model: str = ""
    device: str = "cpu"
    dtype: str = setting("auto", choices=DTYPES)


# --- identity scoring ------------------------------------------------------------------------------------------
class IdentityScorer:
    """Identity scores of images against a person's reference photos, by the FR zoo and the independent judge.

    Args:
        fr_models: zoo models (empty = calibrated surrogates, AUC ≥ 0.9); judge_models: judge models (empty =
            the judge's strong ones); detector: the zoo's face detector (RetinaFace).
    """

    def __init__(self, fr_models: Sequence[str] = (), judge_models: Sequence[str] = (), device: str = "cpu",
                 detector: str = "retinaface"):
        from faceshield.adversarial import surrogate_ensemble
        from faceshield.eval.judge import IndependentJudge
        from faceshield.faces.detect import create_detector

        self.ensemble, self.thresholds = surrogate_ensemble(tuple(fr_models), device)
        self.detector = create_detector(detector, device=device)
        self.judge = IndependentJudge(tuple(judge_models), device=device)

    def embed(self, rgb: np.ndarray) -> dict[str, dict[str, np.ndarray]] | None:
        """``{"zoo": {model: D}, "judge": {model: D}}`` unit embeddings of the best face; None without a face for
        either pipeline (each pipeline detects on its own)."""
        from faceshield.faces.detect import best_face_landmarks
        from faceshield.images import to_tensor

        landmarks = best_face_landmarks(rgb, self.detector)
        judged = self.judge.embed(rgb)
        if landmarks is None or judged is None:
            return None
        zoo = {k: v[0].numpy() for k, v in self.ensemble.embed(to_tensor(rgb), landmarks).items()}
        return {"zoo": zoo, "judge": judged}

    def reference(self, photos: Sequence[np.ndarray], who: str = "the person") -> dict[str, dict[str, np.ndarray]]:
        """The normalised mean embedding per pipeline and model over the photos with a face."""
        found = [e for e in (self.embed(p) for p in photos) if e is not None]
        if not found:
            raise ReferencePhotoError(f"no face found in the {len(photos)} reference photo(s) of {who}; "
                                  "give clear frontal photos")
        out: dict[str, dict[str, np.ndarray]] = {}
        for pipeline in ("zoo", "judge"):
            out[pipeline] = {}
            for model in found[0][pipeline]:
                mean = np.mean([e[pipeline][model] for e in found], axis=0)
                out[pipeline][model] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return out

    def score(self, rgb: np.ndarray, reference: dict[str, dict[str, np.ndarray]]) -> dict:
        """``{"detected": bool, "zoo": {model: cos}, "judge": {model: cos}}``; a failed detection scores 0."""
        embedded = self.embed(rgb)
        scores = {"detected": embedded is not None}
        for pipeline, models in reference.items():
            scores[pipeline] = {m: 0.0 if embedded is None else float(embedded[pipeline][m] @ ref)
                                for m, ref in models.items()}
        return scores

    def thresholds_of(self, pipeline: str) -> dict[str, float]:
        return self.thresholds if pipeline == "zoo" else self.judge.thresholds


def summarise_scores(per_name: dict[str, list[dict]], thresholds: dict[str, dict[str, float]]) -> dict:
    """Per pipeline and model: mean over names of the per-name mean and max score, and the share of images above
    the model's threshold at FAR 1e-2; plus the detection rate."""
    out: dict = {"detection_rate": float(np.mean([s["detected"] for v in per_name.values() for s in v]))}
    for pipeline in ("zoo", "judge"):
        models = next(iter(per_name.values()))[0][pipeline].keys()
        out[pipeline] = {}
        for m in models:
            means = [np.mean([s[pipeline][m] for s in v]) for v in per_name.values()]
            maxes = [np.max([s[pipeline][m] for s in v]) for v in per_name.values()]
            row = {"mean": float(np.mean(means)), "max": float(np.mean(maxes))}
            if m in thresholds[pipeline]:
                thr = thresholds[pipeline][m]
                row["match_rate"] = float(np.mean([s[pipeline][m] >= thr for v in per_name.values() for s in v]))
                row["threshold"] = thr
            out[pipeline][m] = row
    return out


def reference_photos(reference_dir: Path, name: str) -> list[Path]:
    """A person's reference photos: the folder ``DIR/<name>`` or ``DIR/<slug>``, or files ``DIR/<slug>.*``."""
    from faceshield.images import scan_folder

    for folder in (reference_dir / name, reference_dir / slug(name)):
        if folder.is_dir():
            photos, _ = scan_folder(folder)
            if photos:
                return sorted(photos)
    files = sorted(p for p in reference_dir.glob(f"{slug(name)}.*") if p.suffix.lower() in
                   (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"))
    if not files:
        raise ReferencePhotoError(f"no reference photos of {name!r} in {reference_dir}: put them in "
                              f"{reference_dir / slug(name)}/ or name a file {slug(name)}.jpg")
    return files


# --- preservation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def noise_change(sd, prefix, prompts: Sequence[str], images: torch.Tensor, seed: int) -> list[float]:
    """Per prompt: mean over :data:`NOISE_TIMESTEPS` of ``‖ε(z_t, prefix+p) − ε(z_t, p)‖ / ‖ε(z_t, p)‖``, with
    ``z_t`` the noised latent of the prompt's own no-prefix image ``images`` (``B×3×H×W``)."""
    from faceshield.methods.apl import noisy_latents, predict_noise_batch

    clean = sd.encode_images(images).float()
    plain = sd.encode_prompts(list(prompts))
    with_prefix = sd.encode_prompts([prefix.apply(p) for p in prompts])
    generator = torch.Generator().manual_seed(seed)
    changes = torch.zeros(len(prompts))
    for t in NOISE_TIMESTEPS:
        t = min(t, len(sd.schedule.alphas_cumprod) - 1)
        timesteps = torch.full((len(prompts),), t)
        z = noisy_latents(sd, clean, torch.randn(clean.shape, generator=generator).to(clean), timesteps)
        e0 = predict_noise_batch(sd, z, timesteps, plain).float()
        e1 = predict_noise_batch(sd, z, timesteps, with_prefix).float()
        changes += ((e1 - e0).flatten(1).norm(dim=1) / e0.flatten(1).norm(dim=1).clamp_min(1e-12)).cpu()
    return (changes / len(NOISE_TIMESTEPS)).tolist()


def pixel_change(a: torch.Tensor, b: torch.Tensor) -> list[dict]:
    """Per image pair (``B×3×H×W`` in [0, 1]): mean absolute difference (0–255 scale) and PSNR in dB."""
    out = []
    for x, y in zip(a.float(), b.float()):
        mse = float((x - y).pow(2).mean())
        out.append({"mean_abs": 255 * float((x - y).abs().mean()),
                    "psnr": float("inf") if mse == 0 else float(10 * np.log10(1 / mse))})
    return out


class ClipScorer:
    """CLIP score of images against their captions with a transformers CLIP model (local folder or hub id).

    The score is ``100·max(cos(E_image, E_text), 0)`` with ``E`` CLIP's projected image and text embeddings: the
    convention of torchmetrics' ``CLIPScore`` (whose default model is ``openai/clip-vit-large-patch14``); Hessel et
    al.'s CLIP-S is the same cosine with weight 2.5 instead of 100. The folder holds a ``CLIPModel``, its tokenizer
    and ``preprocessor_config.json``, as ``save_pretrained`` of the model and its ``CLIPProcessor`` write them.

    Raises:
        DiffusionModelError: one line naming the folder and how to provide it (missing folder, no weights, no
            processor files).
    """

    def __init__(self, source: str, device: str = "cpu"):
        from faceshield.diffusion.loading import load_component, offline, require_diffusers, resolve_source

        require_diffusers()
        import transformers

        how = (f"download one where there is internet (`hf download {CLIP_SCORE_MODEL} --local-dir clip`) and pass "
               "--clip-model /path/to/folder (transformers layout: config.json, weights, tokenizer and "
               "preprocessor_config.json)")
        source, local = resolve_source(source, "CLIP model", how)
        hub = {"local_files_only": local or offline()}
        self.model = load_component(transformers.CLIPModel.from_pretrained, source, None, what="CLIP model", how=how,
                                    **hub)
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = load_component(transformers.AutoTokenizer.from_pretrained, source, None,
                                        what="CLIP tokenizer", how=how, **hub)
        # OpenAI's preprocessing (PIL bicubic on the 8-bit image) whether or not torchvision is installed: transformers
        # 5 would otherwise pick its torchvision backend when present, whose resize gives other pixels and scores.
        pil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
        self.image_processor = load_component(pil.from_pretrained, source, None, what="CLIP image processor",
                                              how=how, **hub)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: Sequence[str]) -> list[float]:
        """Per pair: the CLIP score of ``images[i]`` (``B×3×H×W`` float RGB in [0, 1]) and ``texts[i]``."""
        from faceshield.images import to_uint8

        pixels = [to_uint8(im) for im in images]
        batch = {**self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True),
                 **self.image_processor(images=pixels, return_tensors="pt")}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)  # a half-precision checkpoint
        out = self.model(**batch)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (100 * (img * txt).sum(-1).clamp_min(0)).cpu().tolist()


# --- the run ---------------------------------------------------------------------------------------------------
def _grid(rows: list[tuple[torch.Tensor, torch.Tensor]], thumb: int = 128) -> np.ndarray:
    """One row per pair: the images without the prefix, a gap, the images with it (uint8 H×W×3)."""
    from PIL import Image

    from faceshield.images import to_uint8

    def strip(images: torch.Tensor) -> np.ndarray:
        tiles = [np.asarray(Image.fromarray(to_uint8(im)).resize((thumb, thumb), Image.Resampling.BICUBIC))
                 for im in images]
        return np.concatenate(tiles, axis=1)

    lines = [np.concatenate([strip(a), np.full((thumb, 8, 3), 255, np.uint8), strip(b)], axis=1) for a, b in rows]
    return np.concatenate(lines, axis=0)


def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def evaluate_model(sd, prefix, people: list[tuple[str, str]], references: dict, captions: list[str],
                   scorer: IdentityScorer, config: APLEvalConfig, clip: ClipScorer | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Identity and preservation of one model with the (already installed) prefix; returns (results, grids)."""
    from faceshield.diffusion.generation import generate
    from faceshield.images import to_uint8

    size = config.size or None
    run = dict(steps=config.steps, guidance=config.guidance, seed=config.seed, height=size, width=size)
    n = config.images_per_name
    scores: dict[str, dict[str, list]] = {"plain": {}, "prefix": {}}
    identity_rows, identity_noise, identity_pixels = [], [], []
    for name, _ in people:
        prompt = f"{config.template} {name}"
        plain = generate(sd, [prompt] * n, **run)
        anonymised = generate(sd, [prefix.apply(prompt)] * n, **run)
        for key, images in (("plain", plain), ("prefix", anonymised)):
            scores[key][name] = [scorer.score(to_uint8(im), references[name]) for im in images]
        identity_rows.append((plain, anonymised))
        identity_noise += noise_change(sd, prefix, [prompt] * n, plain, config.seed)
        identity_pixels += pixel_change(plain, anonymised)
        if progress:
            progress(name)
    thresholds = {p: scorer.thresholds_of(p) for p in ("zoo", "judge")}
    result = {
        "identity": {key: summarise_scores(v, thresholds) for key, v in scores.items()},
        "identity_per_image": scores,
        "identity_prompts": {"noise_change": float(np.mean(identity_noise)),
                             "pixel_mean_abs": float(np.mean([p["mean_abs"] for p in identity_pixels]))},
    }
    grids = {"identity": _grid(identity_rows)}
    if captions:
        plain = generate(sd, captions, **run)
        anonymised = generate(sd, [prefix.apply(c) for c in captions], **run)
        noise = noise_change(sd, prefix, captions, plain, config.seed)
        pixels = pixel_change(plain, anonymised)
        per_prompt = [{"caption": c, "noise_change": e, **p} for c, e, p in zip(captions, noise, pixels)]
        general = {"per_prompt": per_prompt, "noise_change": float(np.mean(noise)),
                   "pixel_mean_abs": float(np.mean([p["mean_abs"] for p in pixels]))}
        if clip is not None:
            # both images against the caption alone: the prefix must not change how well the image fits the text
            before, after = clip(plain, captions), clip(anonymised, captions)
            for row, b, a in zip(per_prompt, before, after):
                row["clip_score"] = {"plain": b, "prefix": a}
            general["clip_score"] = {"plain": float(np.mean(before)), "prefix": float(np.mean(after))}
        result["general"] = general
        grids["general"] = _grid([(plain, anonymised)])
        if progress:
            progress("general prompts")
    return result, grids


def evaluate_apl(prefix_path: str | Path, names: str | Path, reference_dir: str | Path, out_dir: str | Path,
                 captions: str | Path | None = None, config: APLEvalConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run the whole evaluation; writes ``out_dir/report.json``, ``report.html`` and ``grid-*.png``."""
    from faceshield.diffusion.loading import load_stable_diffusion
    from faceshield.diffusion.text_embeddings import PromptPrefix
    from faceshield.images import load_image, save_image

    config = config or APLEvalConfig()
    out_dir, reference_dir = Path(out_dir), Path(reference_dir)
    prefix = PromptPrefix.load(prefix_path)  # a missing or broken prefix file fails before any model loads
    people = parse_names(names)
    caption_list = _read_lines(captions, "captions file") if captions else []
    photos = {name: reference_photos(reference_dir, name) for name, _ in people}
    clip = ClipScorer(config.clip_model, config.device) if config.clip_model else None  # before the FR models
    scorer = IdentityScorer(config.fr_models, config.judge_models, config.device)
    references = {name: scorer.reference([load_image(p).rgb for p in files], name) for name, files in photos.items()}
    models = [config.diffusion_model] + ([config.second_model] if config.second_model else [])
    result: dict = {"config": asdict(config), "prefix": str(prefix_path), "token": prefix.token,
                    "names": [n for n, _ in people], "reference_photos": {k: [str(p) for p in v]
                                                                           for k, v in photos.items()},
                    "models": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    all_grids = {}
    for index, source in enumerate(models):
        sd = load_stable_diffusion(source, config.device, config.dtype)
        prefix.install(sd)
        model_result, grids = evaluate_model(sd, prefix, people, references, caption_list, scorer, config, clip,
                                             progress)
        model_result["role"] = "trained on" if index == 0 else "plug-and-play"
        result["models"][source] = model_result
        for kind, grid in grids.items():
            file = out_dir / f"grid-{index}-{kind}.png"
            save_image(file, grid)
            all_grids[(source, kind)] = grid
    write_text_atomic(out_dir / "report.json", json.dumps(result, indent=2, default=float))
    write_text_atomic(out_dir / "report.html", render_html(result, all_grids))
    return result


def render_html(result: dict, grids: dict[tuple[str, str], np.ndarray]) -> str:
    """A self-contained page: the identity and preservation tables per model and the image grids."""
    esc = html.escape
    parts = ["<!doctype html><meta charset=utf-8><title>faceshield evaluate-apl</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>",
             f"<h1>Anonymization prompt prefix: {esc(str(result['prefix']))}</h1>",
             f"<p>names: {esc(', '.join(result['names']))}. Identity score = cosine of the best face to the "
             "reference embedding; a failed detection counts as 0. Mean and max over the images of a name, averaged "
             "over names.</p>"]
    for source, r in result["models"].items():
        parts.append(f"<h2>{esc(source)} ({esc(r['role'])})</h2><table><tr><th>pipeline</th><th>model</th>"
                     "<th>mean without</th><th>mean with</th><th>max without</th><th>max with</th>"
                     "<th>matches without</th><th>matches with</th></tr>")
        for pipeline in ("zoo", "judge"):
            for m, plain in r["identity"]["plain"][pipeline].items():
                anon = r["identity"]["prefix"][pipeline][m]
                rate = (lambda x: "" if "match_rate" not in x else f"{100 * x['match_rate']:.0f}%")
                parts.append(f"<tr><td>{pipeline}</td><td>{esc(m)}</td><td>{plain['mean']:.3f}</td>"
                             f"<td>{anon['mean']:.3f}</td><td>{plain['max']:.3f}</td><td>{anon['max']:.3f}</td>"
                             f"<td>{rate(plain)}</td><td>{rate(anon)}</td></tr>")
        parts.append("</table>")
        parts.append(f"<p>face detection rate: without {100 * r['identity']['plain']['detection_rate']:.0f}%, with "
                     f"{100 * r['identity']['prefix']['detection_rate']:.0f}%. Relative change of the predicted "
                     f"noise from the prefix: identity prompts {r['identity_prompts']['noise_change']:.3f}")
        if "general" in r:
            g = r["general"]
            parts.append(f", general prompts {g['noise_change']:.3f}; pixel change (mean |Δ|, 0–255): identity "
                         f"{r['identity_prompts']['pixel_mean_abs']:.1f}, general {g['pixel_mean_abs']:.1f}")
            if "clip_score" in g:
                parts.append(f"; CLIP score without {g['clip_score']['plain']:.2f}, with {g['clip_score']['prefix']:.2f}")
        parts.append(".</p>")
        for kind in ("identity", "general"):
            if (source, kind) in grids:
                parts.append(f"<h3>{kind} prompts: without the prefix | with it</h3>"
                             f"<img alt='{kind} grid' src='{_png_uri(grids[(source, kind)])}'>")
    return "\n".join(parts)
