"""Checkpoints in Hugging Face transformers' layout load exactly: transformers' own ``Dinov2Model``,
``Dinov2WithRegistersModel`` and ``DINOv3ViTModel`` (configurations of dinov2_vits14 / dinov2_vits14_reg /
dinov3_vits16, seeded random weights with every bias and layer scale perturbed so none is trivial), saved with
``save_pretrained`` into ``tmp_path`` and loaded through densevit, give transformers' per-layer hidden states and
``last_hidden_state`` per token (cosine >= 0.99999) on the example cat photograph.

Positional resampling: transformers' ``Dinov2Model`` resamples its position embedding bicubically *by size*,
the official DINOv2 code (which densevit follows) *by scale factor* (+0.1); the two agree only at the
checkpoint's own grid, 37 x 37 (518 x 518 pixels), where neither resamples, so the model without registers is
compared there. ``Dinov2WithRegistersModel`` resamples by size with antialiasing, as the official register models
do, and DINOv3 has no position table (RoPE): both are compared at a smaller, non-square size.
"""
import pytest
import transformers
import numpy as np
import torch
from PIL import Image

from densevit import ViTExtractor, get_spec
from densevit.models.registry import HF_REPOS, IMAGENET_MEAN, IMAGENET_STD



S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
CASES = {
    "dinov2_vits14": ("Dinov2Config", "Dinov2Model", S14, (518, 518)),
    "dinov2_vits14_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                          dict(S14, num_register_tokens=4), (196, 252)),
    "dinov3_vits16": ("DINOv3ViTConfig", "DINOv3ViTModel", dict(num_register_tokens=4), (160, 224)),
}


def _image(shared, hw):
    img = Image.open(shared / "data" / "images" / "cat.jpg").convert("RGB").resize(hw[::-1], Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]


def _hf_model(name, folder):
    cfg_cls, model_cls, kw, _ = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "mask_token" not in n:          # biases, layer scales, norms, tokens: all non-trivial
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    return model


def _min_cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_checkpoint_reproduces_transformers(name, shared, tmp_path):
    ref = _hf_model(name, tmp_path / "hf")
    x = _image(shared, CASES[name][3])
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    ext = ViTExtractor(name, stride=get_spec(name).patch_size, weights=tmp_path / "hf", device="cpu")
    depth = ext.depth
    feats = ext.extract(x, tuple(range(depth)), ("token", "token_norm"), include_cls=True)
    hidden = out.hidden_states[-depth:]                    # each block's output (transformers adds the embeddings)
    P = ext.num_prefix_tokens                              # CLS, registers, then patches in both
    keep = lambda t: torch.cat([t[:, :1], t[:, P:]], dim=1)  # noqa: E731  densevit drops registers
    cos = [_min_cos(feats.descriptors[(i, "token")], keep(hidden[i])) for i in range(depth)]
    last = _min_cos(feats.descriptors[(depth - 1, "token_norm")], keep(out.last_hidden_state))
    print(f"{name}: 1 - min per-token cosine: blocks {1 - min(cos):.2e}, last_hidden_state {1 - last:.2e}")
    assert min(cos) >= 0.99999 and last >= 0.99999, (cos, last)


def test_model_safetensors_alone_and_hub_alias(shared, tmp_path):
    """The ``model.safetensors`` of a transformers folder loads on its own (no config.json), and the Hub id is an
    alias of the registry name."""
    _hf_model("dinov3_vits16", tmp_path / "hf")
    (tmp_path / "alone").mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "alone" / "model.safetensors")
    a = ViTExtractor(HF_REPOS["dinov3_vits16"], weights=tmp_path / "alone" / "model.safetensors", device="cpu")
    assert a.spec.name == "dinov3_vits16"
    b = ViTExtractor("dinov3_vits16", weights=tmp_path / "alone" / "model.safetensors", device="cpu")
    x = _image(shared, (64, 80))
    assert torch.equal(a.extract(x, (11,), ("token",)).descriptors[(11, "token")],
                       b.extract(x, (11,), ("token",)).descriptors[(11, "token")])


def test_strict_rule_and_config(tmp_path):
    """The transformers converters keep the strict rule: DINOv3's key bias must be zero, a tensor the backbone
    has no place for is an error unless zero, another family's checkpoint names the backbones that fit; the RoPE
    periods follow the folder's ``rope_theta``."""
    from safetensors.torch import load_file, save_file

    from densevit import DensevitError, load_backbone

    cfg = transformers.DINOv3ViTConfig(num_register_tokens=4, key_bias=True, rope_theta=50.0)
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(cfg).save_pretrained(tmp_path / "v3")    # zero biases: the key bias loads
    model, _ = load_backbone("dinov3_vits16", tmp_path / "v3")
    torch.testing.assert_close(model.rope.periods, 50.0 ** torch.arange(0, 1, 4 / 64), rtol=0, atol=0)
    sd = load_file(str(tmp_path / "v3" / "model.safetensors"))
    sd["layer.3.attention.k_proj.bias"] = torch.full((384,), 0.1)
    save_file(sd, str(tmp_path / "v3" / "model.safetensors"))
    with pytest.raises(DensevitError, match=r"blocks\.3\.attn\.qkv\.bias: the key bias is not zero"):
        load_backbone("dinov3_vits16", tmp_path / "v3")
    sd["layer.3.attention.k_proj.bias"] = torch.zeros(384)
    sd["pooler.dense.weight"] = torch.ones(2, 2)
    save_file(sd, str(tmp_path / "v3" / "model.safetensors"))
    with pytest.raises(DensevitError, match="unexpected key 'pooler.dense.weight'"):
        load_backbone("dinov3_vits16", tmp_path / "v3")
    with pytest.raises(DensevitError, match="transformers DINOv3ViTModel checkpoint, not one of dinov2_vits14; "
                                            "use backbone dinov3_vits16 or dinov3_vits16plus"):
        load_backbone("dinov2_vits14", tmp_path / "v3")


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_in_memory_state_dict_names(name, tmp_path):
    """``torch.save(model.state_dict())`` of a transformers >= 5 model (its in-memory names: ``q_proj``,
    ``o_proj``, DINOv3's ``model.layer``) loads to the same weights as its ``save_pretrained`` folder."""
    from densevit import load_backbone

    model = _hf_model(name, tmp_path / "hf")
    torch.save(model.state_dict(), tmp_path / "memory.pth")
    assert any(".q_proj." in k for k in model.state_dict())
    a, _ = load_backbone(name, tmp_path / "memory.pth")
    b, _ = load_backbone(name, tmp_path / "hf")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_swiglu_dinov2_converts_to_the_official_w12_w3(tmp_path):
    """DINOv2 ViT-g's SwiGLU in transformers' layout (``weights_in`` / ``weights_out`` in the file,
    ``gate/up/down_proj`` in memory) becomes the official ``w12`` / ``w3``, packed gate first."""
    from safetensors.torch import load_file

    from densevit.models.convert_hf import dinov2_to_official

    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                                    image_size=28, use_swiglu_ffn=True)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(cfg)
    model.save_pretrained(tmp_path)
    from_file = dinov2_to_official(load_file(str(tmp_path / "model.safetensors")), {})
    from_memory = dinov2_to_official(model.state_dict(), {})
    assert from_file.keys() == from_memory.keys() and all(torch.equal(from_file[k], from_memory[k]) for k in from_file)
    mlp = model.encoder.layer[0].mlp
    assert torch.equal(from_file["blocks.0.mlp.w12.weight"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(from_file["blocks.0.mlp.w3.weight"], mlp.down_proj.weight)
    assert not any(k.startswith("encoder.") for k in from_file)
