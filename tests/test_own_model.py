"""Bring your own model (``ViTExtractor(model=module)``): a timm module gives exactly the descriptors of the
registry build with the same weights; an official DINO / DINOv2 / DINOv3 module (here: a module bearing the
official state dict of the shared golden fixtures, as the official hub classes do) is converted exactly."""
import pytest
import timm
import torch
from torch import nn

from densevit import DensevitError, ViTExtractor
from densevit.models.posenc import DINOV2_REG
from densevit.models.weights import read_state_dict

FACETS = ("key", "query", "value", "token", "token_norm", "attn", "key_rope")
GOLDEN = {"dino_vits8": ("vits8_random_fp16.pth", "vit_small_patch8_224"),
          "dinov2_vits14_reg": ("dinov2_vits14_reg_random_official_fp16.pth", "vit_small_patch14_reg4_dinov2"),
          "dinov3_vits16": ("dinov3_vits16_random_official_fp16.pth", "vit_small_patch16_dinov3_qkvb")}


def same_outputs(a: ViTExtractor, b: ViTExtractor) -> None:
    p = a.patch_size
    x = torch.randn(1, 3, 4 * p, 5 * p, generator=torch.Generator().manual_seed(0))
    fa = a.extract(x, (1, -1), FACETS, saliency=True)
    fb = b.extract(x, (1, -1), FACETS, saliency=True)
    assert fa.descriptors.keys() == fb.descriptors.keys()
    for k in fa.descriptors:
        assert torch.equal(fa.descriptors[k], fb.descriptors[k]), k
    for k in fa.cls:
        assert torch.equal(fa.cls[k], fb.cls[k]), k
    assert torch.equal(fa.saliency, fb.saliency)
    assert torch.equal(a.extract(x, (2,), ("key",), bin=True).descriptors[(2, "key")],
                       b.extract(x, (2,), ("key",), bin=True).descriptors[(2, "key")])


def registry(shared, name: str) -> ViTExtractor:
    return ViTExtractor(name, weights=str(shared / "golden" / GOLDEN[name][0]), device="cpu")


@pytest.mark.parametrize("name", list(GOLDEN))
def test_timm_module_equals_the_registry_build(shared, name):
    ref = registry(shared, name)
    module = timm.create_model(GOLDEN[name][1], pretrained=False, num_classes=0)
    module.load_state_dict(ref.model.state_dict())
    if hasattr(module, "rope"):                      # timm keeps DINOv3's RoPE periods out of the state dict
        module.rope.periods = ref.model.rope.periods.clone()
    own = ViTExtractor(model=module, device="cpu")
    assert own.model is module and own.spec.name == name and own.spec.pos == ref.spec.pos
    assert (own.spec.mean, own.spec.saliency_heads, own.depth) == (ref.spec.mean, ref.spec.saliency_heads, ref.depth)
    same_outputs(ref, own)


class StateDictModule(nn.Module):
    """A module whose ``state_dict()`` is a given official checkpoint, nested as the official classes nest it."""

    def __init__(self, state):
        super().__init__()
        for key, value in state.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(value.float(), requires_grad=False))


@pytest.mark.parametrize("name", list(GOLDEN))
def test_official_module_converted_exactly(shared, name):
    state = read_state_dict(shared / "golden" / GOLDEN[name][0])
    own = ViTExtractor(model=StateDictModule(state), device="cpu")
    assert own.spec.name == name
    same_outputs(registry(shared, name), own)


def test_backbone_names_the_conventions_of_an_own_model(shared):
    ref = registry(shared, "dinov2_vits14_reg")
    module = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)
    module.load_state_dict(ref.model.state_dict())
    own = ViTExtractor("dinov2_vits14_reg", model=module, device="cpu")
    assert own.spec.pos == DINOV2_REG
    same_outputs(ref, own)
    other = ViTExtractor("dinov2_vits14", model=module, device="cpu")   # DINOv2's +0.1 rule: not the same
    x = torch.randn(1, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(other.extract(x, (11,), ("token",)).descriptors[(11, "token")],
                           own.extract(x, (11,), ("token",)).descriptors[(11, "token")])


def test_own_model_errors(shared):
    module = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0)
    with pytest.raises(DensevitError, match="eva"):
        ViTExtractor("dino_vits16", model=module, device="cpu")
    with pytest.raises(DensevitError, match="either model= or weights="):
        ViTExtractor(model=module, weights="random", device="cpu")
    with pytest.raises(DensevitError, match="official DINO"):
        ViTExtractor(model=nn.Linear(3, 3), device="cpu")
    state = read_state_dict(shared / "golden" / GOLDEN["dinov3_vits16"][0])
    state["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"].float() + 1   # key bias made nonzero
    state.pop("blocks.0.attn.qkv.bias_mask")
    with pytest.raises(DensevitError, match="key bias"):
        ViTExtractor(model=StateDictModule(state), device="cpu")
