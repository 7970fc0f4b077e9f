"""Weight resolution: explicit files, $DENSEVIT_WEIGHTS, official layouts, random, and clear errors."""
import os
import re

import pytest
import torch

from densevit import BACKBONES, DensevitError, ViTExtractor, WeightsNotFoundError, load_backbone
from densevit.models.weights import create_model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_weights_dir_conventional_name(tmp_path, monkeypatch, golden_path):
    os.symlink(golden_path, tmp_path / "dino_deitsmall8_pretrain.pth")
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(tmp_path))
    from_dir, _ = load_backbone("dino_vits8")
    explicit, _ = load_backbone("dino_vits8", golden_path)
    assert same_weights(from_dir, explicit)


def test_dino_full_checkpoint_and_safetensors(tmp_path, golden_path):
    from safetensors.torch import save_file

    sd = torch.load(golden_path, weights_only=True)
    full = {"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.zeros(2, 2)},
            "epoch": 100}
    torch.save(full, tmp_path / "full.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    ref, _ = load_backbone("dino_vits8", golden_path)
    assert same_weights(load_backbone("dino_vits8", tmp_path / "full.pth")[0], ref)
    assert same_weights(load_backbone("dino_vits8", tmp_path / "w.safetensors")[0], ref)


def test_dinov2_official_layout_with_registers(tmp_path):
    """An official DINOv2 (+registers) checkpoint loads and gives the same features as the timm model it came from."""
    spec = BACKBONES["dinov2_vits14_reg"]
    torch.manual_seed(0)
    timm_model = create_model(spec).eval()
    sd = timm_model.state_dict()
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    pos0 = torch.randn(1, 1, 384) * 0.02
    official["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    official["cls_token"] = sd["cls_token"] - pos0
    official["register_tokens"] = sd["reg_token"]
    official["mask_token"] = torch.zeros(1, 384)
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    ext = ViTExtractor("dinov2_vits14_reg", stride=7, weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth", device="cpu")
    for k, v in sd.items():
        torch.testing.assert_close(ext.model.state_dict()[k], v, msg=k)
    x = torch.randn(1, 3, 70, 84)
    feats = ext.extract(x, (11,), ("token", "key"), saliency=True)
    assert feats.descriptors[(11, "token")].shape == (1, 9 * 11, 384)  # registers and CLS dropped
    assert feats.saliency.shape == (1, 99)


def test_errors_name_the_problem(tmp_path, golden_path):
    sd = torch.load(golden_path, weights_only=True)
    bad_shape = dict(sd, **{"blocks.3.mlp.fc1.weight": torch.zeros(3, 3)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(DensevitError, match=r"'blocks.3.mlp.fc1.weight' has shape \(3, 3\)"):
        load_backbone("dino_vits8", tmp_path / "shape.pth")
    missing = {k: v for k, v in sd.items() if k != "norm.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(DensevitError, match="missing key 'norm.bias'"):
        load_backbone("dino_vits8", tmp_path / "missing.pth")
    with pytest.raises(DensevitError, match="do not fit dino_vits16.*they fit backbone dino_vits8"):
        load_backbone("dino_vits16", golden_path)             # discover's default backbone: the fitting one named
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DensevitError, match="cannot read weights"):
        load_backbone("dino_vits8", tmp_path / "junk.pth")
    with pytest.raises(DensevitError, match="not found"):
        load_backbone("dino_vits8", tmp_path / "nope.pth")
    with pytest.raises(DensevitError, match="unknown backbone"):
        load_backbone("dino_vitz8")


def test_offline_without_weights_gives_actionable_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("DENSEVIT_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never download in a test
    with pytest.raises(WeightsNotFoundError, match="weights='FILE'.*DENSEVIT_WEIGHTS.*weights='random'") as info:
        load_backbone("dino_vits16")
    assert "\n" not in str(info.value) and "--weights" not in str(info.value)
    assert re.search("--weights FILE.*DENSEVIT_WEIGHTS.*--weights random", info.value.cli_message)
    assert "\n" not in info.value.cli_message


def test_random_weights_are_seeded():
    a, _ = load_backbone("dino_vits16", "random")
    b, _ = load_backbone("dino_vits16", "random")
    assert same_weights(a, b)


# Up to ViT-L here (a random timm init of ViT-g / H+ / 7B is 4-27 GB): tests/test_large_backbones.py builds and
# runs those through the loader.
@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.embed_dim * s.depth <= 1024 * 24])
def test_every_backbone_builds_and_extracts(name):
    spec = BACKBONES[name]
    ext = ViTExtractor(name, stride=spec.patch_size // 2, weights="random", device="cpu")
    assert (ext.depth, ext.num_heads, ext.model.embed_dim) == (spec.depth, spec.num_heads, spec.embed_dim)
    p = spec.patch_size
    x = torch.randn(1, 3, 3 * p, 4 * p)
    feats = ext.extract(x, (0, -1), ("key", "token"), bin=True, saliency=True)
    h, w = feats.grid.shape
    assert (h, w) == (5, 7)
    assert feats.descriptors[(0, "key")].shape == (1, 35, 17 * spec.embed_dim)
    assert torch.isfinite(feats.saliency).all()


@pytest.mark.parametrize("name, file", [("dino_vits8", "vits8_random_fp16.pth"),
                                        ("dinov2_vits14_reg", "dinov2_vits14_reg_random_official_fp16.pth"),
                                        ("dinov3_vits16", "dinov3_vits16_random_official_fp16.pth")])
def test_loading_builds_on_the_meta_device_and_equals_a_loaded_random_model(shared, name, file):
    """A model whose weights are loaded is built without initialising anything (meta device, assign=True); its
    parameters and every buffer (non-persistent ones included: RoPE periods, Eva's zero key bias) equal those of
    a randomly initialised model loaded with the same file, and so do its outputs."""
    from densevit.models.weights import load_weights_file

    path = shared / "golden" / file
    spec = BACKBONES[name]
    meta = create_model(spec, "meta")
    assert all(p.is_meta for p in meta.parameters())
    load_weights_file(meta, spec, path)
    plain = create_model(spec)
    load_weights_file(plain, spec, path)
    tensors = lambda m: dict([*m.named_parameters(), *m.named_buffers()])   # noqa: E731
    tm, tp = tensors(meta), tensors(plain)
    assert tm.keys() == tp.keys()
    for k in tm:
        assert not tm[k].is_meta and tm[k].device.type == "cpu" and tm[k].dtype == tp[k].dtype, k
        assert torch.equal(tm[k], tp[k]), k
    assert all(p.requires_grad for p in meta.parameters())
    x = torch.randn(1, 3, *plain.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meta.eval().forward_features(x), plain.eval().forward_features(x))
    built, _ = load_backbone(name, path)
    assert same_weights(built, plain) and not any(t.is_meta for t in tensors(built).values())


def test_weights_fingerprint_of_a_transformers_folder(tmp_path, golden_path):
    """A folder given as weights is identified by its checkpoint file's bytes, as a file is (stores record it)."""
    import shutil

    from densevit.io.files import file_sha256
    from densevit.storage.extract import weights_fingerprint

    (tmp_path / "saved").mkdir()
    shutil.copy(golden_path, tmp_path / "saved" / "pytorch_model.bin")
    got = weights_fingerprint(str(tmp_path / "saved"), "dino_vits8")
    assert got == {"source": "file", "name": "saved", "size": golden_path.stat().st_size,
                   "sha256": file_sha256(golden_path)}
    assert weights_fingerprint(str(golden_path), "dino_vits8")["sha256"] == got["sha256"]


def test_a_new_family_is_a_registry_row_and_a_layout(tmp_path, monkeypatch):
    """A toy family whose official files name the trunk ``trunk.`` and the blocks ``layers``: one registry row and
    one layout entry (densevit.models.layouts), no other table, and it loads and extracts like the timm layout."""
    from densevit.models.layouts import LAYOUTS, Layout
    from densevit.models.posenc import TIMM
    from densevit.models.registry import BackboneSpec

    def toy_to_timm(sd, model):
        return {k.replace("trunk.layers.", "blocks.").replace("trunk.", ""): v for k, v in sd.items()}, {}

    monkeypatch.setitem(LAYOUTS, "toy", Layout("toy", toy_to_timm))
    monkeypatch.setitem(BACKBONES, "toy_vits16", BackboneSpec("toy_vits16", "vit_small_patch16_224", "toy", 16, 384,
                                                               12, 6, "toy", pos=TIMM, layout="toy"))

    torch.manual_seed(0)
    ref_model = create_model(BACKBONES["sup_vits16"])
    sd = ref_model.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    torch.save({"trunk." + k.replace("blocks.", "layers.", 1): v for k, v in sd.items()}, tmp_path / "toy.pth")
    model, spec = load_backbone("toy_vits16", weights=tmp_path / "toy.pth")
    assert spec.layout == "toy" and same_weights(model, ref_model)
    image = torch.rand(1, 3, 64, 48)
    toy = ViTExtractor("toy_vits16", weights=str(tmp_path / "toy.pth"), device="cpu").extract(image, layers=[11])
    ref = ViTExtractor("sup_vits16", weights=str(tmp_path / "timm.pth"), device="cpu").extract(image, layers=[11])
    assert torch.equal(toy.descriptors[(11, "key")], ref.descriptors[(11, "key")])
    with pytest.raises(DensevitError, match="missing key"):      # the strict fit check holds for the new layout
        torch.save({k: v for k, v in torch.load(tmp_path / "toy.pth").items() if "layers.3." not in k},
                   tmp_path / "bad.pth")
        load_backbone("toy_vits16", weights=tmp_path / "bad.pth")
