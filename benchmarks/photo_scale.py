"""Photo-scale protection benchmark: build the set, protect every photo whole (leave-one-out per judge), judge each
output through the protection's own pipeline and through the independent one (faceshield.eval.judge).

    python benchmarks/photo_scale.py runs/photo-scale                       # cloak@mid, 40 CelebA-HQ + 4 + 4 photos
    python benchmarks/photo_scale.py runs/photo-scale --method cloak@high --limit 12 --judges dlib-resnet,faceres

A rerun resumes after the last photo done; runs with other ``--judges`` (e.g. one per core) add to the same table.

Writes ``runs/photo-scale/set/`` (photos + manifest, built once), ``<method>/result.json`` and prints the
per-judge table (markdown). See faceshield/eval/photoscale.py for what the set contains.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from faceshield.eval.photoscale import PhotoScaleConfig, build_photo_set, evaluate_photo_set, markdown
from faceshield.fileio import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("FACESHIELD_SHARED", "../shared")) / "data")
    parser.add_argument("--n-celeba", type=int, default=40)
    parser.add_argument("--method", default="cloak@mid")
    parser.add_argument("--judges", default="", help="comma-separated held-out judges (default: calibrated strong)")
    parser.add_argument("--limit", type=int, default=None, help="first N photos of the set only")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="method setting KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    set_dir = args.out / "set"
    if not (set_dir / "manifest.json").is_file():
        build_photo_set(args.shared, set_dir, n_celeba=args.n_celeba)
    from faceshield.methods.base import get_method_class
    from faceshield.settings import parse_overrides

    settings = parse_overrides(get_method_class(args.method.split("@")[0]).Config, args.settings)
    config = PhotoScaleConfig(method=args.method, judges=tuple(j for j in args.judges.split(",") if j),
                              settings=settings, limit=args.limit)
    # one folder per method and settings: a rerun with the same ones resumes after the last photo done
    work = args.out / "-".join([args.method.replace("@", "-"), *(s.replace("/", "_") for s in args.settings)])
    start = time.perf_counter()
    result = evaluate_photo_set(set_dir, config, work)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result = _with_earlier_judges(work / "result.json", result)
    write_text_atomic(work / "result.json", json.dumps(result, indent=1, default=str) + "\n")
    print(markdown(result))


def _with_earlier_judges(path: Path, result: dict) -> dict:
    """``result`` plus the judges an earlier run with the same method and settings wrote to ``path`` (runs split by
    judge, e.g. one per core, add up to one table)."""
    if not path.is_file():
        return result
    earlier = json.loads(path.read_text())
    kept = {j: r for j, r in earlier["judges"].items() if j not in result["judges"]}
    result["judges"] = {**kept, **result["judges"]}
    result["photos"] = [r for r in earlier["photos"] if r["judge"] in kept] + result["photos"]
    return result


if __name__ == "__main__":
    main()
