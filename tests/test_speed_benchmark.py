"""The speed benchmark script: its FLOP count, and a short CPU run of the propagation and extraction rows."""
import json
import sys

import pytest

from densevit.io.paths import golden_weights, shared_dir

needs_data = pytest.mark.skipif(not golden_weights().is_file() or not (shared_dir() / "data" / "davis2016").is_dir(),
                                reason="golden weights or shared DAVIS subset not available")


@pytest.fixture(scope="module")
def speed():
    import importlib.util

    from densevit.io.paths import repo_root

    spec = importlib.util.spec_from_file_location("speed_benchmark", repo_root() / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                                    # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_flop_count_of_vits8_stride4(speed):
    from densevit import ViTExtractor

    ext = ViTExtractor("dino_vits8", stride=4, weights="random", device="cpu")
    T, C = 55 * 55 + 1, 384                                          # 224 px, stride 4: 55 x 55 patches + CLS
    block = 2 * (T * C * 3 * C + T * C * C + 2 * T * C * 4 * C) + 2 * 2 * T * T * C
    embed = 2 * 55 * 55 * 3 * 8 * 8 * C
    assert speed.forward_flops(ext, (224, 224), 10, 2) == 2 * (embed + 10 * block)


def test_flop_count_of_dinov3_vits16plus_swiglu(speed):
    from densevit import ViTExtractor

    ext = ViTExtractor("dinov3_vits16plus", stride=16, weights="random", device="cpu")
    T, C, H = 14 * 14 + 5, 384, 1536                                 # CLS + 4 storage tokens; SwiGLU: 3 matrices
    block = 2 * (T * C * 3 * C + T * C * C + 3 * T * C * H) + 2 * 2 * T * T * C
    embed = 2 * 14 * 14 * 3 * 16 * 16 * C
    assert speed.forward_flops(ext, (224, 224), 12, 1) == embed + 12 * block


@needs_data
def test_extraction_row_measures_overhead_and_memory(speed, one_thread):
    cfg = speed.Config("extract", load_size=64, layer=9, bin=True)
    r = speed.bench_extract(cfg, str(golden_weights()), speed.select_device("cpu"), 0, 1)
    assert r.unit == "img/s" and r.throughput > 0 and r.forward_throughput > 0
    assert r.overhead_pct == pytest.approx(100 * (r.forward_throughput / r.throughput - 1))
    assert r.peak_mem_gib > 0.1 and r.gflop > 0 and r.tflops > 0


@needs_data
def test_script_runs_propagation_row_and_writes_json(speed, tmp_path, capsys, one_thread):
    out = tmp_path / "speed.json"
    assert speed.main(["--device", "cpu", "--only", "vos dino_vits16", "--frames", "3", "--quick",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["threads"] == 1 and len(res["results"]) == 1
    row = res["results"][0]
    assert row["config"]["kind"] == "vos" and row["unit"] == "frame/s" and row["extra"]["frames"] == 3
    assert row["extra"]["tokens"] == 30 * 52                        # 480 x 832 input, patch 16
    assert row["throughput"] > 0 and row["forward_throughput"] > row["throughput"] * 0.5
    assert row["extra"]["decode_ms_per_frame"] > 0
    assert "vos dino_vits16 s16 480p" in capsys.readouterr().out
