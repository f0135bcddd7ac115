"""Photo-scale evaluation: faces of 150–600 px inside 2–12 MP JPEG photos, protected whole, judged the way a face
recognition system meets a posted photo.

The standard protocol (:mod:`faceshield.eval.protocol`) judges 256² aligned crops. A real photo is large; an FR
system finds the face with its own detector and shrinks it to 112 px with its own filter, which can wipe out a
perturbation tuned to one exact alignment. This set renders the project's faces at photo scale, reproducibly:

- **celeba**: ``celebahq-pairs/train/N`` upscaled (Lanczos) so the face is 150–600 px wide, pasted through a
  feathered edge into a 2–12 MP scene, re-encoded as JPEG q 90; judged against ``test/N`` (another photo of the
  same person, as enrolled in a gallery);
- **targets**: the four 1024² ``targets/target/X`` photos in larger scenes; judged against ``targets/test/Y``;
- **vggface2**: the ``set_A`` photos of ``vggface2-n000050``; judged against ``set_C``'s first photo.

Scenes are scikit-image's face-free sample photos (coffee, rocket, Hubble deep field, …), upscaled to the photo's
size with mild sensor grain. ``build_photo_set`` writes ``photos/*.jpg`` and ``manifest.json``; everything depends
only on the seed. ``evaluate_photo_set`` protects every photo through the users' path (:class:`faceshield.protect
.Protector`: detection on the full photo, protection, the file as written) once per held-out judge (leave-one-out),
and judges each output through the protection's own pipeline and through the independent one
(:mod:`faceshield.eval.judge`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from faceshield.errors import FaceshieldError
from faceshield.fileio import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

SCENES = ("coffee", "rocket", "hubble_deep_field", "chelsea", "immunohistochemistry", "colorwheel")
MEGAPIXELS = (2.0, 4.0, 8.0, 12.0)
FACE_PX = (150, 250, 400, 600)
# In CelebA-HQ's aligned 256² crops the face (cheek to cheek) is about 140 px wide.
CELEBA_FACE_FRACTION = 140 / 256


@dataclass
class PhotoEntry:
    """One photo of the set: where it is, who it shows, what it is judged against."""

    photo: str  # relative to the set folder
    reference: str  # absolute path of the other photo of the same person
    identity: str
    source: str  # the face photo it was rendered from
    megapixels: float
    face_px: int
    face_box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the pasted face photo in the scene


def _scene(name: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    import skimage.data

    rgb = getattr(skimage.data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, -1)
    base = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 2.0, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8))


def _feathered_alpha(size: int, border: float = 0.12) -> Image.Image:
    """An ``size``² alpha: 1 inside, a smooth ramp to 0 over the outer ``border`` fraction (no hard seam)."""
    ramp = np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / max(1.0, border * size), 0, 1)
    alpha = np.minimum.outer(ramp, ramp)
    alpha = alpha * alpha * (3 - 2 * alpha)
    return Image.fromarray((alpha * 255).astype(np.uint8))


def _render(face: Image.Image, face_fraction: float, face_px: int, megapixels: float, scene: str,
            rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    side = int(round(face_px / face_fraction))
    width = int(round(np.sqrt(megapixels * 1e6 * 4 / 3)))
    height = int(round(width * 3 / 4))
    if side > min(width, height):
        raise FaceshieldError(f"a {face_px} px face does not fit a {megapixels} MP photo")
    canvas = _scene(scene, width, height, rng)
    big = face.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    canvas.paste(big, (x0, y0), _feathered_alpha(side))
    return canvas, (x0, y0, x0 + side, y0 + side)


def build_photo_set(shared: Path, out: Path, n_celeba: int = 40, seed: int = 0, jpeg_quality: int = 90,
                    include: tuple[str, ...] = ("celeba", "targets", "vggface2")) -> list[PhotoEntry]:
    """Render the set into ``out`` (``photos/*.jpg`` + ``manifest.json``) from the ``shared`` data folder."""
    import csv
    import io

    from faceshield.eval.calibration import pair_ids

    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    sources: list[tuple[str, Path, Path, float]] = []  # identity, face photo, reference, face fraction
    if "celeba" in include:
        pairs = Path(shared) / "celebahq-pairs"
        for pid in pair_ids(pairs)[:n_celeba]:
            sources.append((f"celeba-{pid}", next((pairs / "train").glob(f"{pid}.*")),
                            next((pairs / "test").glob(f"{pid}.*")), CELEBA_FACE_FRACTION))
    if "targets" in include:
        targets = Path(shared) / "targets"
        with open(targets / "pairs.csv", newline="") as f:
            for row in csv.DictReader(f):
                # the 1024² target photos frame the face more tightly than CelebA-HQ's crops
                sources.append((f"target-{Path(row['target']).stem}", targets / row["target"], targets / row["test"],
                                0.68))
    if "vggface2" in include:
        vgg = Path(shared) / "vggface2-n000050"
        reference = sorted((vgg / "set_C").glob("*.png"))[0]
        for photo in sorted((vgg / "set_A").glob("*.png")):
            sources.append(("vggface2-n000050", photo, reference, 0.5))
    entries = []
    for i, (identity, photo, reference, fraction) in enumerate(sources):
        face_px, megapixels = FACE_PX[i % len(FACE_PX)], MEGAPIXELS[(i // len(FACE_PX)) % len(MEGAPIXELS)]
        # the largest faces need room: at least 4 MP for 600 px
        megapixels = max(megapixels, 4.0 if face_px >= 400 else 2.0)
        with Image.open(photo) as face:
            image, box = _render(face, fraction, face_px, megapixels, SCENES[i % len(SCENES)], rng)
        name = f"photos/{i:03d}-{identity}-{Path(photo).stem}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        write_bytes_atomic(out / name, buffer.getvalue())
        entries.append(PhotoEntry(name, str(Path(reference).resolve()), identity, str(Path(photo).resolve()),
                                  round(image.width * image.height / 1e6, 2), face_px, box))
    write_text_atomic(out / "manifest.json", json.dumps({"seed": seed, "jpeg_quality": jpeg_quality,
                                                          "photos": [asdict(e) for e in entries]}, indent=1) + "\n")
    log.info("photo-scale set: %d photos in %s", len(entries), out)
    return entries


def load_manifest(set_dir: Path) -> list[PhotoEntry]:
    data = json.loads((Path(set_dir) / "manifest.json").read_text())
    return [PhotoEntry(**{**e, "face_box": tuple(e["face_box"])}) for e in data["photos"]]


@dataclass
class PhotoScaleConfig:
    """One photo-scale evaluation: ``method`` (``name`` or ``name@strength``) protects every photo once per held-out
    judge (surrogates = the pool minus that judge); outputs are judged as written (JPEG q 95 by default)."""

    method: str = "cloak@mid"
    judges: tuple[str, ...] = ()
    surrogates: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    limit: int | None = None
    jpeg_quality: int = 95


def evaluate_photo_set(set_dir: Path, config: PhotoScaleConfig, work_dir: Path, progress: bool = True) -> dict:
    """Protect and judge the photo-scale set; returns a JSON-ready dict (per judge: PSR through both pipelines,
    per photo: similarities, face-region SSIM/PSNR, seconds)."""
    from tqdm import tqdm

    from faceshield.eval.calibration import shipped_table
    from faceshield.eval.judge import IndependentJudge
    from faceshield.eval.quality import psnr, ssim
    from faceshield.faces.detect import best_face_landmarks, create_detector
    from faceshield.images import load_image, to_tensor
    from faceshield.methods.base import create_method
    from faceshield.models.ensemble import FREnsemble
    from faceshield.protect import Protector

    entries = load_manifest(set_dir)[: config.limit]
    table = shipped_table()
    judges = list(config.judges) or table.strong_models()
    detector = create_detector()
    same = FREnsemble(judges)
    independent = IndependentJudge(judges)
    name, _, strength = config.method.partition("@")

    def same_embed(rgb: np.ndarray) -> dict | None:
        landmarks = best_face_landmarks(rgb, detector)
        return None if landmarks is None else {k: v[0] for k, v in same.embed(to_tensor(rgb), landmarks).items()}

    references = {}
    for e in entries:
        if e.reference not in references:
            rgb = load_image(e.reference).rgb
            references[e.reference] = (same_embed(rgb), independent.embed(rgb))
    results: dict = {"config": {**asdict(config), "set_dir": str(set_dir)}, "judges": {}, "photos": []}
    for j in judges:
        surrogates = tuple(m for m in (config.surrogates or table.surrogate_models()) if m != j)
        method = create_method(name, preset=strength or None, surrogates=surrogates, **config.settings)
        protector = Protector(method, detector, jpeg_quality=config.jpeg_quality)
        out_dir = Path(work_dir) / f"heldout-{j}"
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for e in tqdm(entries, desc=f"{config.method}, judge {j}", disable=not progress):
            photo = Path(set_dir) / e.photo
            out = out_dir / Path(e.photo).name
            done = out.with_name(out.name + ".json")  # written last: a rerun resumes after the last photo done
            if done.is_file():
                outcome = json.loads(done.read_text())
            else:
                start = time.perf_counter()
                record = protector.protect_files([(photo, out)])[0]
                outcome = {"status": record.status, "seconds": round(time.perf_counter() - start, 2),
                           "error": record.error or record.note}
                write_text_atomic(done, json.dumps(outcome) + "\n")
            ref_same, ref_ind = references[e.reference]
            row = {"photo": e.photo, "judge": j, "status": outcome["status"], "seconds": outcome["seconds"],
                   "megapixels": e.megapixels, "face_px": e.face_px}
            if outcome["status"] in ("protected", "weak"):
                original, protected = load_image(photo).rgb, load_image(out).rgb
                # None: that pipeline's detector finds no face (nothing to match); no key: no reference face
                for kind, rgb in (("before", original), ("after", protected)):
                    if ref_same is not None:
                        emb = same_embed(rgb)
                        row[f"same_{kind}"] = None if emb is None else float(emb[j] @ ref_same[j])
                    if ref_ind is not None:
                        sims = independent.similarity(rgb, ref_ind, models=[j])
                        row[f"independent_{kind}"] = None if sims is None else sims[j]
                x0, y0, x1, y1 = e.face_box
                a = to_tensor(original[y0:y1, x0:x1])
                b = to_tensor(protected[y0:y1, x0:x1])
                row["face_psnr"] = float(psnr(b, a))
                row["face_ssim"] = float(ssim(b, a))
                row["photo_psnr"] = float(psnr(to_tensor(protected), to_tensor(original)))
            else:
                row["error"] = outcome["error"]
            rows.append(row)
        results["photos"] += rows
        t_same, t_ind = table.models[j].threshold(1e-2), independent.thresholds.get(j)

        def psr(key: str, threshold: float | None) -> float | None:
            judged = [r[key] for r in rows if key in r]
            if threshold is None or not judged:
                return None
            return float(np.mean([v is None or v <= threshold for v in judged]))

        results["judges"][j] = {
            "thresholds": {"same": t_same, "independent": t_ind},
            "dodging": {"same": psr("same_after", t_same), "independent": psr("independent_after", t_ind)},
            "floor": {"same": psr("same_before", t_same), "independent": psr("independent_before", t_ind)},
            "no_face_after": {k: sum(k + "_after" in r and r[k + "_after"] is None for r in rows)
                              for k in ("same", "independent")},
            "failed": sum(r["status"] not in ("protected", "weak") for r in rows),
            "face_ssim": float(np.mean([r["face_ssim"] for r in rows if "face_ssim" in r] or [np.nan])),
            "face_psnr": float(np.mean([r["face_psnr"] for r in rows if "face_psnr" in r] or [np.nan])),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
        }
    return results


def markdown(result: dict) -> str:
    """The per-judge table of :func:`evaluate_photo_set` as markdown."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f} %"

    lines = ["| held-out judge | floor (same / indep.) | dodging PSR same pipeline | dodging PSR independent | "
             "face SSIM | face PSNR dB | s per photo |", "|---|---|---|---|---|---|---|"]
    for j, r in result["judges"].items():
        lines.append(f"| {j} | {pct(r['floor']['same'])} / {pct(r['floor']['independent'])} | "
                     f"{pct(r['dodging']['same'])} | {pct(r['dodging']['independent'])} | {r['face_ssim']:.3f} | "
                     f"{r['face_psnr']:.1f} | {r['seconds']:.1f} |")
    if len(result["judges"]) > 1:
        def summary(kind: str) -> str:
            values = [r["dodging"][kind] for r in result["judges"].values() if r["dodging"][kind] is not None]
            return f"{pct(float(np.mean(values)))} (min {pct(min(values))})" if values else "—"

        lines.append(f"| **mean** | | **{summary('same')}** | **{summary('independent')}** | | | |")
    return "\n".join(lines) + "\n"
