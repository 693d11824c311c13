"""The paper's attention masks over the [text | image] stream (DALL·E §2.2, App. B.1, Figure 11).

Stream layout, length S = T + N (T = text_len, N = G * G image tokens, G = image_grid)::

    position : 0      ..  T-1       | T     T+1    ..  T+N-1
    input    : text_0 ..  text_{T-1} | SOI   img_0  ..  img_{N-2}
    predicts : text_1 ..  (nothing)  | img_0 img_1  ..  img_{N-1}

The start-of-image token (SOI) takes the first image position, so the stream keeps length T + N
and the last image token is never an input. Image *slot* a (stream position T + a) holds the
token before img_a in raster order and predicts img_a; the slot's grid coordinates are those of
the token it predicts, (a // G, a % G). Masks are defined on slots, the way Figure 11 draws them:
``mask[q, k]`` is True where query position q may attend to key position k, and every position
sees itself (the diagonal). Seen from the token being predicted, "slot a sees slots a-G .. a"
means img_a is predicted from the previous G+1 image tokens img_{a-G-1} .. img_{a-1}.

- text -> text: causal.  text -> image: nothing.  image -> text: everything.
- row (``row``): slot a sees slots a-G .. a, the previous G+1 in raster order, wrapping across
  row ends (Figure 11a: "the last token attended to is the one in the same column of the
  previous row").
- column (``column``): slot (r, c) sees slots (r', c) with r' <= r, i.e. the row pattern's
  causal structure applied to the transposed image (Figure 11b/c).
- convolutional (``conv``): a causal k x k neighbourhood: slots at raster offsets dr*G + dc with
  -h <= dr <= 0, -h <= dc <= h (h = k // 2) and offset <= 0. By default with wraparound like the
  row pattern (Figure 11d: "a causal convolutional attention pattern with wraparound behavior"):
  a column offset past the grid edge continues on the neighbouring row. ``wraparound=False``
  clips the neighbourhood at the grid edges instead.
- causal (``causal``): slot a sees every slot <= a -- a standard decoder, not one of the paper's
  patterns. With the text rules above the whole stream mask is then plain causal.
- layer pattern ``"paper"`` (1-based i, n layers): conv for i = n; column when (i - 2) % 4 == 0; row
  otherwise. ``"causal"``: every layer causal. The paper's sparse patterns were made for 64 layers; a
  few-layer model reaches the whole image only through several hops (README, "What each lever bought").

All functions are pure and return CPU bool tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("row", "column", "conv", "causal")
LAYER_PATTERNS = ("paper", "causal")


def layer_kinds(n_layers: int, pattern: str = "paper") -> list[str]:
    """Image->image pattern of each layer. ``paper``: row, column, row, row, row, column, ..., conv
    (last); ``causal``: causal in every layer."""
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers}: must be >= 1")
    if pattern not in LAYER_PATTERNS:
        raise ValueError(f"layer pattern={pattern!r}: must be one of {list(LAYER_PATTERNS)}")
    if pattern == "causal":
        return ["causal"] * n_layers
    return ["conv" if i == n_layers else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]


def _grid_coords(grid: int) -> tuple[Tensor, Tensor, Tensor]:
    a = torch.arange(grid * grid)
    return a, a // grid, a % grid  # slot index, row, column


def row_pattern(grid: int) -> Tensor:
    """(N, N) image->image: slot a sees slots a-G .. a (the previous G+1 in raster order)."""
    a, _, _ = _grid_coords(grid)
    d = a[:, None] - a[None, :]  # query - key
    return (d >= 0) & (d <= grid)


def column_pattern(grid: int) -> Tensor:
    """(N, N) image->image: slot (r, c) sees (r', c) for r' <= r."""
    _, r, c = _grid_coords(grid)
    return (c[:, None] == c[None, :]) & (r[None, :] <= r[:, None])


def conv_pattern(grid: int, kernel: int, wraparound: bool = True) -> Tensor:
    """(N, N) image->image: the causal kernel x kernel neighbourhood of each slot."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"conv kernel={kernel}: must be a positive odd number")
    h = kernel // 2
    a, r, c = _grid_coords(grid)
    causal = a[None, :] <= a[:, None]
    if wraparound:
        off = a[None, :] - a[:, None]  # key - query, <= 0 where causal
        # off = dr*G + dc with |dc| <= h: round to the nearest multiple of G to split it.
        dr = torch.div(off + h, grid, rounding_mode="floor")
        dc = off - dr * grid
        return causal & (dr >= -h) & (dr <= 0) & (dc >= -h) & (dc <= h)
    dr = r[None, :] - r[:, None]
    dc = c[None, :] - c[:, None]
    return causal & (dr >= -h) & (dr <= 0) & (dc.abs() <= h)


def image_pattern(kind: str, grid: int, kernel: int = 11, wraparound: bool = True) -> Tensor:
    match kind:
        case "row":
            return row_pattern(grid)
        case "column":
            return column_pattern(grid)
        case "conv":
            return conv_pattern(grid, kernel, wraparound)
        case "causal":
            return torch.ones(grid * grid, grid * grid, dtype=torch.bool).tril()
        case _:
            raise ValueError(f"attention kind={kind!r}: must be one of {list(KINDS)}")


def stream_mask(image_part: Tensor, text_len: int) -> Tensor:
    """(S, S) mask over [text | image]: text causal, image -> all text, image -> image given."""
    n = image_part.shape[0]
    if image_part.shape != (n, n) or image_part.dtype != torch.bool:
        raise ValueError(f"image_part: expected a square bool tensor, got {tuple(image_part.shape)} {image_part.dtype}")
    s = text_len + n
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_part
    return mask


def build_mask(kind: str, text_len: int, grid: int, kernel: int = 11, wraparound: bool = True) -> Tensor:
    """The full (S, S) bool mask of one layer type; True = may attend."""
    return stream_mask(image_pattern(kind, grid, kernel, wraparound), text_len)


def is_causal(mask: Tensor) -> bool:
    """No position attends to a later one."""
    return not bool(torch.triu(mask, diagonal=1).any())
