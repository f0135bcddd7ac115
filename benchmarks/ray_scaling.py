"""Ray scaling: photos/s of `faceshield protect --ray` with 1 and 2 local workers (one CPU slot each), and of a
local run (all cores, one process) for reference, on real CelebA-HQ faces at default cloak settings.

    FACESHIELD_MIRROR=../shared/models python benchmarks/ray_scaling.py --photos 8 --workers 1,2

Startup (actors loading their models) is timed apart from protecting; each run writes into a fresh folder, so
nothing is resumed. Prints one JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAIRS = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared")) / "data" / "celebahq-pairs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8, help="real faces to protect (default 8)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to time (default 1,2)")
    parser.add_argument("--strength", default="mid", help="cloak preset (default mid: the CLI's default)")
    parser.add_argument("--no-local", action="store_true", help="skip the local (one process) reference run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from faceshield.distributed import RayProtector, WorkerSpec
    from faceshield.images import load_image
    from faceshield.jobs import plan_jobs
    from faceshield.methods.base import create_method
    from faceshield.protect import Protector, protect_paths

    tmp = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    photos = tmp / "in"
    photos.mkdir()
    for path in sorted((PAIRS / "train").glob("*.png"))[: args.photos]:
        Image.fromarray(load_image(path).rgb).save(photos / path.name)
    n = len(list(photos.iterdir()))
    results: dict[str, dict] = {}

    def timed(name: str, protector, batch: int) -> None:
        plan = plan_jobs([photos], tmp / f"out-{name}")
        start = time.perf_counter()
        run = protect_paths(plan, protector, progress=False, batch_size=batch)
        seconds = time.perf_counter() - start
        results[name]["seconds"] = round(seconds, 1)
        results[name]["photos_per_s"] = round(n / seconds, 4)
        results[name]["counts"] = run.counts()

    if not args.no_local:
        start = time.perf_counter()
        local = Protector(create_method("cloak", args.strength))
        results["local"] = {"workers": 1, "torch_threads": torch.get_num_threads(),
                            "startup_s": round(time.perf_counter() - start, 1)}
        timed("local", local, 1)
        del local

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            pool = RayProtector(WorkerSpec("cloak", args.strength), workers=workers)
            name = f"ray-{workers}"
            results[name] = {"workers": workers, "torch_threads": 1, "startup_s": round(time.perf_counter() - start, 1)}
            timed(name, pool, n)
            pool.close()
            time.sleep(2)  # let the killed actors give their CPU slots back
    finally:
        ray.shutdown()

    base = results.get("ray-1", {}).get("photos_per_s")
    for r in results.values():
        if base and "photos_per_s" in r:
            r["speedup_vs_ray_1"] = round(r["photos_per_s"] / base, 2)
    print(json.dumps({"photos": n, "cpus": os.cpu_count(), "strength": args.strength, "runs": results}, indent=2))
    print("\n| run | workers × torch threads | startup (s) | protect (s) | photos/s | vs 1 Ray worker |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['workers']} × {r['torch_threads']} | {r['startup_s']} | {r['seconds']} | "
              f"{r['photos_per_s']:.3f} | {r.get('speedup_vs_ray_1', '')} |")


if __name__ == "__main__":
    main()
