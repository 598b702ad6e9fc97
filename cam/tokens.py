"""Token layers: how a Vision Transformer's (batch, tokens, channels) output lays out on its
patch grid, with the tokens that are not patches (a class token, a distillation token,
registers) carried past the cut unchanged and never perturbed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import keras
from .checks import check_int, is_int


def square_tokens(shape: tuple) -> bool:
    """A (batch, tokens, channels) shape that :meth:`TokenGrid.infer` can lay out by itself."""
    if len(shape) != 3 or shape[1] is None:
        return False
    try:
        TokenGrid.infer(shape[1])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TokenGrid:
    """How a (batch, tokens, channels) layer output lays out on an (h, w) patch grid.

    Tokens ``prefix .. prefix + h*w`` are the patches in row-major order; the ``prefix`` tokens
    before them (a class token, a distillation token) and the ``suffix`` tokens after them
    (register tokens) are carried past the cut unchanged and never ablated.

    Pass it as ``reshape=`` to an explainer; ``reshape=(h, w)`` means
    ``TokenGrid(h, w, prefix=tokens - h*w)``; ``reshape=n`` (an int) means ``n`` special
    tokens first and then a square grid, ``TokenGrid(g, g, prefix=n)`` with
    ``g*g = tokens - n`` (DeiT: 2, a class and a distillation token; DINOv2 with ``r``
    registers, which come after its class token: ``1 + r``); ``reshape=None`` lets
    :meth:`infer` decide.
    """

    height: int
    width: int
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self):
        for name in ("height", "width", "prefix", "suffix"):
            value = getattr(self, name)
            least = 1 if name in ("height", "width") else 0
            check_int(f"TokenGrid {name}", value, low=least)

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width + self.suffix

    @classmethod
    def infer(cls, tokens: int, reshape=None, layer: str = "the layer") -> "TokenGrid":
        """The layout of ``tokens`` tokens: ``reshape`` (None, ``(h, w)``, a count of special
        tokens first, or a TokenGrid), or for None a square g x g grid, or a class token first
        and then a g x g grid."""
        if tokens is None:
            raise ValueError(f"{layer} has an unknown number of tokens (the model's input size "
                             f"is not fixed); build the model with a fixed image size")
        if isinstance(reshape, TokenGrid):
            grid = reshape
        elif is_int(reshape):
            grid = cls.after_special(tokens, int(reshape), layer)
        elif reshape is not None:
            if not (isinstance(reshape, (tuple, list)) and len(reshape) == 2):
                raise ValueError(f"reshape must be None, (height, width), a number of special "
                                 f"tokens or a cam.TokenGrid, got {reshape!r}")
            h, w = (int(v) for v in reshape)
            if h * w > tokens:
                raise ValueError(f"reshape={tuple(reshape)} needs {h * w} tokens but {layer} "
                                 f"outputs {tokens}")
            grid = cls(h, w, prefix=tokens - h * w)
        else:
            for extra in (0, 1):
                g = math.isqrt(max(tokens - extra, 0))
                if g > 1 and g * g == tokens - extra:
                    return cls(g, g, prefix=extra)
            raise ValueError(
                f"{layer} outputs {tokens} tokens, which is neither a square grid (g*g) nor a "
                f"class token and a square grid (1 + g*g), so the tokens cannot be laid out on "
                f"a patch grid by themselves; pass reshape=<number of special tokens first> "
                f"(DeiT: 2), reshape=(height, width) (the extra tokens first) or "
                f"reshape=cam.TokenGrid(height, width, prefix=..., suffix=...)"
            )
        if grid.tokens != tokens:
            raise ValueError(f"{grid} covers {grid.tokens} tokens but {layer} outputs {tokens}")
        return grid

    @classmethod
    def after_special(cls, tokens: int, special: int, layer: str = "the layer") -> "TokenGrid":
        """``special`` tokens first, then a square g x g grid of the other ``tokens - special``
        (with g >= 2, as for a grid layer); a clear error naming the valid counts otherwise."""
        patches = tokens - special
        g = math.isqrt(max(patches, 0))
        if special >= 0 and g >= 2 and g * g == patches:
            return cls(g, g, prefix=special)
        valid = [f"{tokens - k * k} (a {k}x{k} grid)"
                 for k in range(math.isqrt(tokens), 1, -1)][:3]
        if special < 0:
            why = "a count of special tokens cannot be negative"
        elif patches < 4:
            why = f"that leaves {max(patches, 0)} patch tokens, too few for a grid of 2x2 or more"
        else:
            why = f"the other {patches} tokens are not a square grid (g*g)"
        hint = f"valid counts: {', '.join(valid)}" if valid else \
            "no count leaves a square grid of 2x2 or more"
        raise ValueError(f"reshape={special} special tokens: {layer} outputs {tokens} tokens, "
                         f"and {why}; {hint}; or pass reshape=(height, width) or "
                         f"cam.TokenGrid(height, width, prefix=..., suffix=...)")

    def to_grid(self, tokens) -> tuple[Any, list]:
        """(B, tokens, C) -> the (B, h, w, C) grid and the list of carried tokens."""
        channels = tokens.shape[-1]
        end = self.prefix + self.height * self.width
        grid = keras.ops.reshape(tokens[:, self.prefix:end],
                                 (-1, self.height, self.width, channels))
        extras = [tokens[:, :self.prefix]] if self.prefix else []
        if self.suffix:
            extras.append(tokens[:, end:])
        return grid, extras

    def from_grid(self, grid, extras: Sequence) -> Any:
        """Inverse of :meth:`to_grid`: the grid and the carried tokens back to (B, tokens, C)."""
        channels = grid.shape[-1]
        flat = keras.ops.reshape(grid, (-1, self.height * self.width, channels))
        parts = list(extras[:1]) + [flat] + list(extras[1:]) if self.prefix \
            else [flat] + list(extras)
        return keras.ops.concatenate(parts, axis=1) if len(parts) > 1 else flat

    @property
    def carried(self) -> int:
        """How many carried-token tensors :meth:`to_grid` returns (0, 1 or 2)."""
        return int(self.prefix > 0) + int(self.suffix > 0)
