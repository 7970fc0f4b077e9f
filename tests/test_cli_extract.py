"""densevit-extract: outputs as documented, no overwrite, one-line errors."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def cli(capsys):
    from densevit.cli.extract import entry

    def _run(*argv):
        code = entry(list(map(str, argv)))
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_writes_documented_npz(cli, tmp_path, images, golden_path):
    code, _, err = cli(images[0], "--weights", golden_path, "--stride", 8, "--layer", 9, "--bin", "--saliency",
                       "--load-size", 96, "-o", tmp_path)
    assert code == 0, err
    z = np.load(tmp_path / "cat.npz")
    h, w = z["num_patches"]
    assert tuple(z["input_hw"]) == (96, 128) and tuple(z["image_hw"]) == (3024, 4032)
    assert z["descriptors"].shape == (h * w, 17 * 384) and z["descriptors"].dtype == np.float32
    assert z["saliency"].shape == (h * w,) and int(z["stride"]) == 8 and int(z["patch_size"]) == 8


def test_folder_input_and_no_overwrite(cli, tmp_path, images, golden_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, im in enumerate(images):
        Image.open(im).reduce(16).save(src / f"im{i}.png")
    args = (src, "--weights", golden_path, "--stride", 8, "--load-size", 64, "-o", tmp_path / "out")
    assert cli(*args)[0] == 0
    before = (tmp_path / "out" / "im0.npz").stat().st_mtime_ns
    code, _, err = cli(*args)
    assert code == 0 and "exist" in err
    assert (tmp_path / "out" / "im0.npz").stat().st_mtime_ns == before
    assert cli(*args, "--overwrite")[0] == 0
    assert (tmp_path / "out" / "im0.npz").stat().st_mtime_ns != before


@pytest.mark.parametrize("bad", ["missing", "corrupt", "tiny", "stride", "layer", "weights"])
def test_bad_input_one_line_nonzero(cli, tmp_path, images, golden_path, bad):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    (tmp_path / "w.pth").write_bytes(b"nope")
    image = {"missing": tmp_path / "nope.jpg", "corrupt": tmp_path / "corrupt.jpg", "tiny": tmp_path / "tiny.png"}
    args = [image.get(bad, images[1]), "--weights", tmp_path / "w.pth" if bad == "weights" else golden_path,
            "--load-size", 64, "-o", tmp_path / "out"]
    args += {"stride": ["--stride", 3], "layer": ["--layer", 12]}.get(bad, ["--stride", 8])
    code, _, err = cli(*args)
    assert code != 0
    lines = err.strip().splitlines()
    if bad == "corrupt":          # the one wording and summary of every command for images left out
        assert len(lines) == 2 and "Traceback" not in err
        assert lines[0].startswith(f"densevit-extract: skipping unreadable image: cannot read image {image[bad]}: ")
        assert lines[1] == "densevit-extract: 1 unreadable image(s) left out: corrupt.jpg"
        return
    if bad == "tiny":             # issue 31: an image smaller than the patch follows the same one rule
        assert len(lines) == 2 and "Traceback" not in err
        assert lines[0] == (f"densevit-extract: skipping unreadable image: {image[bad]} is 1x1 pixels, smaller "
                            f"than the 8-pixel patch of dino_vits8")
        assert lines[1] == "densevit-extract: 1 unreadable image(s) left out: tiny.png"
        return
    assert len(lines) == 1 and lines[0].startswith("densevit-extract: error:") and "Traceback" not in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "densevit.cli.extract", "--list-backbones"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "dino_vits8" in out.stdout and "dinov2_vitb14_reg" in out.stdout
