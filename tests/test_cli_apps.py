"""The application CLIs end to end on real images (small copies of cat.jpg / ibex.jpg) with the golden random
weights: written files, refusal to overwrite, per-set errors that let the other sets run, exit codes."""
import json
import shutil

import numpy as np
import pytest
from densevit.apps.cli import coseg as cli_coseg
from densevit.apps.cli import match as cli_match
from densevit.apps.cli import partseg as cli_partseg
from densevit.apps.cli import pca as cli_pca
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def pair(images, tmp_path_factory):
    """cat.jpg and ibex.jpg shrunk 8x (still real photographs; fast to decode)."""
    d = tmp_path_factory.mktemp("pair")
    out = []
    for p in images:
        im = Image.open(p).convert("RGB")
        q = d / p.name
        im.resize((im.width // 8, im.height // 8), Image.BILINEAR).save(q, quality=92)
        out.append(q)
    return out


@pytest.fixture
def common(golden_path):
    return ["--weights", str(golden_path), "--device", "cpu", "--load-size", "48", "--quiet"]


def _size(path):
    with Image.open(path) as im:
        return im.size, im.mode


def test_coseg_writes_masks_overlays_summary_and_refuses_to_overwrite(pair, common, tmp_path, capsys):
    out = tmp_path / "coseg"
    argv = [str(p) for p in pair] + ["--out", str(out), "--thresh", "0.3"] + common
    assert cli_coseg.entry(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("set:") and "clusters" in lines[0]
    for p in pair:
        size, mode = _size(out / f"{p.stem}_mask.png")
        assert size == Image.open(p).size and mode == "L"
        m = np.asarray(Image.open(out / f"{p.stem}_mask.png"))
        assert set(np.unique(m)) <= {0, 255}
        assert _size(out / f"{p.stem}_overlay.png")[1] == "RGB"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] >= 1 and set(summary["foreground_fraction"]) == {p.stem for p in pair}
    assert "extraction" in summary["timings"]
    before = (out / f"{pair[0].stem}_mask.png").stat().st_mtime_ns
    assert cli_coseg.entry(argv) == 1                                        # exists: refused, set fails
    assert "--overwrite" in capsys.readouterr().err
    assert (out / f"{pair[0].stem}_mask.png").stat().st_mtime_ns == before
    assert cli_coseg.entry(argv + ["--overwrite"]) == 0


def test_folder_of_sets_bad_sets_report_and_the_others_run(pair, common, tmp_path, capsys):
    root = tmp_path / "sets"
    for name in ("good", "single", "broken", "empty"):
        (root / name).mkdir(parents=True)
    for p in pair:
        shutil.copy(p, root / "good" / p.name)
    shutil.copy(pair[0], root / "single" / pair[0].name)
    shutil.copy(pair[0], root / "broken" / pair[0].name)
    (root / "broken" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    code = cli_coseg.entry([str(root), "--out", str(out)] + common)
    cap = capsys.readouterr()
    assert code == 1
    err = cap.err
    assert "set single: error: needs at least 2 images, found 1" in err
    assert "set empty: error: needs at least 2 images, found 0" in err
    # the unreadable file is left out of its set in one line; what remains (one image) is too few
    assert "set broken: skipping unreadable image: cannot read image" in err and "garbage.jpg" in err
    assert "set broken: error: needs at least 2 images, found 1" in err
    assert "1 unreadable image(s) left out: garbage.jpg" in err
    assert "3 of 4 set(s) failed" in err
    assert "Traceback" not in err
    assert cap.out.strip().splitlines()[0].startswith("good:")
    assert (out / "good" / f"{pair[0].stem}_mask.png").exists() and (out / "good" / "summary.json").exists()
    assert not (out / "single").exists() and not (out / "broken" / "summary.json").exists()


def test_empty_folder_and_missing_file_are_one_line_errors(common, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert cli_coseg.entry([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")] + common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densevit-coseg: error: no images found in folder") and "\n" not in err
    assert cli_pca.entry([str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "o")] + common) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_partseg_writes_indexed_part_maps(pair, common, tmp_path, capsys):
    out = tmp_path / "parts"
    argv = [str(p) for p in pair] + ["--out", str(out), "--thresh", "0.3", "--num-parts", "3", "--crf", "approx"]
    assert cli_partseg.entry(argv + common) == 0
    assert "3 parts" in capsys.readouterr().out
    for p in pair:
        size, mode = _size(out / f"{p.stem}_parts.png")
        assert size == Image.open(p).size and mode == "P"
        lab = np.asarray(Image.open(out / f"{p.stem}_parts.png"))
        assert lab.max() <= 3 and len(np.unique(lab)) >= 2                   # 0 background, 1..3 parts
        assert _size(out / f"{p.stem}_overlay.png")[1] == "RGB"
    assert json.loads((out / "summary.json").read_text())["crf"] == "approx"


def test_match_writes_points_json_picture_and_transfers_points(pair, common, tmp_path, capsys):
    pts = tmp_path / "pts.json"
    pts.write_text(json.dumps([[100, 120], [250, 200]]))
    out = tmp_path / "match"
    argv = [str(p) for p in pair] + ["--out", str(out), "--num-pairs", "6", "--points", str(pts)] + common
    assert cli_match.entry(argv) == 0
    assert "pairs from" in capsys.readouterr().out
    a, b = pair[0].stem, pair[1].stem
    rec = json.loads((out / f"{a}_{b}_points.json").read_text())
    (wa, ha), (wb, hb) = Image.open(pair[0]).size, Image.open(pair[1]).size
    pa, pb = np.array(rec["points_a"]), np.array(rec["points_b"])
    assert 1 <= len(pa) <= 6 and pa.shape == pb.shape
    assert (pa >= 0).all() and (pa[:, 0] < wa).all() and (pa[:, 1] < ha).all()
    assert (pb >= 0).all() and (pb[:, 0] < wb).all() and (pb[:, 1] < hb).all()
    tr = json.loads((out / f"{a}_{b}_transfer.json").read_text())
    assert tr["points_a"] == [[100, 120], [250, 200]] and len(tr["points_b"]) == 2
    for name in (f"{a}_{b}_matches.png", f"{a}_{b}_transfer.png"):
        assert _size(out / name)[1] == "RGB"


def test_match_needs_exactly_two_images(pair, common, tmp_path, capsys):
    argv = [str(pair[0]), str(pair[1]), str(pair[0]), "--out", str(tmp_path / "m")] + common
    assert cli_match.entry(argv) == 1
    assert "needs exactly 2 images, found 3" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"points": [1, 2, 3]}')
    assert cli_match.entry([str(p) for p in pair] + ["--out", str(tmp_path / "m2"), "--points", str(bad)]
                           + common) == 2
    assert "expected a JSON list of [x, y] points" in capsys.readouterr().err


def test_pca_on_the_full_size_example_images(images, common, tmp_path, capsys):
    out = tmp_path / "pca"
    assert cli_pca.entry([str(p) for p in images] + ["--out", str(out), "--max-side", "256"] + common) == 0
    assert "explained variance" in capsys.readouterr().out
    from densevit.apps.draw import fit_size

    for p in images:
        size, mode = _size(out / f"{p.stem}_pca.png")       # the photo beside the token map, a caption below
        h, w = fit_size(Image.open(p).size[::-1], 256)
        assert size[0] == 2 * w + 8 and size[1] > h and mode == "RGB"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def four_and_corrupt(pair, tmp_path_factory):
    """Four good photographs (the pair and their mirror images) and one corrupt JPEG, in one folder."""
    d = tmp_path_factory.mktemp("five")
    for p in pair:
        shutil.copy(p, d / p.name)
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(d / f"{p.stem}_flip.jpg")
    data = (d / pair[0].name).read_bytes()
    (d / "corrupt.jpg").write_bytes(data[: len(data) // 3])  # truncated: the header reads, the pixels do not
    return d


@pytest.mark.parametrize("app, suffix", [(cli_coseg, "_mask.png"), (cli_partseg, "_parts.png"),
                                         (cli_pca, "_pca.png")])
def test_apps_leave_out_unreadable_image_and_exit_nonzero(app, suffix, four_and_corrupt, common, tmp_path, capsys):
    out = tmp_path / "out"
    extra = ["--num-parts", "2", "--crf", "none"] if app is cli_partseg else []
    code = app.entry([str(four_and_corrupt), "--out", str(out)] + extra + common)
    err = capsys.readouterr().err
    assert code == 1
    lines = [l for l in err.splitlines() if "corrupt.jpg" in l]
    assert len(lines) == 2 and "skipping unreadable image" in lines[0] and "truncated" in lines[0]
    assert "1 unreadable image(s) left out: corrupt.jpg" in err and "set(s) failed" not in err
    assert "Traceback" not in err
    good = sorted(p.stem for p in four_and_corrupt.glob("*.jpg") if p.stem != "corrupt")
    assert sorted(p.name[: -len(suffix)] for p in out.glob(f"*{suffix}")) == good
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == 4 and summary["unreadable"][0].endswith("corrupt.jpg")


def test_match_leaves_out_unreadable_image(pair, common, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for p in pair:
        shutil.copy(p, d / p.name)
    (d / "zzz.jpg").write_bytes(b"garbage")
    out = tmp_path / "m"
    assert cli_match.entry([str(d), "--out", str(out), "--num-pairs", "4"] + common) == 1
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "zzz.jpg" in err and "set(s) failed" not in err
    assert (out / f"{pair[0].stem}_{pair[1].stem}_points.json").exists()
