"""Image reading (modes, EXIF) and the shorter-side Lanczos resize."""
import numpy as np
import pytest
from PIL import Image

from densevit import DensevitError, load_image
from densevit.io.images import resize_short_side, resized_hw


def test_resized_size_floors_long_side():
    assert resized_hw((3024, 4032), 224) == (224, 298)
    assert resized_hw((2751, 2686), 160) == (163, 160)
    assert resized_hw((50, 50), 224) == (224, 224)


def test_resize_uses_lanczos_short_side():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    out = resize_short_side(img, 20)
    assert out.size == (45, 20)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((45, 20), Image.LANCZOS)))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_any_mode_reads_as_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        arr = (rng.integers(0, 65535, (12, 10))).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    else:
        img = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("im.tif" if mode == "CMYK" else "im.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 12)
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
        np.testing.assert_allclose(np.asarray(out)[..., 0], np.round(arr / 65535 * 255), atol=1)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DensevitError, match="cannot read image"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(DensevitError, match="no such image"):
        load_image(tmp_path / "y.jpg")


def test_fast_jpeg_decode_matches_exact_path(images, tmp_path):
    """Draft-mode decoding gives the exact path's sizes (EXIF orientation included) and nearly its pixels."""
    import numpy as np
    from PIL import Image

    from densevit.io.images import image_size, load_resized

    rotated = tmp_path / "rotated.jpg"
    with Image.open(images[0]) as im:
        exif = im.getexif()
        exif[0x0112] = 6                                              # rotate 90 degrees on display
        im.save(rotated, exif=exif, quality=95)
    for path in (images[0], rotated):
        exact, hw = load_resized(path, 64)
        fast, hw_fast = load_resized(path, 64, fast_jpeg=True)
        assert hw == hw_fast == image_size(path) and exact.size == fast.size
        diff = np.abs(np.asarray(exact, np.float32) - np.asarray(fast, np.float32))
        assert diff.mean() < 2.0
    assert image_size(rotated) == (4032, 3024)
