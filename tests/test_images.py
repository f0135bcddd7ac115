"""Reading every kind of photo a user has: orientation, colour modes, bit depths, formats, bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from faceshield.errors import ImageReadError
from faceshield.images import load_image, scan_folder, to_tensor, to_uint8


@pytest.fixture
def face(face_rgb) -> np.ndarray:
    return face_rgb


def test_png_roundtrip_is_exact(tmp_path, face):
    Image.fromarray(face).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.format == "PNG" and loaded.alpha is None
    np.testing.assert_array_equal(loaded.rgb, face)


def test_exif_orientation_is_applied(tmp_path, face):
    # Store the face rotated on disk, with EXIF orientation 6 ("rotate 90° CW to display"): reading must undo it.
    stored = np.rot90(face, k=1)  # 90° counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=98)
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.rgb.shape == face.shape
    assert np.abs(loaded.rgb.astype(int) - face.astype(int)).mean() < 4


def test_grayscale_becomes_three_equal_channels(tmp_path, face):
    Image.fromarray(face).convert("L").save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png").rgb
    assert rgb.shape == face.shape
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_rgba_keeps_alpha_aside(tmp_path, face):
    alpha = np.full(face.shape[:2], 128, np.uint8)
    Image.fromarray(np.dstack([face, alpha])).save(tmp_path / "t.png")
    loaded = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(loaded.rgb, face)
    np.testing.assert_array_equal(loaded.alpha, alpha)


def test_cmyk_jpeg(tmp_path, face):
    Image.fromarray(face).convert("CMYK").save(tmp_path / "c.jpg", quality=98)
    loaded = load_image(tmp_path / "c.jpg")
    assert loaded.mode == "CMYK" and loaded.rgb.shape == face.shape
    assert np.abs(loaded.rgb.astype(int) - face.astype(int)).mean() < 6


def test_16bit_grayscale_png_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "d.png")
    rgb = load_image(tmp_path / "d.png").rgb
    assert rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 100 < rgb[32, 0, 0] < 155


def test_webp(tmp_path, face):
    Image.fromarray(face).save(tmp_path / "w.webp", lossless=True)
    np.testing.assert_array_equal(load_image(tmp_path / "w.webp").rgb, face)


def test_large_image_is_read_at_full_resolution(tmp_path):
    Image.new("RGB", (6000, 4000), (10, 20, 30)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png").size == (6000, 4000)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable image"), (b"hello, not an image", "not a readable image")],
)
def test_non_images_give_one_line_error_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        load_image(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path, face):
    Image.fromarray(face).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg: corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path)


def test_scan_folder_recurses_and_lists_the_other_files(tmp_path, face):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".cache").mkdir()
    for p in ("a/1.png", "a/b/2.JPG", "a/notes.txt", "a/b/c.heic", "a/.DS_Store", "a/.cache/3.png", "a/.x.png.part"):
        (tmp_path / p).write_bytes(b"x")
    photos, others = scan_folder(tmp_path / "a")
    assert [p.name for p in photos] == ["1.png", "2.JPG"]
    assert [p.name for p in others] == ["c.heic", "notes.txt"]  # hidden files and folders in neither


def test_tensor_conversions_roundtrip(face):
    t = to_tensor(face)
    assert t.shape == (1, 3, 256, 256) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    np.testing.assert_array_equal(to_uint8(t), face)


def _exif_with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0112] = 1
    gps = exif.get_ifd(0x8825)
    gps[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    gps[1] = "N"
    return exif


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_save_strips_metadata_by_default(tmp_path, face, suffix):
    from faceshield.images import save_image

    src = tmp_path / f"src{suffix}"
    Image.fromarray(face).save(src, exif=_exif_with_gps().tobytes())
    loaded = load_image(src)
    assert loaded.exif is not None
    out = save_image(tmp_path / f"out{suffix}", loaded.rgb, source=loaded)
    with Image.open(out) as img:
        assert len(img.getexif()) == 0 and "icc_profile" not in img.info
    kept = save_image(tmp_path / f"kept{suffix}", loaded.rgb, source=loaded, keep_metadata=True)
    with Image.open(kept) as img:
        exif = img.getexif()
        assert exif.get(0x010F) == "PhoneMaker" and exif.get_ifd(0x8825).get(1) == "N"


def test_save_keeps_size_alpha_and_jpeg_quality(tmp_path, face):
    from faceshield.images import save_image

    alpha = np.full(face.shape[:2], 200, np.uint8)
    png = load_image(save_image(tmp_path / "a.png", face, alpha=alpha))
    np.testing.assert_array_equal(png.rgb, face)
    np.testing.assert_array_equal(png.alpha, alpha)
    jpg = load_image(save_image(tmp_path / "a.jpg", face))
    assert jpg.size == (256, 256) and np.abs(jpg.rgb.astype(int) - face.astype(int)).mean() < 1.5
    with pytest.raises(ImageReadError, match="cannot write this file type"):
        save_image(tmp_path / "a.gif", face)
