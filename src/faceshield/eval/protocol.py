"""The standard FR-protection evaluation protocol (METHODS.md), on any folder of identity pairs.

Leave-one-out black box: each calibrated judge model J is held out in turn; the method attacks the other
models (the surrogates) and success is measured on J alone.

- Dodging: protect ``train/N``; success at FAR f when cos_J(protected, ``test/N``) ≤ t_J(f).
- Impersonation: protect ``train/N`` toward ``targets/target/X`` (the only target photo the method sees);
  success when cos_J(protected, ``targets/test/Y``) > t_J(f), Y the other photo of the same target person.
- The floor: the same test on the unprotected photos.
- Image quality on the whole photo: PSNR, SSIM (protected vs original), BRISQUE (of the protected photo).
- Robustness: dodging success after JPEG q = 75, a ×0.5 resize and back, and a Gaussian blur σ = 1 applied to
  the protected photo (real encoders: Pillow's libjpeg and resampling).
- Seconds per photo (wall clock of ``protect``).
- Expression success rate, for methods that edit the expression (``map``: ``method.expression_success``): share of
  dodging outputs whose ``emotion`` top-1 is the method's expression (``quality["expression_success"]``).
- Independent judging (on by default): every judged photo is also judged through
  :class:`faceshield.eval.judge.IndependentJudge` — MTCNN landmarks and an OpenCV bicubic warp, never the
  protection's RetinaFace and differentiable alignment — with that pipeline's own thresholds; reported beside the
  same-pipeline numbers. A protected face the judge's detector cannot find counts as dodged (that FR system matches
  nothing) and as not impersonated; how often that happens is reported (``no_face``).

Protected photos are quantised to 8 bits (as when saved losslessly) before any measurement.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from faceshield.errors import FaceshieldError
from faceshield.eval.calibration import far_key, pair_ids, shipped_table
from faceshield.eval.judge import IndependentJudge, judge_table
from faceshield.eval.quality import brisque, psnr, ssim
from faceshield.faces.detect import best_face_landmarks, create_detector
from faceshield.fileio import write_text_atomic
from faceshield.images import load_image, save_image, to_tensor, to_uint8
from faceshield.methods.base import create_method, get_method_class, method_config
from faceshield.models.ensemble import FREnsemble

log = logging.getLogger(__name__)

ROBUSTNESS = ("jpeg75", "resize0.5", "blur1")


@dataclass
class EvalConfig:
    """One evaluation run.

    Attributes:
        methods: method specs, ``name`` or ``name@strength`` (cloak presets) — e.g. ``("cloak@mid", "pgd")``.
        pairs_dir: folder with ``train/N`` and ``test/N`` photos of the same person N.
        targets_dir: folder with ``target/``, ``test/`` and ``pairs.csv`` (impersonation); None to skip.
        n_pairs: dodging pairs (first n by sorted id).
        n_per_target: impersonation sources per target (the first n pairs' ``train/N``).
        judges: held-out judge models; empty = the calibrated strong models.
        surrogates: the pool attacked (minus the judge each time); empty = every calibrated model with
            AUC ≥ 0.9.
        fars: false-accept rates of the thresholds.
        robustness: also measure dodging after JPEG / resize / blur.
        settings: extra method settings, applied to every method that has them.
        independent: also judge through the independent pipeline (:mod:`faceshield.eval.judge`).
        cache_dir: keep every protected photo there (PNG, with its protection time) and reuse it on a rerun with
            the same method, resolved config (defaults, preset, settings), surrogate pool, judge and photo (one
            subfolder per method spec and digest of those), so a long run resumes where it stopped; None = keep
            nothing. A change to the method's code that keeps its config needs a fresh folder.
    """

    methods: tuple[str, ...] = ("cloak@mid",)
    pairs_dir: Path = Path("../shared/data/celebahq-pairs")
    targets_dir: Path | None = Path("../shared/data/targets")
    n_pairs: int = 100
    n_per_target: int = 25
    judges: tuple[str, ...] = ()
    surrogates: tuple[str, ...] = ()
    fars: tuple[float, ...] = (1e-2, 1e-3)
    robustness: bool = True
    settings: dict = field(default_factory=dict)
    independent: bool = True
    cache_dir: Path | None = None


def _cache_folder(config: EvalConfig, spec: str) -> Path | None:
    """``cache_dir/<spec>-<digest of the method's whole config (defaults, preset, settings) and the pool>``, or None.

    The whole resolved config, not only the settings given: a changed default is another method."""
    if config.cache_dir is None:
        return None
    name, preset, overrides = _method_settings(spec, config.settings)
    resolved = asdict(method_config(name, preset, **overrides))
    key = json.dumps([spec, resolved, config.surrogates], sort_keys=True, default=str)
    return Path(config.cache_dir) / f"{spec.replace('@', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _cached_protect(cache: Path | None, key: str, protect) -> tuple[np.ndarray, float]:
    """``protect()`` quantised to uint8, and its seconds; read from / written to ``cache/key.png`` when cached."""
    png, timing = (None, None) if cache is None else (cache / f"{key}.png", cache / f"{key}.seconds")
    if png is not None and png.is_file() and timing.is_file():
        return load_image(png).rgb, float(timing.read_text())
    start = time.perf_counter()
    out = to_uint8(protect().image)
    seconds = time.perf_counter() - start
    if png is not None:
        save_image(png, out)
        write_text_atomic(timing, f"{seconds!r}\n")
    return out, seconds


def degrade(rgb: np.ndarray, kind: str) -> np.ndarray:
    """The robustness transforms, with real encoders: ``jpeg75``, ``resize0.5``, ``blur1``."""
    img = Image.fromarray(rgb)
    if kind == "jpeg75":
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=75)
        return np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    if kind == "resize0.5":
        w, h = img.size
        small = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR)
        return np.array(small.resize((w, h), Image.Resampling.BILINEAR))
    if kind == "blur1":
        return np.array(img.filter(ImageFilter.GaussianBlur(radius=1)))
    raise ValueError(f"unknown degradation {kind!r}")


@dataclass
class _Photo:
    key: str
    rgb: np.ndarray
    landmarks: torch.Tensor


def _load_face(path: Path, detector) -> _Photo | None:
    photo = load_image(path)
    landmarks = best_face_landmarks(photo.rgb, detector)
    if landmarks is None:
        log.warning("%s: no face found, left out of the evaluation", path)
        return None
    return _Photo(str(path), photo.rgb, landmarks)


def _embed(ensemble: FREnsemble, rgb: np.ndarray, landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[0] for k, v in ensemble.embed(to_tensor(rgb), landmarks).items()}


def _method_settings(spec: str, settings: dict) -> tuple[str, str | None, dict]:
    """``name@strength`` → (name, preset or None, the settings that method has)."""
    name, _, strength = spec.partition("@")
    known = {f.name for f in fields(get_method_class(name).Config)}
    return name, strength or None, {k: v for k, v in settings.items() if k in known}


def _build(spec: str, surrogates: tuple[str, ...], settings: dict):
    name, preset, overrides = _method_settings(spec, settings)
    return create_method(name, preset=preset, surrogates=surrogates, **overrides)


def evaluate(config: EvalConfig, progress: bool = True, keep_examples: int = 4) -> dict:
    """Run the protocol; returns a JSON-ready dict (see :mod:`faceshield.eval.report` for the HTML)."""
    from tqdm import tqdm

    table = shipped_table()
    judges = list(config.judges) or table.strong_models()
    if len(judges) < 2:
        raise FaceshieldError("leave-one-out needs at least 2 judge models")
    thresholds = {j: {far_key(f): table.models[j].threshold(f) for f in config.fars} for j in judges}
    detector = create_detector()
    judge_models = FREnsemble(judges)
    independent, ind_thresholds = None, {}
    if config.independent:
        calibrated = judge_table().models
        independent = IndependentJudge([j for j in judges if j in calibrated])
        ind_thresholds = {j: {far_key(f): calibrated[j].threshold(f) for f in config.fars} for j in independent.models}
        if set(judges) - set(independent.models):
            log.warning("not judged independently (no threshold through that pipeline): %s",
                        ", ".join(sorted(set(judges) - set(independent.models))))

    ids = pair_ids(Path(config.pairs_dir))[: max(config.n_pairs, config.n_per_target)]
    sources, references, ind_references = {}, {}, {}
    for pid in tqdm(ids, desc="loading pairs", disable=not progress):
        src = _load_face(next((Path(config.pairs_dir) / "train").glob(f"{pid}.*")), detector)
        ref = _load_face(next((Path(config.pairs_dir) / "test").glob(f"{pid}.*")), detector)
        if src and ref:
            sources[pid] = src
            references[pid] = _embed(judge_models, ref.rgb, ref.landmarks)
            if independent is not None:
                ind_references[pid] = independent.embed(ref.rgb)  # None: the judge finds no face there
    dodge_ids = [p for p in ids[: config.n_pairs] if p in sources]
    imp_ids = [p for p in ids[: config.n_per_target] if p in sources]

    targets = []
    if config.targets_dir is not None and config.n_per_target > 0:
        with open(Path(config.targets_dir) / "pairs.csv", newline="") as f:
            for row in csv.DictReader(f):
                tgt = _load_face(Path(config.targets_dir) / row["target"], detector)
                test = _load_face(Path(config.targets_dir) / row["test"], detector)
                if tgt and test:
                    ind_ref = independent.embed(test.rgb) if independent is not None else None
                    targets.append((row["target"], tgt, _embed(judge_models, test.rgb, test.landmarks), ind_ref))

    def success(sims: list[float], judge: str, far: str, impersonation: bool) -> float:
        t = thresholds[judge][far]
        arr = np.array(sims)
        return float((arr > t).mean() if impersonation else (arr <= t).mean())

    single = {j: FREnsemble([judge_models.models[j]]) for j in judges}

    def judge_similarity(j: str, rgb: np.ndarray, landmarks: torch.Tensor, reference: torch.Tensor) -> float:
        return float(_embed(single[j], rgb, landmarks)[j] @ reference)

    def independent_similarity(j: str, rgb: np.ndarray, reference: dict | None) -> float | None | str:
        """Cosine through the independent pipeline; None: its detector finds no face; "skip": no reference."""
        if reference is None:
            return "skip"
        sims = independent.similarity(rgb, reference, models=[j])
        return None if sims is None else sims[j]

    def independent_success(values: list, judge: str, far: str, impersonation: bool) -> float | None:
        values = [v for v in values if v != "skip"]
        t = ind_thresholds[judge][far]
        if impersonation:
            hits = [v is not None and v > t for v in values]
        else:
            hits = [v is None or v <= t for v in values]  # a face no detector finds is matched by nothing
        return float(np.mean(hits)) if hits else None

    def independent_entry(values: list, judge: str, impersonation: bool) -> dict:
        found = [v for v in values if v not in ("skip", None)]
        return {"impersonation" if impersonation else "dodging":
                {far: independent_success(values, judge, far, impersonation) for far in ind_thresholds[judge]},
                "no_face": sum(v is None for v in values), "judged": sum(v != "skip" for v in values),
                "mean_similarity": float(np.mean(found)) if found else None}

    # The floor: unprotected photos.
    floor = {"dodging": {}, "impersonation": {}, "independent": {}}
    for j in judges:
        sims = [judge_similarity(j, sources[p].rgb, sources[p].landmarks, references[p][j]) for p in dodge_ids]
        floor["dodging"][j] = {far: success(sims, j, far, False) for far in thresholds[j]}
        sims = [judge_similarity(j, sources[p].rgb, sources[p].landmarks, t_ref[j]) for _, _, t_ref, _ in targets
                for p in imp_ids]
        if sims:
            floor["impersonation"][j] = {far: success(sims, j, far, True) for far in thresholds[j]}
        if j in ind_thresholds:
            values = [independent_similarity(j, sources[p].rgb, ind_references[p]) for p in dodge_ids]
            floor["independent"][j] = independent_entry(values, j, False)

    results = {}
    examples = []
    for spec in config.methods:
        cache = _cache_folder(config, spec)
        per_judge = {}
        quality = {"psnr": [], "ssim": [], "brisque": [], "seconds": []}
        for j in judges:
            surrogates = tuple(m for m in (config.surrogates or table.surrogate_models()) if m != j)
            method = _build(spec, surrogates, config.settings)
            dodge = {"sims": [], "independent": [], **{k: [] for k in ROBUSTNESS}}
            for p in tqdm(dodge_ids, desc=f"{spec} dodging, judge {j}", disable=not progress):
                src = sources[p]
                image = to_tensor(src.rgb)
                out, seconds = _cached_protect(cache and cache / j, f"dodge-{p}",
                                               lambda: method.protect(image, src.landmarks))
                quality["seconds"].append(seconds)
                protected = to_tensor(out)
                quality["psnr"].append(float(psnr(protected, image)))
                quality["ssim"].append(float(ssim(protected, image)))
                quality["brisque"].append(float(brisque(out)))
                if hasattr(method, "expression_success"):  # expression-editing methods (map): emotion top-1 rate
                    quality.setdefault("expression_success", []).append(float(method.expression_success(
                        out, src.landmarks)))
                sim = judge_similarity(j, out, src.landmarks, references[p][j])
                dodge["sims"].append(sim)
                if j in ind_thresholds:
                    dodge["independent"].append(independent_similarity(j, out, ind_references[p]))
                if config.robustness:
                    for kind in ROBUSTNESS:
                        dodge[kind].append(judge_similarity(j, degrade(out, kind), src.landmarks, references[p][j]))
                if len(examples) < keep_examples and j == judges[0]:
                    before = judge_similarity(j, src.rgb, src.landmarks, references[p][j])
                    examples.append({"method": spec, "judge": j, "pair": p, "original": src.rgb, "protected": out,
                                     "landmarks": src.landmarks, "before": before, "after": sim})
            entry = {"dodging": {far: success(dodge["sims"], j, far, False) for far in thresholds[j]},
                     "dodging_mean_similarity": float(np.mean(dodge["sims"])) if dodge["sims"] else None}
            if config.robustness:
                entry["robustness"] = {k: {far: success(dodge[k], j, far, False) for far in thresholds[j]}
                                       for k in ROBUSTNESS}
            if j in ind_thresholds:
                entry["independent"] = independent_entry(dodge["independent"], j, False)
            if targets and imp_ids:
                per_target, ind_per_target = {}, {}
                for name, tgt, t_ref, ind_ref in targets:
                    target_emb = {k: v[None] for k, v in _embed(method.ensemble, tgt.rgb, tgt.landmarks).items()}
                    sims, ind_values = [], []
                    for p in tqdm(imp_ids, desc=f"{spec} impersonating {name}, judge {j}", disable=not progress):
                        src = sources[p]
                        out, _ = _cached_protect(
                            cache and cache / j, f"impersonate-{Path(name).stem}-{p}",
                            lambda: method.protect(to_tensor(src.rgb), src.landmarks, target_emb))
                        sims.append(judge_similarity(j, out, src.landmarks, t_ref[j]))
                        if j in ind_thresholds:
                            ind_values.append(independent_similarity(j, out, ind_ref))
                    per_target[name] = {far: success(sims, j, far, True) for far in thresholds[j]}
                    if j in ind_thresholds:
                        ind_per_target[name] = independent_entry(ind_values, j, True)
                entry["impersonation"] = per_target
                if ind_per_target:
                    entry["independent_impersonation"] = ind_per_target
            per_judge[j] = entry
        results[spec] = {
            "judges": per_judge,
            "quality": {k: (float(np.mean(v)) if v else None) for k, v in quality.items()},
            "quality_min": {k: (float(np.min(v)) if v else None) for k in ("psnr", "ssim") for v in [quality[k]]},
        }
    return {
        "config": {**asdict(config), "pairs_dir": str(config.pairs_dir),
                   "cache_dir": str(config.cache_dir) if config.cache_dir else None,
                   "targets_dir": str(config.targets_dir) if config.targets_dir else None},
        "judges": judges,
        "thresholds": thresholds,
        "independent": None if independent is None else {"pipeline": independent.name, "thresholds": ind_thresholds},
        "n_dodging": len(dodge_ids),
        "n_impersonation_per_target": len(imp_ids),
        "targets": [name for name, *_ in targets],
        "floor": floor,
        "methods": results,
        "examples": examples,  # arrays: the report embeds them, the JSON writer drops them
    }
