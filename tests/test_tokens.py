"""`Tokens` bookkeeping: row selection and pooling, and the key bias reused while it is valid."""

import pytest
import torch

from autoprune.reducers.tokens import Tokens, combine, gather_tokens, take


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_tokens_with_an_offset(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 7, 4)
    index = torch.stack([torch.randperm(6)[:3] for _ in range(batch)])
    expected = torch.stack([x[b, 1 + index[b]] for b in range(batch)])
    assert torch.equal(gather_tokens(x, index, offset=1), expected)
    assert torch.equal(gather_tokens(x[:, 1:], index), expected)  # a non-contiguous view too
    assert torch.equal(gather_tokens(x[..., 0], index, 1), expected[..., 0])


@pytest.mark.parametrize("batch", [1, 3])
def test_take_and_combine_by_hand(batch):
    torch.manual_seed(0)
    tokens = Tokens.start(torch.randn(batch, 6, 2), prefix=1, track_source=True)
    tokens = tokens.replace(size=torch.tensor([[1.0, 1, 2, 3, 1, 4]]).expand(batch, -1).contiguous())
    index = torch.tensor([[4, 0, 2]]).expand(batch, -1)
    kept = take(tokens, index)
    assert kept.prefix == 0 and torch.equal(kept.x, tokens.x[:, [5, 1, 3]])
    assert kept.size[0].tolist() == [4, 1, 3] and kept.source.shape == (batch, 3, 5)
    group = torch.tensor([[1, 0, 1]]).expand(batch, -1)
    merged = combine(tokens, index, group, None, 2, normalize=True)  # weighed by size
    body = tokens.x[:, 1:]
    assert torch.allclose(merged.x[:, 0], body[:, 0])
    assert torch.allclose(merged.x[:, 1], (4 * body[:, 4] + 3 * body[:, 2]) / 7)
    assert merged.size[0].tolist() == [1, 7]
    explicit = combine(tokens, index, group, tokens.size[:, 1:].gather(1, index), 2, normalize=True)
    assert torch.equal(merged.x, explicit.x) and torch.equal(merged.size, explicit.size)
    summed = combine(tokens, index, group, torch.ones(batch, 3), 2, normalize=False)
    assert torch.allclose(summed.x[:, 1], body[:, 4] + body[:, 2])


def test_the_key_bias_is_reused_until_sizes_or_padding_change():
    tokens = Tokens.start(torch.randn(2, 5, 3), prefix=1)
    bias = tokens.attn_bias(True)
    assert bias.shape == (2, 1, 1, 5) and torch.equal(bias, torch.zeros(2, 1, 1, 5))
    moved = tokens.replace(x=torch.randn(2, 5, 3))
    assert moved.attn_bias(True) is bias  # blocks that only change x reuse it
    merged = moved.replace(size=torch.full((2, 5), 2.0))
    assert torch.allclose(merged.attn_bias(True), torch.full((2, 1, 1, 5), 2.0).log())
    padded = moved.replace(valid=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    assert padded.attn_bias(False)[1, 0, 0].tolist() == [0, 0, 0, float("-inf"), float("-inf")]
    assert tokens.attn_bias(True) is bias and tokens.attn_bias(False) is None
    with pytest.raises(TypeError, match="unknown field"):
        tokens.replace(sizes=tokens.size)
