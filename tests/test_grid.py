"""The one pixel <-> token mapping."""
import torch

from densevit import TokenGrid


def test_shape_and_centres():
    g = TokenGrid(8, 4, (224, 298), (3024, 4032))
    assert g.shape == (55, 73) and g.num_tokens == 55 * 73
    c = g.token_centers_input()
    assert torch.equal(c[0], torch.tensor([4.0, 4.0], dtype=c.dtype))
    assert torch.equal(c[74], torch.tensor([8.0, 8.0], dtype=c.dtype))  # row 1, col 1
    orig = g.token_centers()
    torch.testing.assert_close(orig[74], torch.tensor([8 * 4032 / 298, 8 * 3024 / 224], dtype=orig.dtype))


def test_round_trip_tokens_pixels():
    g = TokenGrid(16, 8, (100, 137), (400, 548))
    idx = torch.arange(g.num_tokens)
    assert torch.equal(g.pixels_to_tokens(g.tokens_to_pixels(idx)), idx)


def test_pixels_to_tokens_nearest_and_clamped():
    g = TokenGrid(8, 8, (32, 32))
    xy = torch.tensor([[0.0, 0.0], [31.9, 31.9], [11.9, 4.0], [12.1, 4.0], [-50.0, 500.0]])
    assert g.pixels_to_tokens(xy).tolist() == [0, 15, 1, 1, 12]
    rows, cols = g.unflat(torch.tensor([13]))
    assert (rows.item(), cols.item()) == (3, 1)
