"""Per-model verification thresholds: ROC AUC, cosine thresholds at fixed false-accept rates, TAR.

Genuine pairs are ``train/N`` vs ``test/N`` of a pairs folder (same person); impostor pairs are
``train/N`` vs ``test/M`` for every N ≠ M. The threshold at FAR f is the smallest cosine t such that at most a
fraction f of impostor pairs score strictly above t; "same person" means similarity > t.

The shipped table (``faceshield/data/calibration.json``) is produced by ``faceshield calibrate`` and records
the command, data and detector that made it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

FARS = (1e-2, 1e-3)
WEAK_AUC = 0.95
SURROGATE_AUC = 0.9


@dataclass(frozen=True)
class ModelCalibration:
    """Verification statistics of one FR model on one pairs set."""

    model: str
    auc: float
    thresholds: dict[str, float]  # FAR as text ("0.01") → cosine threshold
    tar: dict[str, float]  # FAR as text → true-accept rate at that threshold
    n_genuine: int
    n_impostor: int
    weak: bool

    def threshold(self, far: float = 1e-2) -> float:
        return self.thresholds[far_key(far)]


def far_key(far: float) -> str:
    return f"{far:g}"


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Probability that a random genuine score exceeds a random impostor score (ties count half)."""
    scores = np.concatenate([genuine, impostor])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_g, n_i = len(genuine), len(impostor)
    return float((ranks[:n_g].sum() - n_g * (n_g + 1) / 2.0) / (n_g * n_i))


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest observed impostor score t with mean(impostor > t) ≤ far."""
    ordered = np.sort(impostor)[::-1]
    allowed = int(np.floor(far * len(ordered)))  # impostors allowed strictly above t
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(ordered[allowed])


def calibrate_scores(model: str, genuine: np.ndarray, impostor: np.ndarray, fars=FARS) -> ModelCalibration:
    thresholds = {far_key(f): threshold_at_far(impostor, f) for f in fars}
    tar = {k: float((genuine > t).mean()) for k, t in thresholds.items()}
    auc = roc_auc(genuine, impostor)
    return ModelCalibration(model, auc, thresholds, tar, len(genuine), len(impostor), weak=auc < WEAK_AUC)


def pair_scores(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor cosine scores from row-aligned L2-normalised embeddings ``N×D`` of train and test."""
    sims = train @ test.T
    genuine = np.diag(sims).copy()
    impostor = sims[~np.eye(len(sims), dtype=bool)]
    return genuine, impostor


@dataclass(frozen=True)
class CalibrationTable:
    models: dict[str, ModelCalibration]
    meta: dict

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "models": {k: asdict(v) for k, v in self.models.items()}}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CalibrationTable":
        from faceshield.models.registry import research_models_allowed

        data = json.loads(text)
        models = {k: ModelCalibration(**v) for k, v in data["models"].items()}
        # Research-only models are calibrated apart ("research_models") and count, in default surrogate and judge
        # lists included, only once the user opted in (FACESHIELD_ALLOW_RESEARCH_MODELS=1).
        if research_models_allowed():
            models.update({k: ModelCalibration(**v) for k, v in data.get("research_models", {}).items()})
        return cls(models, data["meta"])

    def save(self, path: Path) -> None:
        from faceshield.fileio import write_text_atomic

        write_text_atomic(path, self.to_json() + "\n")

    def strong_models(self) -> list[str]:
        """Models that separate identities well (AUC ≥ 0.95): verification and judging."""
        return sorted(name for name, cal in self.models.items() if not cal.weak)

    def surrogate_models(self) -> list[str]:
        """Models worth attacking (AUC ≥ 0.9): weaker than judges but still carrying identity features."""
        return sorted(name for name, cal in self.models.items() if cal.auc >= SURROGATE_AUC)

    def markdown(self) -> str:
        fars = sorted({k for cal in self.models.values() for k in cal.thresholds}, key=float, reverse=True)
        head = "| model | AUC | " + " | ".join(f"thr@FAR {k} | TAR@FAR {k}" for k in fars) + " | weak |"
        rows = [head, "|" + "---|" * (3 + 2 * len(fars))]
        for name in sorted(self.models):
            cal = self.models[name]
            cells = " | ".join(f"{cal.thresholds[k]:.4f} | {cal.tar[k]:.3f}" for k in fars)
            rows.append(f"| {name} | {cal.auc:.4f} | {cells} | {'yes' if cal.weak else 'no'} |")
        return "\n".join(rows)


def shipped_table() -> CalibrationTable:
    """The calibration table shipped with the package."""
    text = resources.files("faceshield").joinpath("data/calibration.json").read_text()
    return CalibrationTable.from_json(text)


def pair_ids(pairs_dir: Path) -> list[str]:
    """Identity ids of a pairs folder (``train/N``), numbers in numeric order (1, 2, …, 10), then the rest."""
    ids = [p.stem for p in (Path(pairs_dir) / "train").iterdir()
           if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    return sorted(ids, key=lambda s: (len(s), s))


Embedder = Callable[[np.ndarray], "dict[str, np.ndarray] | None"]


def face_embedder(ensemble, detector) -> Embedder:
    """``embed(rgb)``: ``{model: D}`` embeddings of the photo's best face through faceshield's own pipeline
    (``detector`` landmarks, differentiable alignment, every model of ``ensemble``), or None without a face."""
    from faceshield.faces.detect import best_face_landmarks
    from faceshield.images import to_tensor

    def embed(rgb: np.ndarray) -> dict[str, np.ndarray] | None:
        landmarks = best_face_landmarks(rgb, detector)
        if landmarks is None:
            return None
        return {name: e[0].numpy() for name, e in ensemble.embed(to_tensor(rgb), landmarks).items()}

    return embed


def embed_pair_set(
    pairs_dir: Path, embed: Embedder, ids: list[str] | None = None, progress: bool = False
) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Embed ``train/N`` and ``test/N`` for every pair id with ``embed`` (e.g. :func:`face_embedder`).

    Returns the ids kept, ``{model: (train N×D, test N×D)}`` and the files where no face was found.
    """
    from tqdm import tqdm

    from faceshield.images import load_image

    pairs_dir = Path(pairs_dir)
    if ids is None:
        ids = pair_ids(pairs_dir)
    kept, missing = [], []
    rows: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for pid in tqdm(ids, desc="pairs", unit="pair", disable=not progress):
        pair = []
        for split in ("train", "test"):
            path = next((pairs_dir / split).glob(f"{pid}.*"))
            embeddings = embed(load_image(path).rgb)
            if embeddings is None:
                missing.append(str(path))
                break
            pair.append(embeddings)
        if len(pair) < 2:
            continue
        kept.append(pid)
        for name in pair[0]:
            train, test = rows.setdefault(name, ([], []))
            train.append(pair[0][name])
            test.append(pair[1][name])
    return kept, {n: (np.stack(train), np.stack(test)) for n, (train, test) in rows.items()}, missing


def calibrate_pair_set(pairs_dir: Path, embed: Embedder, ids: list[str], fars=FARS, progress: bool = False,
                       **meta) -> CalibrationTable:
    """AUC, thresholds and TAR of every model ``embed`` returns, on ``ids`` of a pairs folder; ``meta`` (detector,
    command, pipeline…) is recorded in the table with the data used."""
    from faceshield import __version__
    from faceshield.errors import FaceshieldError

    kept, embeddings, missing = embed_pair_set(pairs_dir, embed, ids, progress)
    if len(kept) < 2:
        raise FaceshieldError(f"{pairs_dir}: faces found in fewer than 2 pairs; is it a train/ + test/ pairs folder?")
    models = {}
    for name, (train, test) in embeddings.items():
        genuine, impostor = pair_scores(train, test)
        models[name] = calibrate_scores(name, genuine, impostor, tuple(fars))
        log.info("%s: AUC %.4f", name, models[name].auc)
    return CalibrationTable(models, {"pairs": Path(pairs_dir).name, "n_pairs": len(kept), "no_face": missing, **meta,
                                     "faceshield": __version__, "weak_if_auc_below": WEAK_AUC})


def run_calibration(
    pairs_dir: Path, model_names: list[str], detector_name: str = "retinaface", limit: int | None = None,
    progress: bool = False, command: str = "",
) -> CalibrationTable:
    """Calibrate ``model_names`` on a pairs folder (``train/N`` vs ``test/N``); ``limit`` takes the first pairs."""
    from faceshield.faces.detect import create_detector
    from faceshield.models.ensemble import FREnsemble

    pairs_dir = Path(pairs_dir)
    ids = sorted(p.stem for p in (pairs_dir / "train").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    ids = ids[:limit] if limit else ids
    embed = face_embedder(FREnsemble(model_names), create_detector(detector_name))
    return calibrate_pair_set(pairs_dir, embed, ids, progress=progress, detector=detector_name, command=command)
