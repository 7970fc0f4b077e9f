"""What a new user sees: every output names the weights that made it (backbone, file name or random, SHA-256),
random weights say so in one line, the missing-weights error names the shared smoke-run weights, progress shows
on every long loop (status lines off a terminal, nothing with --quiet), and a failed run leaves no empty output."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from densevit.runtime.progress import Progress, reporting, stage, track


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_npz_names_its_weights(tmp_path, images, golden_path, capsys):
    from densevit.cli.extract import entry as main      # the command as run: its warnings printed its way

    assert main([str(images[0]), "-o", str(tmp_path / "a"), "--weights", str(golden_path), "--load-size", "32",
                 "--device", "cpu", "--quiet"]) == 0
    d = np.load(tmp_path / "a" / "cat.npz")
    assert str(d["backbone"]) == "dino_vits8" and str(d["weights"]) == golden_path.name
    assert str(d["weights_sha256"]) == _sha(golden_path)
    assert "warning" not in capsys.readouterr().err
    assert main([str(images[0]), "-o", str(tmp_path / "b"), "--weights", "random", "--load-size", "32",
                 "--device", "cpu", "--quiet"]) == 0
    d = np.load(tmp_path / "b" / "cat.npz")
    assert str(d["weights"]) == "random" and str(d["weights_sha256"]) == ""
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "random weights" in line]
    assert warned == ["densevit-extract: warning: dino_vits8 runs with random weights: the outputs are not "
                      "meaningful features (smoke runs only; give --weights FILE for real ones)"]


def test_summary_json_names_its_weights_and_progress_lines_off_a_terminal(tmp_path, images, golden_path, capsys):
    from densevit.apps.cli.pca import main

    out = tmp_path / "pca"
    assert main([str(images[0]), "-o", str(out), "--weights", str(golden_path), "--load-size", "32",
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    assert prov["backbone"] == "dino_vits8" and prov["name"] == golden_path.name and prov["source"] == "file"
    assert prov["sha256"] == _sha(golden_path) and prov["size"] == golden_path.stat().st_size
    err = capsys.readouterr().err.splitlines()      # captured: not a terminal, so one line per stage
    assert err == ["densevit-pca: extracting (1 image)", "densevit-pca: PCA", "densevit-pca: drawing (1 image)"]
    assert main([str(images[0]), "-o", str(out), "--weights", str(golden_path), "--load-size", "32",
                 "--device", "cpu", "--quiet", "--overwrite"]) == 0
    assert capsys.readouterr().err == ""


def test_store_provenance_reaches_the_apps_summary(tmp_path, images, golden_path, capsys):
    from densevit.apps.cli.pca import main as pca
    from densevit.cli.extract import main as extract

    store = tmp_path / "store"
    assert extract([str(images[0]), "--store", str(store), "--weights", str(golden_path), "--load-size", "32",
                    "--device", "cpu", "--quiet"]) == 0
    recorded = json.loads((store / "store.json").read_text())["settings"]
    assert recorded["backbone"] == "dino_vits8"
    assert recorded["weights"] == {"source": "file", "name": golden_path.name, "size": golden_path.stat().st_size,
                                   "sha256": _sha(golden_path)}
    assert pca([str(images[0]), "-o", str(tmp_path / "o"), "--store", str(store), "--quiet"]) == 0
    prov = json.loads((tmp_path / "o" / "summary.json").read_text())["provenance"]
    assert prov["name"] == golden_path.name and prov["sha256"] == _sha(golden_path)


def test_missing_weights_names_the_shared_golden_file(tmp_path, monkeypatch, golden_path):
    from densevit.errors import WeightsNotFoundError
    from densevit.models.weights import load_backbone

    for var in ("DENSEVIT_WEIGHTS", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("dino_vits8")
    assert "vits8_random_fp16.pth (fixed random weights) or --weights random" in info.value.cli_message
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("dino_vits16")           # the golden file is a ViT-S/8: not offered for other backbones
    assert "vits8_random_fp16" not in info.value.cli_message


def test_progress_rules():
    off = io.StringIO()
    with reporting(Progress("prog", stream=off, terminal=False)) as p:
        p.where = "set cats"
        assert list(track([1, 2, 3], "extracting")) == [1, 2, 3]
        stage("clustering")
    assert off.getvalue().splitlines() == ["prog: set cats: extracting (3 images)", "prog: set cats: clustering"]
    on = io.StringIO()
    with reporting(Progress("prog", stream=on, terminal=True)):
        assert list(track(range(4), "extracting")) == [0, 1, 2, 3]
        stage("clustering")                 # on a terminal the bars say it
    assert "extracting" in on.getvalue() and "/4 [" in on.getvalue() and "clustering" not in on.getvalue()
    quiet = io.StringIO()
    with reporting(Progress("prog", quiet=True, stream=quiet, terminal=True)):
        assert list(track([1], "extracting")) == [1]
        stage("clustering")
    assert quiet.getvalue() == ""
    assert list(track([5], "no command reporting")) == [5]         # library use: silent, unchanged


def test_discover_failure_leaves_no_boxes_json_and_names_max_tokens(tmp_path, images, golden_path, capsys):
    from densevit.apps.cli.discover import main

    out = tmp_path / "disc"
    code = main([str(images[0]), "-o", str(out), "--weights", str(golden_path), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--max-tokens" in err and "--load-size" in err
    assert not (out / "boxes.json").exists()


def test_explorer_quiet_turns_the_request_log_off():
    pytest.importorskip("uvicorn")          # the explore extra (installed by .ci/run)
    import logging

    from densevit.apps.cli.explore import make_server

    async def app(scope, receive, send):    # pragma: no cover - never served here
        pass

    make_server(app, "127.0.0.1", 0, quiet=False)
    assert logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)        # one line per request
    assert not logging.getLogger("uvicorn.error").isEnabledFor(logging.INFO)     # no startup chatter
    make_server(app, "127.0.0.1", 0, quiet=True)
    assert not logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)


def test_vos_writes_a_single_binary_object_as_id_1(tmp_path, shared, golden_path, capsys):
    import shutil

    from PIL import Image

    from densevit.apps.cli.vos import entry

    davis = shared / "data" / "davis2016"
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("00000.jpg", "00001.jpg"):
        shutil.copy(davis / "JPEGImages" / "480p" / "dog" / name, frames / name)
    first = davis / "Annotations" / "480p" / "dog" / "00000.png"
    assert set(np.unique(np.asarray(Image.open(first)))) == {0, 255}
    out = tmp_path / "out"
    assert entry(["--frames", str(frames), "--first-mask", str(first), "-o", str(out), "--weights",
                  str(golden_path), "--load-size", "64", "--device", "cpu"]) == 0
    for name in ("00000.png", "00001.png"):
        assert set(np.unique(np.asarray(Image.open(out / name)))) <= {0, 1}
    assert set(np.unique(np.asarray(Image.open(out / "00000.png")))) == {0, 1}
    captured = capsys.readouterr()
    assert "object ids: 1" in captured.out
    assert captured.err.splitlines() == ["densevit-vos: propagating (2 frames)"]     # off a terminal: one line


def test_pictures_say_what_they_show():
    from densevit.apps import draw

    img = np.full((120, 200, 3), 128, np.uint8)
    plain = draw.mask_overlay(img, np.zeros((120, 200), bool) | (np.arange(200) < 100))
    full = draw.mask_overlay(img, np.ones((120, 200), bool))
    assert full.shape == plain.shape
    corner = (slice(0, 10), slice(0, 60))
    assert (full[corner] < 40).mean() > 0.5 and (plain[corner] < 40).mean() < 0.1     # the banner's dark box
    legend = draw.parts_overlay(img, np.full((120, 200), -1), 3, empty=[1])
    assert legend.shape[0] > 120 and legend.shape[1] == 200                          # a legend strip below
    bar = draw.heatmap_overlay(img, np.random.default_rng(0).random((120, 200)), title="eigenvector")
    assert bar.shape[0] > 120
    boxed = draw.discovery_overlay(img, np.ones((120, 200), bool), (10, 10, 100, 100), (50, 50))
    assert boxed.shape[0] > 120
    a = draw.correspondence_image(img, img, np.array([[10, 10], [50, 50]]), np.array([[80, 80], [80, 80]]),
                                  height=120)
    b = draw.correspondence_image(img, img, np.array([[10, 10], [50, 50]]), np.array([[80, 80], [20, 100]]),
                                  height=120)
    assert (a != b).any()
    panel = draw.pca_panel(img, np.zeros((120, 200, 3), np.uint8), "PCA caption")
    assert panel.shape[1] > 400 and panel.shape[0] > 120


@pytest.mark.parametrize("width", [1, 16, 64, 300])
def test_legends_fit_any_picture_width(width):
    from densevit.apps import draw

    img = np.full((20, width, 3), 128, np.uint8)
    assert draw.heatmap_overlay(img, np.ones((20, width)), title="eigenvector").shape[1] == width
    assert draw.discovery_overlay(img, np.ones((20, width), bool), (0, 0, width, 20), (0, 0)).shape[1] == width
    assert draw.parts_overlay(img, np.zeros((20, width), int), 3).shape[1] == width
