"""Write the demo photos: scikit-image's public-domain astronaut (NASA) and a second, different shot of her.

The second photo is the same picture mirrored, rescaled, slightly rotated and JPEG-compressed, so that the
demo compares two different files of one person without shipping any photo in the repository.
"""

import sys
from pathlib import Path

from PIL import Image
from skimage import data


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    first = Image.fromarray(data.astronaut())
    first.save(out / "astronaut.png")
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(8, resample=Image.Resampling.BICUBIC)
    second = second.resize((384, 384), Image.Resampling.LANCZOS)
    second.save(out / "astronaut_second.jpg", quality=85)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "samples"))
