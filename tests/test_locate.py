"""The one checkpoint search: $DENSEVIT_WEIGHTS first, then torch.hub's checkpoint folder ($TORCH_HOME)."""
from densevit.models.locate import checkpoint_dirs, describe_search, find_checkpoint


def test_search_order_env_then_torch_hub(tmp_path, monkeypatch):
    env, home = tmp_path / "env", tmp_path / "torch"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    env.mkdir()
    monkeypatch.setenv("DENSEVIT_WEIGHTS", str(env))
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert checkpoint_dirs() == [env, home / "hub" / "checkpoints"]
    assert find_checkpoint(["a.pth"]) is None
    (home / "hub" / "checkpoints" / "a.pth").write_bytes(b"x")
    assert find_checkpoint(["b.pth", "a.pth"]) == home / "hub" / "checkpoints" / "a.pth"
    (env / "a.pth").write_bytes(b"y")
    assert find_checkpoint(["a.pth"]) == env / "a.pth"
    assert str(home / "hub" / "checkpoints") in describe_search(["a.pth"])
    monkeypatch.delenv("DENSEVIT_WEIGHTS")
    assert checkpoint_dirs() == [home / "hub" / "checkpoints"]
    assert "(unset)" in describe_search(["a.pth", "b.pth"])


# ---------------------------------------------------------------- the whole search, as load_backbone runs it
import re  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from densevit import WeightsNotFoundError, load_backbone  # noqa: E402
from densevit.models import locate  # noqa: E402
from densevit.models.registry import get_spec  # noqa: E402
from densevit.models.weights import find_local_weights  # noqa: E402

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy")


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty places: no $DENSEVIT_WEIGHTS, a fresh TORCH_HOME and HF_HOME, the Hub offline by setting."""
    for var in ("DENSEVIT_WEIGHTS", "HF_HUB_CACHE", "HF_ENDPOINT") + PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def hf_cache_file(repo: str, src, name: str = "model.safetensors"):
    """Put ``src`` into the Hugging Face cache as ``repo``'s ``name`` at a snapshot that ``refs/main`` names,
    laid out as huggingface_hub lays out its cache (folder name from its own ``repo_folder_name``)."""
    from huggingface_hub.file_download import repo_folder_name

    root = locate.hf_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in ([src] if not src.is_dir() else sorted(src.iterdir())):
        (snap / (name if not src.is_dir() else f.name)).write_bytes(f.read_bytes())
    return snap / name


def golden_safetensors(golden_path, out):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in torch.load(golden_path, weights_only=True).items()}, str(out))
    return out


def test_torch_hub_folder_under_the_official_name(places, golden_path):
    hub = places / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "dino_deitsmall8_pretrain.pth").symlink_to(golden_path)
    found, _ = load_backbone("dino_vits8")
    ref, _ = load_backbone("dino_vits8", golden_path)
    assert find_local_weights(get_spec("dino_vits8")) == hub / "dino_deitsmall8_pretrain.pth"
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), ref.state_dict().values()))


def test_hf_cache_timm_repo_then_transformers_repo_and_order(places, golden_path):
    from huggingface_hub import scan_cache_dir

    spec = get_spec("dino_vits8")
    timm_file = hf_cache_file(f"timm/{spec.hub_name}", golden_safetensors(golden_path, places / "g.safetensors"))
    assert {r.repo_id for r in scan_cache_dir(locate.hf_cache_dir()).repos} == {f"timm/{spec.hub_name}"}
    assert find_local_weights(spec) == timm_file
    model, _ = load_backbone("dino_vits8")
    ref, _ = load_backbone("dino_vits8", golden_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    hub = places / "torch" / "hub" / "checkpoints"                  # torch.hub's folder comes before the HF cache
    hub.mkdir(parents=True)
    (hub / "dino_deitsmall8_pretrain.pth").symlink_to(golden_path)
    assert find_local_weights(spec) == hub / "dino_deitsmall8_pretrain.pth"


def test_hf_cache_official_transformers_repo(places):
    """A ``facebook/dinov2-small`` checkpoint in transformers' layout in the HF cache is found (and its Hub id
    names the backbone); timm's repository, when also cached, comes first."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                    image_size=518)
    transformers.Dinov2Model(cfg).save_pretrained(places / "saved")
    cached = hf_cache_file("facebook/dinov2-small", places / "saved")
    spec = get_spec("facebook/dinov2-small")
    assert spec.name == "dinov2_vits14" and find_local_weights(spec) == cached
    found, _ = load_backbone("facebook/dinov2-small")
    explicit, _ = load_backbone("dinov2_vits14", places / "saved")
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), explicit.state_dict().values()))
    timm_file = hf_cache_file(f"timm/{spec.hub_name}", places / "saved" / "model.safetensors")
    assert find_local_weights(spec) == timm_file


def test_error_lists_every_place_in_order(places):
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("dinov2_vits14")
    msg = str(info.value)
    hub = places / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert re.search(r"1\) \$DENSEVIT_WEIGHTS \(unset\); 2\) " + re.escape(str(hub)) + r"; 3\) Hugging Face cache "
                     + re.escape(str(places / "hf" / "hub")) + r" \(timm/vit_small_patch14_dinov2\.lvd142m, "
                     r"facebook/dinov2-small\); 4\) download from https://huggingface\.co \(not tried: HF_HUB_OFFLINE=1\)",
                     msg), msg
    assert "\n" not in msg and "weights='FILE'" in msg and "--weights FILE" in info.value.cli_message


def test_offline_setting_decides_without_a_connection(places, monkeypatch):
    def no_socket(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    assert locate.probe_target() is None
    assert locate.hub_online() == (False, "https://huggingface.co (not tried: HF_HUB_OFFLINE=1)")


def test_probe_target_honours_endpoint_and_proxies(places, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert locate.probe_target() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-mirror.example:8080/")
    assert locate.probe_target() == ("hf-mirror.example", 8080)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert locate.probe_target() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "hf-mirror.example")
    assert locate.probe_target() == ("hf-mirror.example", 443)


def test_unreachable_endpoint_is_offline(places, monkeypatch):
    """A mirror that does not answer is offline after one short attempt: a closed port on this machine (refused
    at once), and an address of IPv6's discard-only prefix (RFC 6666: never routed; the attempt times out)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:          # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    assert locate.hub_online() == (False, f"{closed} (unreachable)")
    with pytest.raises(WeightsNotFoundError, match=r"4\) download from " + re.escape(closed) + r" \(unreachable\)"):
        load_backbone("dino_vits16")
    monkeypatch.setenv("HF_ENDPOINT", "http://[100::1]")
    assert locate.hub_online() == (False, "http://[100::1] (unreachable)")


def test_sharded_transformers_checkpoint_in_the_hf_cache(places):
    """A sharded ``save_pretrained`` checkpoint (index + shards, as the Hub holds the largest models) is read as
    its snapshot folder, from the cache or given explicitly."""
    import transformers

    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(num_register_tokens=4))
    model.save_pretrained(places / "saved", max_shard_size="30MB")
    assert len(list((places / "saved").glob("model-*.safetensors"))) > 1
    hf_cache_file("facebook/dinov3-vits16-pretrain-lvd1689m", places / "saved")
    spec = get_spec("dinov3_vits16")
    assert find_local_weights(spec) == (locate.hf_cache_dir() / "models--facebook--dinov3-vits16-pretrain-lvd1689m"
                                        / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    found, _ = load_backbone("dinov3_vits16")
    explicit, _ = load_backbone("dinov3_vits16", places / "saved")
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), explicit.state_dict().values()))
