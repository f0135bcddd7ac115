"""Face verification of two photos with the calibrated FR zoo: the check a user runs after protecting a photo."""

from __future__ import annotations

from pathlib import Path

import torch

from faceshield.errors import FaceshieldError, NoFaceError
from faceshield.eval.calibration import far_key, shipped_table
from faceshield.faces.detect import best_face_landmarks, create_detector
from faceshield.images import load_image, to_tensor
from faceshield.models.ensemble import FREnsemble
from faceshield.models.registry import list_fr_models


def usable_fr_models() -> list[str]:
    """Every zoo model, less the research-only ones unless the user opted in (FACESHIELD_ALLOW_RESEARCH_MODELS=1)."""
    from faceshield.models.registry import research_models_allowed
    from faceshield.models.registry import get_fr_config

    allowed = research_models_allowed()
    return [n for n in list_fr_models() if allowed or not get_fr_config(n).extra.get("research_only")]


def resolve_models(spec: str) -> list[str]:
    """'default' → calibrated models that are not weak; 'all' → every zoo model; else a comma-separated list."""
    if spec == "default":
        return shipped_table().strong_models()
    if spec == "all":
        return usable_fr_models()
    names = [m.strip() for m in spec.split(",") if m.strip()]
    by_path = sorted(set(names) & (set(list_fr_models(by_path=True)) - set(list_fr_models())))
    if by_path:
        raise FaceshieldError(f"{', '.join(by_path)}: weights supplied by path are uncalibrated (no threshold), so "
                              f"they cannot give a verdict; choose from: {', '.join(list_fr_models())}")
    unknown = sorted(set(names) - set(list_fr_models()))
    if unknown:
        raise FaceshieldError(f"unknown FR model(s) {', '.join(unknown)}; choose from: {', '.join(list_fr_models())}")
    return names


def embed_best_face(path: Path, ensemble: FREnsemble, detector) -> dict[str, torch.Tensor]:
    """Embeddings ``{model: D}`` of the most confident face in the photo at ``path``."""
    photo = load_image(path)
    landmarks = best_face_landmarks(photo.rgb, detector)
    if landmarks is None:
        raise NoFaceError(f"{path}: no face found; use a photo where the face is visible and at least 20 px wide")
    return {k: v[0] for k, v in ensemble.embed(to_tensor(photo.rgb), landmarks).items()}


def verify_photos(image1: Path, image2: Path, models: str = "default", far: float = 1e-2,
                  detector: str = "retinaface", pipeline: str = "faceshield") -> dict:
    """Per-model cosine similarity, threshold and same/different verdict, and the majority verdict.

    ``pipeline="independent"``: faces found and aligned by the independent judging pipeline
    (:mod:`faceshield.eval.judge`: MTCNN, OpenCV bicubic warp), with that pipeline's thresholds — how a face
    recognition system outside faceshield would compare the photos.
    """
    if pipeline == "independent":
        from faceshield.eval.judge import IndependentJudge, judge_table

        table = judge_table()
        names = table.strong_models() if models == "default" else resolve_models(models)
    else:
        table = shipped_table()
        names = resolve_models(models)
    uncalibrated = [n for n in names if n not in table.models]
    if uncalibrated:
        raise FaceshieldError(f"no calibration for {', '.join(uncalibrated)} through the {pipeline} pipeline; run "
                              f"`faceshield calibrate` first")
    if pipeline == "independent":
        judge = IndependentJudge(names)
        embeddings = []
        for path in (image1, image2):
            emb = judge.embed(load_image(path).rgb)
            if emb is None:
                raise NoFaceError(f"{path}: the independent pipeline finds no face; use a photo where the face is "
                                  f"visible and at least 20 px wide")
            embeddings.append(emb)
        a, b = embeddings
    else:
        ensemble = FREnsemble(names)
        det = create_detector(detector)
        a, b = embed_best_face(Path(image1), ensemble, det), embed_best_face(Path(image2), ensemble, det)
    cosines = {name: float(a[name] @ b[name]) for name in names}
    return {"image1": str(image1), "image2": str(image2), "pipeline": pipeline, **judge_pair(cosines, table, far)}


def judge_pair(cosines: dict[str, float], table, far: float = 1e-2) -> dict:
    """Per-model verdicts for one pair's cosine similarities, and the majority verdict.

    The overall verdict is "same person" when more than half of the models say so.
    """
    per_model = {}
    for name, cosine in cosines.items():
        threshold = table.models[name].threshold(far)
        per_model[name] = {"cosine": round(cosine, 4), "threshold": round(threshold, 4), "same": cosine > threshold}
    votes = sum(r["same"] for r in per_model.values())
    return {
        "far": far_key(far), "models": per_model, "votes_same": votes,
        "verdict": "same person" if votes * 2 > len(per_model) else "different",
    }
