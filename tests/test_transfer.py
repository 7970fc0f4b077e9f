"""Dense keypoint transfer on synthetic descriptors with known matches."""
import pytest
import torch

from densevit.errors import DensevitError
from densevit.matching.transfer import transfer_points
from densevit.models.grid import TokenGrid

SRC = TokenGrid(8, 4, (40, 48), (80, 96))        # 9 x 11 tokens, original image twice the input
TRG = TokenGrid(8, 8, (64, 48), (96, 72))        # 8 x 6 tokens, original 1.5x the input


def test_nearest_neighbour_lands_on_the_matching_token():
    g = torch.Generator().manual_seed(0)
    desc_src = torch.randn(SRC.num_tokens, 32, generator=g)
    desc_trg = torch.randn(TRG.num_tokens, 32, generator=g)
    src_tok = torch.tensor([0, 5, 17, 60, SRC.num_tokens - 1])
    trg_tok = torch.tensor([47, 3, 20, 0, 11])
    desc_trg[trg_tok] = desc_src[src_tok] * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])  # cosine: scale-free
    pts = SRC.tokens_to_pixels(src_tok) + torch.tensor([[0.9, -0.9]], dtype=torch.float64)   # near the centres
    out, scores = transfer_points(desc_src, desc_trg, SRC, TRG, pts)
    assert torch.allclose(out, TRG.tokens_to_pixels(trg_tok))
    assert torch.allclose(scores, torch.ones(5), atol=1e-5)


def test_softargmax_refines_between_tokens():
    desc_trg = torch.eye(TRG.num_tokens)                        # one-hot: cos = query weights
    a, b = TRG.flat(torch.tensor(3), torch.tensor(2)), TRG.flat(torch.tensor(3), torch.tensor(3))
    corner = TRG.flat(torch.tensor(0), torch.tensor(0))
    desc_src = torch.zeros(SRC.num_tokens, TRG.num_tokens)
    desc_src[0, a] = desc_src[0, b] = 1.0                       # equally similar to two horizontal neighbours
    desc_src[1, corner] = 1.0                                   # a unique match in the grid corner
    pts = SRC.tokens_to_pixels(torch.tensor([0, 1]))
    out, _ = transfer_points(desc_src, desc_trg, SRC, TRG, pts, refine="softargmax", window=3, temperature=1e-3)
    mid = TRG.tokens_to_pixels(torch.stack([a, b])).mean(0)
    assert torch.allclose(out[0], mid, atol=1e-6)
    assert torch.allclose(out[1], TRG.tokens_to_pixels(corner.reshape(1))[0], atol=1e-6)
    plain, _ = transfer_points(desc_src, desc_trg, SRC, TRG, pts)
    assert plain[0, 1] == mid[1] and plain[0, 0] in TRG.tokens_to_pixels(torch.stack([a, b]))[:, 0]


def test_bad_arguments_are_user_errors():
    d = torch.zeros(SRC.num_tokens, 4)
    with pytest.raises(DensevitError):
        transfer_points(d, torch.zeros(TRG.num_tokens, 5), SRC, TRG, torch.zeros(1, 2))
    with pytest.raises(DensevitError):
        transfer_points(d, torch.zeros(3, 4), SRC, TRG, torch.zeros(1, 2))
    with pytest.raises(DensevitError):
        transfer_points(d, torch.zeros(TRG.num_tokens, 4), SRC, TRG, torch.zeros(1, 2), refine="softargmax", window=4)
    out, scores = transfer_points(d, torch.ones(TRG.num_tokens, 4), SRC, TRG, torch.zeros(0, 2))
    assert out.shape == (0, 2) and scores.shape == (0,)
