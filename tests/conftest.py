"""Shared test setup: model files resolve from ../shared/models (the project's mirror), real photos from ../shared/data."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESHIELD_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
PAIRS = DATA / "celebahq-pairs"

if (SHARED / "models").is_dir():
    os.environ.setdefault("FACESHIELD_MIRROR", str(SHARED / "models"))


def pair_ids(n: int) -> list[str]:
    """The first ``n`` identity ids of celebahq-pairs, in a stable order."""
    ids = sorted(p.stem for p in (PAIRS / "train").glob("*.png"))
    return ids[:n]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real photos not found at {DATA} (set FACESHIELD_SHARED)")
    return DATA


@pytest.fixture(scope="session")
def face_rgb(shared_data) -> np.ndarray:
    """One real aligned face photo, 256×256×3 uint8 RGB."""
    from faceshield.images import load_image

    return load_image(PAIRS / "train" / f"{pair_ids(1)[0]}.png").rgb
