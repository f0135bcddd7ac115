"""``faceshield evaluate-anonymization``: how well Diff-Privacy anonymizes, hides and recovers, per photo and overall.

Anonymization (per photo, every variant of its largest face):
- **PSR** per FR model of the zoo (the energy's models and every calibrated one): share of variants whose cosine to
  the original face is at or below the model's threshold at FAR 1e-2 (our RetinaFace + differentiable alignment), and
  the same through the independent judge (MTCNN + OpenCV alignment, its own thresholds; a variant in which the judge
  finds no face counts as anonymized and is reported as such);
- **diversity**: 1 − mean cosine between variants (first zoo model), over all variant pairs;
- **background PSNR**: PSNR over the pixels where the paste mask is 0 (identical: reported as 100 dB);
- **expression agreement**: whether the ``emotion`` model's top class is the original's, and the L1 distance of the
  7 probabilities;
- **head-pose difference**: the rotation angle (degrees) between the face meshes of original and variant
  (Kabsch fit of the 468 centred, scale-normalised 3-D points).
Hiding: FR match rate hidden vs original (cosine above threshold: should stay high), recovery PSNR/SSIM of the
whole photo and FR cosine recovered vs original. Seconds per stage.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from faceshield.eval.quality import psnr, ssim
from faceshield.faces.align import crop_transform, warp_to_crop
from faceshield.fileio import write_text_atomic

log = logging.getLogger(__name__)

FAR = 1e-2
MAX_PSNR = 100.0  # identical pixels (PSNR ∞) are reported as 100 dB, so that report.json stays standard JSON


def kabsch_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Rotation angle in degrees of the best rotation taking point set ``a`` (N×3) onto ``b`` (centred, scaled)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1, 1, d]) @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))


class HumanAux:
    """The ``emotion`` model and the face mesh on faces of a photo, aligned to Human's own crop."""

    def __init__(self, device: str = "cpu"):
        from faceshield.models.fr.human import HUMAN_FACE_224
        from faceshield.models.human_aux import EmotionClassifier, FaceMesh

        self.emotion = EmotionClassifier().to(device)
        self.mesh = FaceMesh().to(device)
        self.template = torch.tensor(HUMAN_FACE_224)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, landmarks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(7 expression probabilities, 468×3 mesh)`` of the face with ``landmarks`` (5×2) in ``image``."""
        matrix = crop_transform(landmarks[None].to(image), self.template.to(image))
        crop = warp_to_crop(image, matrix, 224, padding_mode="border", antialias=True)
        probs = self.emotion(crop)[0].cpu().numpy()
        mesh_in = warp_to_crop(image, matrix * (192 / 224), 192, padding_mode="border", antialias=True)
        return probs, self.mesh(mesh_in).landmarks[0].cpu().numpy()


def _png(rgb: np.ndarray, size: int = 192) -> str:
    from PIL import Image

    img = Image.fromarray(rgb)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def evaluate(photos: Sequence[Path], config, judge_models: Sequence[str] = (), hide: bool = True,
             method=None, judge=None, aux: HumanAux | None = None) -> dict:
    """Run anonymization (and hiding + recovery) on each photo and measure it; returns the report's data.

    Args:
        photos: photo paths (each: its largest face is measured; every face is processed).
        config: a :class:`~faceshield.methods.diff_privacy.DiffPrivacyConfig`.
        method, judge, aux: already built ones (tests); default built from ``config``.
    """
    from faceshield.eval.calibration import shipped_table
    from faceshield.eval.judge import IndependentJudge
    from faceshield.faces.detect import create_detector, detect_faces, landmark_tensor
    from faceshield.faces.masks import face_mask_from_landmarks
    from faceshield.images import load_image, to_tensor, to_uint8
    from faceshield.methods.diff_privacy import DiffPrivacy

    method = method or DiffPrivacy(config)
    cfg = method.config
    judge = judge or IndependentJudge(judge_models, device=cfg.device)
    aux = aux or HumanAux(cfg.device)
    detector = create_detector("retinaface")
    table = shipped_table()
    zoo = method.ensemble
    thresholds = {n: table.models[n].threshold(FAR) if n in table.models else None for n in zoo.names}
    rows = []
    for photo in photos:
        loaded = load_image(photo)
        image = to_tensor(loaded.rgb, method.model.device)
        faces = detect_faces(loaded.rgb, detector)
        if not faces:
            rows.append({"photo": str(photo), "error": "no face found"})
            continue
        landmarks = landmark_tensor(faces).float().to(image.device)
        main = int(torch.argmax(torch.tensor([f.score for f in faces])))
        lm = landmarks[main : main + 1]
        original = zoo.embed(image, lm)
        judge_reference = judge.embed(loaded.rgb)
        probs0, mesh0 = aux(image, lm[0])
        row: dict = {"photo": str(photo), "faces": len(faces)}
        start = time.perf_counter()
        variants, info = method.anonymize(image, landmarks)
        row["seconds"] = {"msi": info["seconds_msi"], "anonymize": info["seconds_anonymize"],
                          "total_anonymize": time.perf_counter() - start}
        outs = [to_uint8(v.cpu()) for v in variants]
        written = [to_tensor(o, image.device) for o in outs]  # measured as the 8-bit file would be
        emb = [zoo.embed(w, lm) for w in written]
        row["similarity"] = {n: [float((e[n] * original[n]).sum()) for e in emb] for n in zoo.names}
        row["psr"] = {n: _mean([float(s <= thresholds[n]) for s in sims]) if thresholds[n] is not None else None
                      for n, sims in row["similarity"].items()}
        if judge_reference is not None:
            judged = [judge.similarity(o, judge_reference) for o in outs]
            row["judge_similarity"] = {m: [None if j is None else j[m] for j in judged] for m in judge.models}
            row["judge_psr"] = {m: _mean([1.0 if j is None else float(j[m] <= judge.thresholds[m]) for j in judged])
                                for m in judge.models if m in judge.thresholds}
            row["judge_no_face"] = sum(j is None for j in judged)
        first = zoo.names[0]
        pairs = [float((emb[i][first] * emb[j][first]).sum()) for i in range(len(emb)) for j in range(i + 1, len(emb))]
        row["diversity"] = 1 - _mean(pairs) if pairs else None
        mask = face_mask_from_landmarks(landmarks, tuple(image.shape[-2:]), scale=cfg.mask_scale, softness=0.25)
        outside = (mask.amax(0, keepdim=True) == 0).expand_as(image)
        row["background_psnr"] = _mean([min(MAX_PSNR, float(psnr(w[outside].view(1, 1, 1, -1),
                                                                  image[outside].view(1, 1, 1, -1)))) for w in written])
        expressions = [aux(w, lm[0]) for w in written]
        row["expression_agreement"] = _mean([float(np.argmax(p) == np.argmax(probs0)) for p, _ in expressions])
        row["expression_l1"] = _mean([float(np.abs(p - probs0).sum()) for p, _ in expressions])
        row["pose_difference_deg"] = _mean([kabsch_angle(mesh0, m) for _, m in expressions])
        row["grid"] = [_png(loaded.rgb)] + [_png(o) for o in outs]
        if hide:
            row.update(_hide_and_recover(method, loaded.rgb, image, landmarks, lm, zoo, original, thresholds))
        rows.append(row)
    return {"config": {k: str(v) for k, v in vars(cfg).items()}, "fr_thresholds": thresholds,
            "judge": {"models": judge.models, "thresholds": judge.thresholds, "pipeline": judge.name},
            "photos": rows, "summary": _summary(rows)}


def _hide_and_recover(method, rgb, image, landmarks, lm, zoo, original, thresholds) -> dict:
    """Hide the photo, encrypt and decrypt its key (as the files would be), recover; measure both."""
    from faceshield.images import to_tensor, to_uint8
    from faceshield.methods.recovery_key import decrypt_key, encrypt_key

    start = time.perf_counter()
    published, key, info = method.hide(image, landmarks)
    hidden = to_tensor(to_uint8(published.cpu()), image.device)
    blob = encrypt_key(key, "evaluation", log2_n=14)
    seconds_hide = time.perf_counter() - start
    recovered, rinfo = method.recover(hidden, decrypt_key(blob, "evaluation"))
    recovered = to_tensor(to_uint8(recovered.cpu()), image.device)
    h = zoo.embed(hidden, lm)
    r = zoo.embed(recovered, lm)
    hidden_sim = {n: float((h[n] * original[n]).sum()) for n in zoo.names}
    return {
        "hide_similarity": hidden_sim,
        "hide_match": {n: float(s > thresholds[n]) for n, s in hidden_sim.items() if thresholds[n] is not None},
        "hidden_psnr": float(psnr(hidden, image)),
        "recovery_psnr": float(psnr(recovered, image)), "recovery_ssim": float(ssim(recovered, image)),
        "recovery_similarity": {n: float((r[n] * original[n]).sum()) for n in zoo.names},
        "key_bytes": len(blob), "grid_hide": [_png(to_uint8(hidden.cpu())), _png(to_uint8(recovered.cpu()))],
        "seconds_hide": {"msi": info["seconds_msi"], "hide": info["seconds_hide"], "total": seconds_hide,
                         "recover": rinfo["seconds_recover"]},
    }


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    out: dict = {"photos": len(rows), "measured": len(ok)}
    if not ok:
        return out
    for model in ok[0]["psr"]:
        out[f"psr_{model}"] = _mean([r["psr"][model] for r in ok])
    for model in ok[0].get("judge_psr", {}):
        out[f"judge_psr_{model}"] = _mean([r.get("judge_psr", {}).get(model) for r in ok])
    for key in ("diversity", "background_psnr", "expression_agreement", "expression_l1", "pose_difference_deg",
                "hidden_psnr", "recovery_psnr", "recovery_ssim", "key_bytes"):
        if key in ok[0]:
            out[key] = _mean([r[key] for r in ok])
    if "hide_match" in ok[0]:
        out["hide_match_rate"] = _mean([v for r in ok for v in r["hide_match"].values()])
        out["recovery_similarity"] = _mean([v for r in ok for v in r["recovery_similarity"].values()])
    out["seconds_msi"] = _mean([r["seconds"]["msi"] for r in ok])
    out["seconds_anonymize"] = _mean([r["seconds"]["anonymize"] for r in ok])
    if "seconds_hide" in ok[0]:
        out["seconds_hide"] = _mean([r["seconds_hide"]["hide"] for r in ok])
        out["seconds_recover"] = _mean([r["seconds_hide"]["recover"] for r in ok])
    return out


def render_html(result: dict) -> str:
    """A self-contained page: the summary table and, per photo, original | variants (| hidden | recovered)."""
    e = html.escape
    summary = "".join(f"<tr><td>{e(k)}</td><td>{v:.3f}</td></tr>" if isinstance(v, float) else
                      f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in result["summary"].items())
    cards = []
    for row in result["photos"]:
        if "error" in row:
            cards.append(f"<p>{e(row['photo'])}: {e(row['error'])}</p>")
            continue
        labels = ["original"] + [f"variant {i}" for i in range(1, len(row["grid"]))]
        images = [(src, label) for src, label in zip(row["grid"], labels)]
        images += list(zip(row.get("grid_hide", []), ["hidden", "recovered"]))
        figures = "".join(f"<figure><img src='{src}'><figcaption>{e(label)}</figcaption></figure>"
                          for src, label in images)
        sims = ", ".join(f"{e(m)} {', '.join(f'{s:.2f}' for s in v)}" for m, v in row["similarity"].items())
        cards.append(f"<section><h3>{e(Path(row['photo']).name)}</h3><div class='grid'>{figures}</div>"
                     f"<p>cosine to the original per variant: {sims}</p></section>")
    return ("<!doctype html><meta charset='utf-8'><title>faceshield anonymization report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}.grid{display:flex;flex-wrap:wrap;gap:6px}"
            "figure{margin:0;text-align:center}td{padding:2px 8px}</style>"
            "<h1>Diff-Privacy: anonymization, hiding, recovery</h1>"
            f"<table>{summary}</table>{''.join(cards)}")


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` (without the embedded images) and ``report.html`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {**result, "photos": [{k: v for k, v in r.items() if not k.startswith("grid")} for r in result["photos"]]}
    json_path = write_text_atomic(out_dir / "report.json", json.dumps(data, indent=2, default=str))
    html_path = write_text_atomic(out_dir / "report.html", render_html(result))
    return json_path, html_path
