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
