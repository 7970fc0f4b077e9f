"""DINOv3 through the command-line tools and the DAVIS benchmark, with the official-layout fixture weights."""
import importlib.util
import json

import numpy as np
import pytest
from densevit.apps.cli import coseg as cli_coseg
from densevit.apps.cli import match as cli_match
from densevit.apps.cli.vos import entry as vos_entry
from PIL import Image

from densevit.cli.extract import main as extract_main
from densevit.io.paths import repo_root

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def v3(shared):
    return ["--backbone", "dinov3_vits16", "--weights",
            str(shared / "golden" / "dinov3_vits16_random_official_fp16.pth"), "--device", "cpu"]


@pytest.fixture(scope="module")
def pair(images, tmp_path_factory):
    d = tmp_path_factory.mktemp("pair3")
    out = []
    for p in images:
        im = Image.open(p).convert("RGB")
        q = d / p.name
        im.resize((im.width // 16, im.height // 16), Image.BILINEAR).save(q, quality=92)
        out.append(q)
    return out


@pytest.mark.parametrize("facet", ["key", "key_rope"])
def test_extract_cli_binned_with_saliency(pair, v3, tmp_path, facet):
    argv = [str(pair[0]), "-o", str(tmp_path), "--stride", "8", "--layer", "9", "--facet", facet, "--bin",
            "--saliency", "--load-size", "64"] + v3
    assert extract_main(argv) == 0
    z = np.load(tmp_path / f"{pair[0].stem}.npz")
    h, w = z["num_patches"]
    assert str(z["backbone"]) == "dinov3_vits16" and int(z["patch_size"]) == 16 and int(z["stride"]) == 8
    assert z["descriptors"].shape == (h * w, 17 * 384) and z["saliency"].shape == (h * w,)


@pytest.mark.parametrize("dx, dy", [(16, 8), (-8, 16)])
def test_match_cli_finds_the_shift_of_a_shifted_copy(pair, v3, tmp_path, dx, dy):
    """B is A's crop moved by whole tokens (stride 8, no resize at load size 96): the pairs found map each point
    of A to the same content in B, i.e. to the point minus the shift."""
    im = Image.open(pair[0])
    X0, Y0, W, H = 40, 40, 128, 96
    im.crop((X0, Y0, X0 + W, Y0 + H)).save(tmp_path / "a.png")
    im.crop((X0 + dx, Y0 + dy, X0 + dx + W, Y0 + dy + H)).save(tmp_path / "b.png")
    argv = [str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "m"), "--load-size", str(H),
            "--stride", "8", "--quiet"] + v3
    assert cli_match.entry(argv) == 0
    rec = json.loads((tmp_path / "m" / "a_b_points.json").read_text())
    a, b = np.array(rec["points_a"]), np.array(rec["points_b"])
    assert len(a) >= 5 and a.shape == b.shape and rec["image_a_hw"] == [H, W]
    err = np.linalg.norm(b - (a - [dx, dy]), axis=1)
    assert (err <= 8).mean() >= 0.8, err                 # within one token spacing (8 px)


def test_match_and_coseg_clis(pair, v3, tmp_path, capsys):
    common = ["--load-size", "64", "--stride", "8", "--quiet"] + v3
    assert cli_match.entry([str(p) for p in pair] + ["--out", str(tmp_path / "m")] + common) == 0
    rec = json.loads(next((tmp_path / "m").glob("*_points.json")).read_text())
    assert len(rec["points_a"]) == len(rec["points_b"]) > 0
    assert cli_coseg.entry([str(p) for p in pair] + ["--out", str(tmp_path / "c"), "--thresh", "0.3"] + common) == 0
    for p in pair:
        assert (tmp_path / "c" / f"{p.stem}_mask.png").is_file()


def test_vos_cli_and_davis_benchmark(shared, v3, tmp_path, capsys):
    davis = shared / "data" / "davis2016"
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((davis / "JPEGImages" / "480p" / "dog").glob("*.jpg"))[:3]:
        (frames / p.name).symlink_to(p)
    out = tmp_path / "vos"
    argv = ["--frames", str(frames), "--first-mask", str(davis / "Annotations" / "480p" / "dog" / "00000.png"),
            "--out", str(out), "--short-side", "64", "--quiet"] + v3
    assert vos_entry(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]

    spec = importlib.util.spec_from_file_location("davis_bench_v3", repo_root() / "benchmarks" / "davis.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = tmp_path / "bench"
    assert bench.entry(["--sequences", "dog", "--max-frames", "3", "--short-side", "64", "--out", str(res),
                        "--quiet"] + v3) == 0
    assert (res / "global_results-val.csv").read_text().startswith("J&F-Mean")
