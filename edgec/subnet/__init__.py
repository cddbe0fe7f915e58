"""AmoebaLLM subnets: one causal LM, many shapes (depth x width), each extracted at compile.

- `depth`: which layers a subnet of each depth keeps, by dynamic programming over
  full-model calibration scores (the last layer always stays).
- `width`: FLAP-style importance of KV groups and MLP channels, one global threshold per
  width ratio (masks nest across ratios) and the compensation biases of what is removed.
- `search`: both, the table of shapes with parameter counts and calibration scores,
  cached per model hash and resumable (`edgec subnet search MODEL`).
- `extract`: a shape made physical: blocks dropped, heads and channels sliced, biases
  added (`edgec compile MODEL --subnet depth=D,width=W`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgec.errors import BadInputError


@dataclass(frozen=True)
class Shape:
    """A subnet: `depth` layers kept, `width` the fraction of their attention and MLP
    parameters kept (1.0: all). depth None: every layer."""

    depth: int | None = None
    width: float = 1.0

    def label(self) -> str:
        return f"depth={'all' if self.depth is None else self.depth},width={self.width:g}"


def parse_shape(text: str, flag: str = "--subnet") -> Shape:
    """`depth=20,width=0.75` (either part may be left out)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("depth", "width") or key.strip() in fields:
            raise BadInputError(f"{flag} {text}: give depth=N,width=R (e.g. {flag} depth=4,width=0.75)")
        fields[key.strip()] = value.strip()
    try:
        depth = int(fields["depth"]) if "depth" in fields else None
        width = float(fields.get("width", "1"))
    except ValueError:
        raise BadInputError(f"{flag} {text}: depth is a whole number of layers and width a fraction in (0, 1]") from None
    if depth is not None and depth < 1 or not 0 < width <= 1:
        raise BadInputError(f"{flag} {text}: depth is at least 1 and width a fraction in (0, 1]")
    return Shape(depth, width)
