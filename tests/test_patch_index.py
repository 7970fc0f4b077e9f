"""The corpus patch index (densevit.storage.patch_index, densevit-index): planted neighbours for every kind, a store of
shifted copies, save / load, the contact sheet, and bad input (outside points, unknown images, another store,
a foreign or changed store of the same settings, truncated files, bad -k)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densevit.matching import knn as knn_index
from densevit.storage import patch_index as pi
from densevit.storage.store import FeatureStore, StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")

D, SIDE, N_IMAGES = 32, 8, 40          # planted store: 40 images of 8 x 8 tokens (64 x 64 px, patch = stride 8)
PLANTED = [(0, 2, 3), (17, 5, 1), (33, 0, 7)]   # (image, row, col): three near-duplicate tokens


def _settings(**kw):
    s = {"format": "densevit-store-v1", "backbone": "planted", "weights": {"source": "random"}, "patch_size": 8,
         "stride": 8, "load_size": None, "depth": 1, "layers": [0], "facets": ["key"], "model_dtype": "float32",
         "store_dtype": "float32", "saliency": False, "fast_decode": False, "mean": [0, 0, 0], "std": [1, 1, 1]}
    s.update(kw)
    return s


def _planted_store(root: Path, seed: int = 0, **settings) -> FeatureStore:
    """A store written by the real writer, holding random unit descriptors and three planted near-duplicates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(N_IMAGES, SIDE * SIDE, D, generator=g), dim=-1)
    base = x[PLANTED[0][0], PLANTED[0][1] * SIDE + PLANTED[0][2]]
    for k, (im, r, c) in enumerate(PLANTED[1:], 1):
        x[im, r * SIDE + c] = base + 0.05 * k * torch.randn(D, generator=g)
    w = StoreWriter(root, _settings(**settings))
    w.prepare()
    images = [{"key": f"im{i:02d}.png", "source": {"path": str(root / f"im{i:02d}.png")}, "image_hw": [64, 64]}
              for i in range(N_IMAGES)]
    w.write_shard("64x64-00000", {"0/key": x}, images, (64, 64), {})
    w.finalize([("64x64-00000", images)], {})
    return FeatureStore(root)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _planted_store(tmp_path_factory.mktemp("planted") / "store")


@pytest.mark.parametrize("kind", pi.KINDS)
def test_every_kind_returns_the_planted_neighbours(planted, kind, tmp_path):
    index = pi.build_index(planted, tmp_path / kind, pi.IndexConfig(kind=kind), progress=False)
    assert len(index) == N_IMAGES * SIDE * SIDE
    im, r, c = PLANTED[0]
    res = pi.search(index, f"im{im:02d}.png", points=[(c * 8 + 4, r * 8 + 4)], k=3)[0]
    assert [(m.image, m.row, m.col) for m in res] == [(f"im{i:02d}.png", rr, cc) for i, rr, cc in PLANTED]
    assert res[0].similarity == pytest.approx(1.0, abs=1e-5) and res[0].x == 4 + 8 * c and res[0].y == 4 + 8 * r
    assert res[1].similarity > res[2].similarity > 0.8


def test_flat_through_torch_without_faiss_equals_faiss(planted, tmp_path, monkeypatch):
    """Where FAISS is missing (e.g. a GPU machine with torch only), flat search runs through torch."""
    with_faiss = pi.build_index(planted, tmp_path / "faiss", pi.IndexConfig(kind="flat"), progress=False)
    q = planted.descriptors("im05.png")[:7]
    s1, i1 = with_faiss.search_vectors(q, 5)
    monkeypatch.setattr(knn_index, "faiss", None)
    torch_only = pi.build_index(planted, tmp_path / "torch", pi.IndexConfig(kind="flat"), progress=False)
    assert "vectors.npy" in torch_only.meta["files"] and torch_only.faiss_index is None
    s2, i2 = pi.load_index(tmp_path / "torch", planted, device="cpu").search_vectors(q, 5)
    assert np.allclose(s1, s2, atol=1e-3)
    # the same neighbours, except that candidates whose scores tie to round-off may come in either order (the
    # last rank is left out: it may tie with the unseen sixth)
    gap = np.abs(np.diff(s1, axis=1)) > 1e-3
    clear = np.concatenate([gap[:, :1], gap[:, :-1] & gap[:, 1:], np.zeros_like(gap[:, :1])], axis=1)
    assert clear.any() and np.array_equal(i1[clear], i2[clear])
    with pytest.raises(pi.DensevitError, match="needs FAISS"):
        pi.build_index(planted, tmp_path / "pq", pi.IndexConfig(kind="ivf-pq"), progress=False)


def test_save_load_round_trip_and_token_selection(planted, tmp_path):
    built = pi.build_index(planted, tmp_path / "i", pi.IndexConfig(kind="ivf-flat", sample_stride=2), progress=False)
    assert len(built) == N_IMAGES * 4 * 4 and set(built.ids[:, 1].tolist()) == {0, 2, 4, 6}
    loaded = pi.load_index(tmp_path / "i")
    assert np.array_equal(loaded.ids, built.ids) and loaded.meta == built.meta
    q = planted.descriptors("im03.png")[::9]
    for a, b in zip(built.search_vectors(q, 10), loaded.search_vectors(q, 10)):
        assert np.array_equal(a, b)


def test_index_refuses_another_store_and_names_a_truncated_file(planted, tmp_path):
    pi.build_index(planted, tmp_path / "i", pi.IndexConfig(kind="ivf-pq"), progress=False)
    other = _planted_store(tmp_path / "other", stride=4)
    with pytest.raises(pi.PatchIndexError, match="other settings"):
        pi.load_index(tmp_path / "i", other)
    f = tmp_path / "i" / "index.faiss"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(pi.PatchIndexError, match=r"index\.faiss is truncated"):
        pi.load_index(tmp_path / "i")
    (tmp_path / "i" / "ids.npy").unlink()
    with pytest.raises(pi.PatchIndexError, match="missing"):
        pi.load_index(tmp_path / "i")


@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory, noise_pair, golden_path):
    """A real store (golden ViT-S/8, stride 8) of a noise image and its copy shifted 16 px right, plus a
    third image."""
    from densevit.cli.extract import entry

    root = tmp_path_factory.mktemp("shifted")
    a, b = noise_pair
    (root / "images").mkdir()
    a.save(root / "images" / "a.png")
    b.save(root / "images" / "b.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(
        root / "images" / "c.png")
    code = entry([str(root / "images"), "--store", str(root / "store"), "--weights", str(golden_path), "--stride", "8",
                  "--load-size", "112", "--layer", "11", "--facet", "key", "--quiet", "--workers", "0",
                  "--store-dtype", "float32"])
    assert code == 0
    return root


def test_shifted_copy_is_found_at_the_shifted_location(shifted_store, tmp_path):
    index = pi.build_index(shifted_store / "store", tmp_path / "i", pi.IndexConfig(kind="flat"), progress=False)
    for x, y in [(60.0, 52.0), (28.0, 36.0), (92.0, 76.0)]:
        res = pi.search(index, "a.png", points=[(x, y)], k=5)[0]
        assert res[0].image == "a.png" and res[0].similarity == pytest.approx(1.0, abs=1e-5)
        in_b = next(m for m in res if m.image == "b.png")
        assert in_b.x - res[0].x == pytest.approx(16.0, abs=1e-6) and in_b.y == res[0].y


def _cli(*argv):
    from densevit.cli.index import entry

    return entry([str(a) for a in argv])


def test_cli_build_search_json_contact_sheet_and_bad_input(shifted_store, tmp_path, capsys, golden_path):
    idx, out = tmp_path / "idx", tmp_path / "out"
    assert _cli("build", shifted_store / "store", "-o", idx, "--kind", "ivf-pq", "--quiet") == 0
    assert _cli("build", shifted_store / "store", "-o", idx, "--quiet") == 2          # no overwrite without asking
    assert "--overwrite" in capsys.readouterr().err
    assert _cli("search", idx, "--image", "a.png", "--point", "60,52", "--point", "20,20", "-k", "6", "--out", out) == 0
    rec = json.loads((out / "a_matches.json").read_text())
    assert [len(q["matches"]) for q in rec["queries"]] == [6, 6]
    best = rec["queries"][0]["matches"][0]
    assert best["image"] == "a.png" and abs(best["x"] - 60) <= 4 and abs(best["y"] - 52) <= 4
    sheet = np.asarray(Image.open(out / "a_q0.png"))
    assert sheet.shape[0] > 160 and sheet.shape[1] > 6 * 160 and sheet.std() > 10
    assert (out / "a_q1.png").is_file()
    capsys.readouterr()
    # a point outside the image, an image the store does not hold (no weights / with the store's weights)
    assert _cli("search", idx, "--image", "a.png", "--point", "500,20", "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "outside the image" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    new = tmp_path / "new.png"
    Image.open(shifted_store / "images" / "b.png").save(new)
    assert _cli("search", idx, "--image", new, "--point", "60,52", "--out", tmp_path / "o3") == 2
    assert "--weights" in capsys.readouterr().err
    assert _cli("search", idx, "--image", new, "--point", "60,52", "--weights", golden_path, "-k", "3",
                "--out", tmp_path / "o4") == 0
    top = json.loads((tmp_path / "o4" / "new_matches.json").read_text())["queries"][0]["matches"][0]
    assert top["image"] == "b.png" and top["similarity"] > 0.999                        # the same picture
    # a truncated index file is named, not a crash
    f = idx / "ids.npy"
    f.write_bytes(f.read_bytes()[:50])
    assert _cli("search", idx, "--image", "a.png", "--point", "60,52", "--out", tmp_path / "o5") == 2
    err = capsys.readouterr().err
    assert "ids.npy is truncated" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ issue 21
def test_index_refuses_a_foreign_or_changed_store_of_the_same_settings(planted, tmp_path):
    """Same settings, same image keys, other descriptors: today's check (settings digest, first and last key)
    let it through and searches returned the other store's images. An identical copy still opens."""
    pi.build_index(planted, tmp_path / "i", pi.IndexConfig(kind="ivf-pq", rerank=50), progress=False)
    foreign = _planted_store(tmp_path / "foreign", seed=1)
    with pytest.raises(pi.PatchIndexError, match=r"does not hold the descriptors index .* was built from.*rebuild it: "
                                             r"densevit-index build .*foreign -o .*i --rerank 50 --overwrite"):
        pi.load_index(tmp_path / "i", foreign)
    copy = tmp_path / "copy"
    shutil.copytree(planted.root, copy)
    assert len(pi.load_index(tmp_path / "i", copy)) == N_IMAGES * SIDE * SIDE
    fewer = tmp_path / "fewer"                      # a store without one of the indexed images
    w = StoreWriter(fewer, _settings())
    w.prepare()
    ims = [{"key": f"im{i:02d}.png", "source": {"path": str(fewer / f"im{i:02d}.png")}, "image_hw": [64, 64]}
           for i in range(3)]
    w.write_shard("64x64-00000", {"0/key": torch.zeros(3, SIDE * SIDE, D)}, ims, (64, 64), {})
    w.finalize([("64x64-00000", ims)], {})
    with pytest.raises(pi.PatchIndexError, match="image im03.png, which store .* does not hold; rebuild it"):
        pi.load_index(tmp_path / "i", fewer)
    meta = json.loads((tmp_path / "i" / "index.json").read_text())      # an index made before the record
    del meta["store_content"]
    (tmp_path / "i" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(pi.PatchIndexError, match="does not record the content of its store"):
        pi.load_index(tmp_path / "i", planted)


def test_k_is_checked_and_ivf_pq_reranks_at_least_k_candidates(planted, tmp_path):
    """-k 0 / -3 ended in a FAISS AssertionError; at k >= rerank the exact re-ranking was silently skipped
    (the query's own token scored below 1)."""
    index = pi.build_index(planted, tmp_path / "i", pi.IndexConfig(kind="ivf-pq", rerank=10), progress=False)
    im, r, c = PLANTED[0]
    for k in (10, 25):                                            # k = rerank and k > rerank: exact scores
        res = pi.search(index, f"im{im:02d}.png", points=[(c * 8 + 4, r * 8 + 4)], k=k)[0]
        assert len(res) == k and (res[0].image, res[0].row, res[0].col) == (f"im{im:02d}.png", r, c)
        assert res[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert all(a.similarity >= b.similarity for a, b in zip(res, res[1:]))
    for bad in (0, -3, pi.MAX_K + 1):
        with pytest.raises(pi.DensevitError, match=f"between 1 and {pi.MAX_K}"):
            pi.search(index, "im00.png", points=[(4, 4)], k=bad)


def _extract(images: Path, store: Path, golden_path) -> None:
    from densevit.cli.extract import entry

    assert entry([str(images), "--store", str(store), "--weights", str(golden_path), "--stride", "8",
                  "--load-size", "112", "--layer", "11", "--facet", "key", "--quiet", "--workers", "0",
                  "--store-dtype", "float32"]) == 0


def test_cli_refuses_a_foreign_store_and_a_re_extracted_one(shifted_store, tmp_path, capsys, golden_path):
    """`densevit-index search idxA --store stB` labelled matches with B's images; after an image was replaced
    and re-extracted, ivf-pq search ended in an IndexError traceback and flat search gave token rows outside
    the image. Both are refused in one line naming the rebuild command."""
    imgs = tmp_path / "images"
    shutil.copytree(shifted_store / "images", imgs)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(imgs / "c.png")
    _extract(imgs, tmp_path / "storeB", golden_path)             # same settings and names, another picture
    for kind in ("flat", "ivf-pq"):
        idx = tmp_path / f"idx_{kind}"
        assert _cli("build", shifted_store / "store", "-o", idx, "--kind", kind, "--quiet") == 0
        capsys.readouterr()
        code = _cli("search", idx, "--image", "c.png", "--point", "60,52", "--store", tmp_path / "storeB",
                    "--out", tmp_path / f"o_{kind}")
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "rebuild it: densevit-index build" in err and "storeB" in err
        assert not (tmp_path / f"o_{kind}").exists()
    # an index of store B, then c.png replaced by a taller picture and re-extracted into B
    assert _cli("build", tmp_path / "storeB", "-o", tmp_path / "idxB", "--kind", "ivf-pq", "--quiet") == 0
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (600, 128, 3), dtype=np.uint8)).save(imgs / "c.png")
    _extract(imgs, tmp_path / "storeB", golden_path)
    capsys.readouterr()
    assert _cli("search", tmp_path / "idxB", "--image", "c.png", "--point", "60,52", "--out", tmp_path / "oB") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "was replaced or re-extracted" in err and "--kind ivf-pq" not in err
    assert f"densevit-index build {tmp_path / 'storeB'} -o {tmp_path / 'idxB'} --overwrite" in err


def test_cli_k_is_one_line_and_the_contact_sheet_is_bounded(shifted_store, tmp_path, capsys):
    """-k 0 / -3: FAISS AssertionError tracebacks; -k 1000000000 wrote a 63 MB contact sheet."""
    SHEET_MATCHES = 50                                  # the documented cap (densevit.cli.index, README)
    idx = tmp_path / "idx"
    assert _cli("build", shifted_store / "store", "-o", idx, "--kind", "flat", "--quiet") == 0
    for k in ("0", "-3", "1000000000"):
        capsys.readouterr()
        assert _cli("search", idx, "--image", "a.png", "--point", "60,52", "-k", k, "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"between 1 and {pi.MAX_K}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    k = SHEET_MATCHES + 10
    assert _cli("search", idx, "--image", "a.png", "--point", "60,52", "-k", k, "--out", tmp_path / "o") == 0
    rec = json.loads((tmp_path / "o" / "a_matches.json").read_text())
    assert len(rec["queries"][0]["matches"]) == k                                  # the JSON holds all k
    sheet = Image.open(tmp_path / "o" / "a_q0.png").size
    assert _cli("search", idx, "--image", "a.png", "--point", "60,52", "-k", 5, "--out", tmp_path / "o5") == 0
    one_row = Image.open(tmp_path / "o5" / "a_q0.png").size                        # the query + 5: one row of 6
    rows = -(-(SHEET_MATCHES + 1) // 6)                                             # the query + the best 50
    assert sheet == (one_row[0], rows * one_row[1])


def test_default_nprobe_is_a_quarter_of_the_lists_at_least_16_and_a_given_one_wins(planted, tmp_path):
    """Issue 37: nprobe 16 gave recall@10 0.30-0.35 on the 1-100 M synthetic benchmark; the default now probes a
    ``PROBE_SHARE``-th of the lists (at least 16, or all). A given --nprobe is used as it is."""
    assert pi.IndexConfig().probes(4096) == 4096 // pi.PROBE_SHARE
    assert pi.IndexConfig().probes(32) == 16 and pi.IndexConfig().probes(8) == 8
    assert pi.IndexConfig(nprobe=16).probes(4096) == 16 and pi.IndexConfig(nprobe=64).probes(32) == 32
    assert pi._default_nlist(10**8) == pi.MAX_DEFAULT_NLIST == 4096 and pi._default_nlist(10**5) == 1024
    index = pi.build_index(planted, tmp_path / "i", pi.IndexConfig(kind="ivf-pq", nlist=128), progress=False)
    assert index.config.nprobe is None
    im, r, c = PLANTED[0]
    pi.search(index, f"im{im:02d}.png", points=[(c * 8 + 4, r * 8 + 4)], k=3)
    assert index.faiss_index.nprobe == 128 // pi.PROBE_SHARE                     # what FAISS searched with
    index.meta["config"]["nprobe"] = 16                                            # an index built with --nprobe 16
    pi.search(index, f"im{im:02d}.png", points=[(c * 8 + 4, r * 8 + 4)], k=3)
    assert index.faiss_index.nprobe == 16
