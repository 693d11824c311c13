"""The paper's masks against a literal enumeration of its definitions (App. B.1, Figure 11)."""

import pytest
import torch

from dalle_ds.models.masks import build_mask, image_pattern, is_causal, layer_kinds


def enumerate_mask(kind: str, text_len: int, grid: int, kernel: int = 3, wraparound: bool = True) -> torch.Tensor:
    """The definitions, one (query, key) pair at a time, written independently of the module."""
    n = grid * grid
    s = text_len + n
    h = kernel // 2
    mask = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            if q < text_len:  # text query: causal over the text, never the image
                ok = k <= q
            elif k < text_len:  # image query, text key: always
                ok = True
            else:
                a, b = q - text_len, k - text_len
                r, c = divmod(a, grid)
                r2, c2 = divmod(b, grid)
                if kind == "row":  # the previous grid+1 positions in raster order, itself included
                    ok = b in {a - j for j in range(grid + 1)}
                elif kind == "column":  # same column, rows above (and itself)
                    ok = c2 == c and r2 <= r
                elif wraparound:  # causal kernel x kernel, raster offsets wrap across row ends
                    ok = b in {a + dr * grid + dc for dr in range(-h, 1) for dc in range(-h, h + 1)
                               if dr * grid + dc <= 0}
                else:  # causal kernel x kernel clipped at the grid edges
                    ok = r - h <= r2 <= r and abs(c2 - c) <= h and (r2 < r or c2 <= c)
            mask[q, k] = ok
    return mask


@pytest.mark.parametrize("text_len,grid", [(0, 2), (3, 3), (6, 4), (2, 5)])
@pytest.mark.parametrize("kind", ["row", "column"])
def test_row_and_column_match_the_definition(kind, text_len, grid):
    mask = build_mask(kind, text_len, grid)
    assert torch.equal(mask, enumerate_mask(kind, text_len, grid))
    assert is_causal(mask)
    assert mask.diagonal().all()  # no empty row: every position sees itself


@pytest.mark.parametrize("wraparound", [True, False])
@pytest.mark.parametrize("text_len,grid,kernel", [(3, 4, 1), (6, 4, 3), (2, 5, 5), (1, 4, 7), (4, 6, 5), (0, 3, 5)])
def test_conv_matches_the_definition(text_len, grid, kernel, wraparound):
    mask = build_mask("conv", text_len, grid, kernel, wraparound)
    assert torch.equal(mask, enumerate_mask("conv", text_len, grid, kernel, wraparound))
    assert is_causal(mask)
    assert mask.diagonal().all()


def test_figure_11_row_example():
    # Paper Figure 11: 6 text tokens, a 4x4 image; row attention sees the previous 5 image positions,
    # the earliest being the one in the same column of the previous row.
    mask = build_mask("row", 6, 4)
    q = 6 + 9  # slot (2, 1)
    assert mask[q, :6].all()
    assert mask[q, 6:].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]  # image slots
    assert divmod(5, 4) == (1, 1)  # slot 5 is (1, 1): same column, previous row


def test_conv_neighbourhood_size_and_wraparound():
    grid, kernel = 8, 5
    img = image_pattern("conv", grid, kernel)
    # An interior slot far from the start sees the full causal half-kernel: 2 rows x 5 + 3 = 13.
    assert int(img[5 * grid + 4].sum()) == 2 * kernel + kernel // 2 + 1
    # Slot (3, 0) with wraparound sees the end of row 2 (offset -1) and of row 1 ...
    assert img[3 * grid, 3 * grid - 1] and img[3 * grid, 2 * grid - 1]
    clipped = image_pattern("conv", grid, kernel, wraparound=False)
    assert not clipped[3 * grid, 3 * grid - 1]  # ... the clipped one does not
    assert int(clipped[3 * grid].sum()) == 3 * (kernel // 2 + 1) - 2


def test_text_never_sees_image_and_image_sees_all_text():
    for kind in ("row", "column", "conv"):
        mask = build_mask(kind, 5, 4, 3)
        assert not mask[:5, 5:].any()
        assert mask[5:, :5].all()
        assert torch.equal(mask[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())


def test_layer_pattern():
    kinds = layer_kinds(64)
    assert kinds[:7] == ["row", "column", "row", "row", "row", "column", "row"]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert [i + 1 for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))
    assert kinds.count("row") == 64 - 1 - 16
    assert layer_kinds(1) == ["conv"]
    assert layer_kinds(3) == ["row", "column", "conv"]
    with pytest.raises(ValueError, match="n_layers=0"):
        layer_kinds(0)


def test_causal_layer_pattern_is_the_plain_causal_mask():
    assert layer_kinds(4, "causal") == ["causal"] * 4
    mask = build_mask("causal", 5, 4)
    assert torch.equal(mask, torch.ones(21, 21, dtype=torch.bool).tril())
    # every earlier image token, where the paper's row pattern stops G + 1 slots back
    assert mask[5 + 15, 5:].sum() == 16 and build_mask("row", 5, 4)[5 + 15, 5:].sum() == 5
    with pytest.raises(ValueError, match="pattern='dense'"):
        layer_kinds(4, "dense")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind='diagonal'"):
        build_mask("diagonal", 2, 4)
    with pytest.raises(ValueError, match="kernel=4"):
        build_mask("conv", 2, 4, 4)
