"""`faceshield serve` latency and throughput: one 512² photo per job, over HTTP on loopback, default settings.

Starts the real server (uvicorn, in this process, on a free 127.0.0.1 port) with ``--workers`` workers, sends
one untimed warm-up job (models load once per worker), then measures

* latency: ``--n`` jobs one after another, each from upload to the protected photo downloaded, with the
  server-side protection time (``record.seconds``) beside it;
* throughput: ``--concurrent`` jobs submitted at once (the queue holds them), photos per minute until the last
  result is downloaded.

The photo is the first face of ``shared/data/celebahq-pairs/train`` upscaled to 512×512 (Lanczos). The method is
``cloak`` at its defaults (``mid``: 40 steps, every calibrated surrogate) unless ``--set KEY=VALUE`` says
otherwise.

Usage::

    FACESHIELD_MIRROR=../shared/models python benchmarks/server_latency.py [--n 3] [--concurrent 4]
        [--workers 1] [--set steps=10] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACESHIELD_MIRROR", str(SHARED / "models"))
sys.path.insert(0, str(REPO / "tests"))  # server_helpers: a uvicorn server in a thread


def photo_512() -> bytes:
    from PIL import Image

    first = sorted((SHARED / "data" / "celebahq-pairs" / "train").glob("*.png"))[0]
    buffer = io.BytesIO()
    Image.open(first).convert("RGB").resize((512, 512), Image.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


def run_job(client, photo: bytes, settings: list[str]) -> tuple[float, dict]:
    """Upload → poll → download; (seconds, the photo's record)."""
    start = time.perf_counter()
    r = client.post("/api/v1/jobs", files=[("photos", ("bench.png", photo))], data={"settings": settings})
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    result = client.get(f"/api/v1/jobs/{job_id}/photos/0/result")
    result.raise_for_status()
    seconds = time.perf_counter() - start
    client.delete(f"/api/v1/jobs/{job_id}")
    return seconds, job["photos"][0]["record"]


def main() -> None:
    import httpx
    from server_helpers import live_server

    from faceshield.server.app import ServerSettings, create_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3, help="sequential jobs timed")
    parser.add_argument("--concurrent", type=int, default=4, help="jobs submitted at once for throughput")
    parser.add_argument("--workers", type=int, default=1, help="server worker threads")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    photo = photo_512()
    app = create_app(ServerSettings(workers=args.workers, queue_size=max(8, args.concurrent)))
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                            f"Python {platform.python_version()}", "workers": args.workers,
                 "settings": args.settings or "cloak defaults (mid)", "photo": "512x512 PNG, one face"}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=3600) as client:
        start = time.perf_counter()
        run_job(client, photo, args.settings)
        out["first_job_s"] = round(time.perf_counter() - start, 2)  # includes loading the models
        latencies, protect = [], []
        for _ in range(args.n):
            seconds, record = run_job(client, photo, args.settings)
            latencies.append(seconds)
            protect.append(record["seconds"])
            print(f"job: {seconds:.2f} s end to end, {record['seconds']:.2f} s protecting, {record['status']}",
                  file=sys.stderr)
        out["latency_s"] = {"median": round(statistics.median(latencies), 2), "min": round(min(latencies), 2),
                            "max": round(max(latencies), 2)}
        out["protect_s_median"] = round(statistics.median(protect), 2)
        out["overhead_s_median"] = round(statistics.median(latencies) - statistics.median(protect), 2)

        import concurrent.futures

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
            list(pool.map(lambda _: run_job(client, photo, args.settings), range(args.concurrent)))
        elapsed = time.perf_counter() - start
        out["throughput"] = {"jobs": args.concurrent, "seconds": round(elapsed, 2),
                             "photos_per_minute": round(60 * args.concurrent / elapsed, 2)}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
