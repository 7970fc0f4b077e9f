"""PCK@alpha against hand-computed cases.

Convention (documented in densevit.eval.metrics.pck): a point is correct iff dist <= alpha * max(h, w) of the target
box (inclusive, as DHPF/CATs' ``torch.le``); points missing in either image are skipped.
"""
import json
import math

import pytest
import torch

from densevit.eval.metrics.pck import (
    PairRecord,
    bbox_size,
    format_table,
    image_size,
    keypoint_distances,
    pck,
    pck_counts,
    summarize,
    valid_points,
    write_csv,
)

BOX = (10, 20, 210, 120)           # 200 x 100 -> size 200: thresholds 10, 20, 30 at alpha .05/.1/.15


def test_sizes():
    assert bbox_size(BOX) == 200.0
    assert bbox_size((0, 0, 50, 80)) == 80.0
    assert image_size((480, 854)) == 854.0


def test_perfect_transfer_is_one():
    gt = torch.tensor([[15.0, 25.0], [100.0, 60.0], [200.0, 110.0]])
    for alpha in (0.05, 0.1, 0.15):
        assert pck(gt.clone(), gt, bbox_size(BOX), alpha) == 1.0


def test_off_by_exactly_the_threshold_is_correct():
    gt = torch.tensor([[50.0, 50.0], [80.0, 40.0]], dtype=torch.float64)
    # 3-4-5 triangles: distances exactly 20 (= 0.1 * 200) and just above it.
    pred = gt + torch.tensor([[12.0, 16.0], [12.0, 16.0 + 1e-9]], dtype=torch.float64)
    assert pck(pred, gt, 200.0, 0.1) == 0.5                   # inclusive at the threshold, not beyond it
    assert pck(pred, gt, 200.0, 0.05) == 0.0                  # 20 > 10
    assert pck(pred, gt, 200.0, 0.15) == 1.0                  # both < 30
    correct, n = pck_counts(keypoint_distances(pred, gt), 200.0, (0.05, 0.1, 0.15))
    assert n == 2 and correct.tolist() == [0, 1, 2]


def test_missing_points_are_skipped():
    gt = torch.tensor([[10.0, 10.0], [-1.0, -1.0], [float("nan"), 5.0], [30.0, 30.0], [40.0, 40.0]])
    src_ok = torch.tensor([True, True, True, True, False])   # last point absent in the source image
    pred = torch.tensor([[10.0, 10.0], [0.0, 0.0], [0.0, 0.0], [90.0, 90.0], [40.0, 40.0]])
    d = keypoint_distances(pred, gt, src_ok)
    assert torch.isnan(d[1:3]).all() and torch.isnan(d[4])
    assert pck(pred, gt, 100.0, 0.1, src_ok) == 0.5           # 2 valid points, 1 correct
    assert valid_points(torch.tensor([[0.0, 0.0], [-2.0, 3.0], [1.0, float("inf")]])).tolist() == [True, False, False]
    assert math.isnan(pck(pred[1:3], gt[1:3], 100.0))         # nothing valid -> NaN, not 0


def test_per_point_vs_per_image_and_categories(tmp_path):
    # pair a: 1 of 1 correct; pair b: 1 of 3 correct (same category) ; pair c (other category): 0 of 2.
    a = PairRecord("a", "cat", [0.0], 100.0, 500.0, {"mirror": 0})
    b = PairRecord("b", "cat", [5.0, 50.0, 60.0, None], 100.0, 500.0, {"mirror": 1})
    c = PairRecord("c", "dog", [30.0, 40.0], 100.0, 500.0, {"mirror": 0})
    empty = PairRecord("e", "dog", [None], 100.0, 500.0, {})
    rows = {r.group: r for r in summarize([a, b, c, empty], alphas=(0.1,), breakdown=("mirror",))}
    assert rows["cat"].per_point[0.1] == pytest.approx(2 / 4)
    assert rows["cat"].per_image[0.1] == pytest.approx((1 + 1 / 3) / 2)
    assert rows["dog"].n_pairs == 1 and rows["dog"].per_point[0.1] == 0.0   # the empty pair is left out
    assert rows["all"].n_points == 6 and rows["all"].per_point[0.1] == pytest.approx(2 / 6)
    assert rows["all"].per_image[0.1] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert rows["mean"].per_point[0.1] == pytest.approx((0.5 + 0.0) / 2)
    assert rows["mirror=1"].per_point[0.1] == pytest.approx(1 / 3)
    # image threshold: 0.1 * 500 = 50 -> b has 5 and 50 correct (inclusive), c all correct
    rows_img = {r.group: r for r in summarize([a, b, c], alphas=(0.1,), threshold="image")}
    assert rows_img["all"].per_point[0.1] == pytest.approx(5 / 6)
    write_csv(list(rows.values()), tmp_path / "pck.csv", (0.1,))
    lines = (tmp_path / "pck.csv").read_text().splitlines()
    assert lines[0] == "group,n_pairs,n_points,pck_point@0.1,pck_image@0.1"
    assert "all,3,6,0.333333,0.444444" in lines
    assert "all" in format_table(list(rows.values()), (0.1,))


def test_record_json_roundtrip():
    r = PairRecord.from_prediction("p", "cat", torch.tensor([[0.0, 0.0], [3.0, 4.0]]),
                                   torch.tensor([[0.0, 0.0], [-1.0, -1.0]]), 10.0, 20.0, flags={"mirror": 1})
    assert r.dist == [0.0, None]
    assert PairRecord.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_results_log_resumes_and_refuses_other_settings(tmp_path):
    from densevit.errors import DensevitError
    from densevit.eval.keypoints import ResultsLog

    out = tmp_path / "run"
    log = ResultsLog(out, {"layer": 9, "limit": 2}, volatile=("limit",))
    log.add(PairRecord("a", "cat", [1.0], 10.0, 20.0))
    log._log.close()
    with open(out / "records.jsonl", "a") as f:
        f.write('{"name": "b", "categ')                                  # a run killed mid-write
    log = ResultsLog(out, {"layer": 9, "limit": 5}, volatile=("limit",))
    assert log.done("a") and not log.done("b")
    log.add(PairRecord("b", "cat", [3.0], 10.0, 20.0))
    table = log.finish(["a", "b"], alphas=(0.1, 0.5))
    assert "all" in table and (out / "pck.csv").is_file() and (out / "pck.txt").is_file()
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["pairs"] == 2 and summary["all"]["per_point"] == {"0.1": 0.5, "0.5": 1.0}
    with pytest.raises(DensevitError, match="other settings"):
        ResultsLog(out, {"layer": 11, "limit": 5}, volatile=("limit",))
    log = ResultsLog(out, {"layer": 11}, overwrite=True)
    assert not log.done("a") and (out / "records.jsonl").read_text() == ""
