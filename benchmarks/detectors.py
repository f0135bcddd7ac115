"""Face detectors on real photos: detection rate, landmark agreement, speed, and a few scene checks.

Photos (one face each): the 800 CelebA-HQ 256² aligned faces of ``shared/data/celebahq-pairs`` (train + test),
the 8 unaligned 1024² ``targets`` and the 13 VGGFace2 512² photos of ``vggface2-n000050``.

Per detector, through :func:`faceshield.faces.detect.detect_faces` (the path users take):

* detection rate: fraction of photos where exactly one face scores ≥ ``--min-score`` (default 0.9);
* landmark error: mean distance of the 5 landmarks of the best face to the 5 points derived from dlib's
  68-point predictor on dlib-hog's best face, divided by that reference's inter-ocular distance, on photos
  where both found a face (dlib-hog is the reference, so its own error is 0 by construction);
* ms per image on this machine's CPU (torch's default thread count), the detectors interleaved photo by
  photo so that load from other processes hits them alike.

Scene checks: four faces tiled 2×2, scikit-image's ``astronaut()``, blank and noise images (no face), and a
face upscaled ×4 into a 4000×3000 canvas, found through ``max_side`` and compared with the detection on the
unscaled crop, offset.

Usage::

    python benchmarks/detectors.py [--detectors retinaface,mtcnn,dlib-hog] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACESHIELD_MIRROR", str(SHARED / "models"))

from faceshield.faces.detect import create_detector, detect_faces, list_detectors  # noqa: E402

REFERENCE = "dlib-hog"


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def photo_sets(limit: int | None) -> dict[str, list[Path]]:
    data = SHARED / "data"
    sets = {
        "celebahq": sorted((data / "celebahq-pairs").glob("*/*.png"), key=lambda p: (p.parent.name, int(p.stem))),
        "targets": sorted((data / "targets").glob("*/*.jpg")),
        "vggface2": sorted((data / "vggface2-n000050").glob("set_*/*.png"))
        + [data / "vggface2-n000050" / "target.jpg"],
    }
    if limit:
        sets = {k: v[:limit] for k, v in sets.items()}
    return sets


def nme(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean landmark distance divided by the reference's inter-ocular distance."""
    iod = float(np.linalg.norm(ref[0] - ref[1]))
    return float(np.linalg.norm(pred - ref, axis=1).mean() / iod)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def run_photos(detectors: dict, sets: dict[str, list[Path]], min_score: float) -> list[dict]:
    """One record per (photo, detector): face count, best face, time."""
    names = list(detectors)
    records = []
    k = 0
    for dataset, paths in sets.items():
        for path in paths:
            image = load_rgb(path)
            # Rotate the order so that no detector always runs first (cache) or last.
            order = names[k % len(names):] + names[: k % len(names)]
            k += 1
            for name in order:
                t0 = time.perf_counter()
                faces = detect_faces(image, detectors[name], min_score=min_score)
                ms = (time.perf_counter() - t0) * 1e3
                best = faces[0] if faces else None
                records.append({
                    "dataset": dataset, "photo": str(path.relative_to(SHARED / "data")), "detector": name,
                    "faces": len(faces), "ms": ms,
                    "score": best.score if best else None,
                    "box": list(best.box) if best else None,
                    "landmarks": best.landmarks.tolist() if best else None,
                })
            if k % 100 == 0:
                print(f"  {k} photos", file=sys.stderr, flush=True)
    return records


def summarise(records: list[dict], names: list[str]) -> dict:
    by_key = {(r["photo"], r["detector"]): r for r in records}
    photos = sorted({(r["dataset"], r["photo"]) for r in records})
    datasets = ["all"] + sorted({d for d, _ in photos})
    out = {}
    for name in names:
        out[name] = {}
        for dataset in datasets:
            rows = [by_key[(p, name)] for d, p in photos if dataset in ("all", d)]
            errors = []
            if REFERENCE in names and name != REFERENCE:
                for r in rows:
                    ref = by_key[(r["photo"], REFERENCE)]
                    if r["landmarks"] is not None and ref["landmarks"] is not None:
                        errors.append(nme(np.array(r["landmarks"]), np.array(ref["landmarks"])))
            times = [r["ms"] for r in rows]
            out[name][dataset] = {
                "photos": len(rows),
                "exactly_one": sum(r["faces"] == 1 for r in rows),
                "none": sum(r["faces"] == 0 for r in rows),
                "several": sum(r["faces"] > 1 for r in rows),
                "detection_rate": sum(r["faces"] == 1 for r in rows) / max(1, len(rows)),
                "nme_pairs": len(errors),
                "nme_mean": float(np.mean(errors)) if errors else None,
                "nme_median": float(np.median(errors)) if errors else None,
                "nme_p90": float(np.percentile(errors, 90)) if errors else None,
                "nme_over_0.1": int(sum(e > 0.1 for e in errors)),
                "ms_mean": float(np.mean(times)),
                "ms_median": float(np.median(times)),
            }
    # Agreement between every pair of detectors (best faces, normalised by the second one's eye distance).
    pairwise = {}
    for a in names:
        for b in names:
            if a == b:
                continue
            errs = [nme(np.array(by_key[(p, a)]["landmarks"]), np.array(by_key[(p, b)]["landmarks"]))
                    for _, p in photos
                    if by_key[(p, a)]["landmarks"] is not None and by_key[(p, b)]["landmarks"] is not None]
            pairwise[f"{a} vs {b}"] = {"pairs": len(errs), "nme_mean": float(np.mean(errs)) if errs else None,
                                       "nme_median": float(np.median(errs)) if errs else None}
    return {"per_detector": out, "pairwise": pairwise}


def tiled(paths: list[Path], size: int = 256) -> np.ndarray:
    tiles = [np.asarray(Image.fromarray(load_rgb(p)).resize((size, size), Image.BILINEAR)) for p in paths[:4]]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def large_canvas(
    face: np.ndarray, at: tuple[int, int] = (1700, 1100), upscale: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A 4000×3000 grey canvas with ``face`` upscaled ×``upscale`` pasted at ``at`` (x, y); returns (canvas, crop)."""
    h, w = face.shape[:2]
    crop = np.asarray(Image.fromarray(face).resize((w * upscale, h * upscale), Image.BICUBIC))
    canvas = np.full((3000, 4000, 3), 128, dtype=np.uint8)
    x, y = at
    canvas[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    return canvas, crop


def scene_checks(detectors: dict, sets: dict[str, list[Path]], min_score: float) -> dict:
    from skimage.data import astronaut

    celeb = photo_sets(None)["celebahq"]  # all of them, whatever --limit says
    rng = np.random.default_rng(0)
    grids = [tiled(celeb[i:i + 4]) for i in range(0, min(len(celeb), 40), 8)]
    mixed = tiled(celeb[100:104])
    # A harder grid: the four faces at different sizes (256, 128, 96, 64 px) on a 512² grey image.
    multi_scale = np.full((512, 512, 3), 128, dtype=np.uint8)
    for (x, y), size, p in zip([(0, 0), (300, 20), (300, 250), (60, 330)], [256, 128, 96, 64], celeb[200:204]):
        small = Image.fromarray(load_rgb(p)).resize((size, size), Image.BILINEAR)
        multi_scale[y:y + size, x:x + size] = np.asarray(small)
    blank = np.full((480, 640, 3), 200, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    offset = (1700, 1100)
    canvas, crop = large_canvas(load_rgb(celeb[0]), at=offset)
    out = {}
    for name, det in detectors.items():
        res = {
            "grid_2x2_counts": [len(detect_faces(g, det, min_score=min_score)) for g in grids + [mixed]],
            "multi_scale_4_count": len(detect_faces(multi_scale, det, min_score=min_score)),
            "astronaut_count": len(detect_faces(astronaut(), det, min_score=min_score)),
            "blank_count": len(detect_faces(blank, det, min_score=min_score)),
            "noise_count": len(detect_faces(noise, det, min_score=min_score)),
        }
        t0 = time.perf_counter()
        big = detect_faces(canvas, det, max_side=1280, min_score=min_score)
        res["canvas_ms"] = (time.perf_counter() - t0) * 1e3
        ref = detect_faces(crop, det, max_side=2048, min_score=min_score)
        res["canvas_count"] = len(big)
        if big and ref:
            dx, dy = offset
            ref_box = (ref[0].box[0] + dx, ref[0].box[1] + dy, ref[0].box[2] + dx, ref[0].box[3] + dy)
            res["canvas_box_iou_vs_crop"] = box_iou(big[0].box, ref_box)
            res["canvas_nme_vs_crop"] = nme(big[0].landmarks, ref[0].landmarks + np.array([dx, dy]))
        out[name] = res
    return out


def markdown(summary: dict, scenes: dict, min_score: float) -> str:
    lines = [
        f"Detection rate = exactly one face with score ≥ {min_score}; landmark error = mean 5-point distance to "
        f"dlib-68-derived points / inter-ocular distance (median in brackets); ms = mean (median) per photo.",
        "",
        "| detector | dataset | photos | detection rate | none | several | landmark error (pairs) | >0.1 | ms/img |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in summary["per_detector"].items():
        for dataset, s in per.items():
            if s["nme_mean"] is None:
                err = "reference" if name == REFERENCE else "–"
            else:
                err = f"{s['nme_mean']:.3f} ({s['nme_median']:.3f}) [{s['nme_pairs']}]"
            lines.append(
                f"| {name} | {dataset} | {s['photos']} | {s['detection_rate']:.1%} | {s['none']} | {s['several']} | "
                f"{err} | {s['nme_over_0.1'] if s['nme_mean'] is not None else '–'} | "
                f"{s['ms_mean']:.1f} ({s['ms_median']:.1f}) |"
            )
    lines += ["", "| pair | photos | landmark error mean (median) |", "|---|---|---|"]
    for pair, s in summary["pairwise"].items():
        if s["nme_mean"] is not None:
            lines.append(f"| {pair} | {s['pairs']} | {s['nme_mean']:.3f} ({s['nme_median']:.3f}) |")
    lines += [
        "",
        "| detector | 2×2 grids (expect 4) | 4 sizes 256–64 px (expect 4) | astronaut (1) | blank (0) | noise (0) | "
        "4000×3000 canvas: faces, IoU / landmark error vs crop, ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in scenes.items():
        canvas = f"{r['canvas_count']}"
        if "canvas_box_iou_vs_crop" in r:
            canvas += f", {r['canvas_box_iou_vs_crop']:.3f} / {r['canvas_nme_vs_crop']:.3f}"
        canvas += f", {r['canvas_ms']:.0f} ms"
        lines.append(
            f"| {name} | {r['grid_2x2_counts']} | {r['multi_scale_4_count']} | {r['astronaut_count']} | "
            f"{r['blank_count']} | {r['noise_count']} | {canvas} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", default=",".join(list_detectors()), help="comma-separated detector names")
    parser.add_argument("--limit", type=int, default=None, help="at most this many photos per set (quick runs)")
    parser.add_argument("--min-score", type=float, default=0.9)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers (and per-photo records) here")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    detectors = {}
    for name in names:
        try:
            detectors[name] = create_detector(name)
        except Exception as exc:  # an optional dependency missing: measure the others
            print(f"skipping {name}: {exc}", file=sys.stderr)
    sets = photo_sets(args.limit)
    # Warm-up so that one-time costs (lazy initialisation, first-shape allocations) are not timed.
    warm = load_rgb(sets["celebahq"][0])
    for det in detectors.values():
        detect_faces(warm, det)
    load_before = os.getloadavg()
    records = run_photos(detectors, sets, args.min_score)
    load_after = os.getloadavg()
    summary = summarise(records, list(detectors))
    scenes = scene_checks(detectors, sets, args.min_score)
    print(markdown(summary, scenes, args.min_score))
    env = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(f"\n{env}")
    if args.json:
        args.json.write_text(json.dumps({"min_score": args.min_score, "environment": env, **summary,
                                         "scenes": scenes, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
