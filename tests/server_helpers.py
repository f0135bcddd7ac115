"""Helpers shared by the server tests: a fake runner (no models) and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from faceshield.faces.detect import Face
from faceshield.protect import PhotoRecord

# Tiny settings that keep real protection to a few seconds on a CPU (the library's --set KEY=VALUE syntax).
FAST = ["surrogates=mobilefacenet-ms1m", "steps=3", "eot=false"]


def png_bytes(width: int = 64, height: int = 48, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt)
    return buffer.getvalue()


class FakeDetector:
    name = "fake"

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [Face((w * 0.25, h * 0.25, w * 0.75, h * 0.75), 0.99, np.zeros((5, 2), np.float32))]


class FakeRunner:
    """Protector's interface without models: copies the photo, reports 'protected' after ``steps`` steps.

    ``gate`` (a threading.Event), when given, holds every job until it is set (to fill the queue)."""

    settings_sha256 = "fake"

    def __init__(self, steps: int = 3, gate: threading.Event | None = None, delay: float = 0.0):
        self.steps, self.gate, self.delay = steps, gate, delay
        self.detector = FakeDetector()
        self.calls = 0

    def protect_files(self, jobs, progress=None, copy_no_face=False):
        records = []
        for photo, out in jobs:
            self.calls += 1
            for step in range(1, self.steps + 1):
                if self.gate is not None:
                    while not self.gate.wait(0.05):
                        if progress:
                            progress(0, self.steps)  # lets a cancelled job stop here
                if self.delay:
                    time.sleep(self.delay)
                if progress:
                    progress(step, self.steps)
            shutil.copyfile(photo, out)
            similarity = {"fake-model": {"before": [1.0], "after": [0.1], "threshold": 0.3}}
            records.append(PhotoRecord(str(photo), str(out), "protected", faces=1, method="fake",
                                       similarity=similarity,
                                       verdicts=[{"status": "protected", "unfooled": []}]))
        return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, port: int | None = None):
    """Run ``app`` with uvicorn in a thread on 127.0.0.1; yields the base URL; stops it (and its lifespan)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
