"""What a signature's metadata (``ModelSpec.signatures[name]``, ``SignatureInfo.public()``) says about
its tensors, for the broker and the worker alike: whether it can be split along a batch dimension."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def shape_text(shape: Sequence[Any]) -> str:
    """A shape as error messages write it: a dimension of any size is ``?``."""
    return "[" + ", ".join("?" if d in (-1, None) else str(d) for d in shape) + "]"


def leading_batch_dim(signature_public: Mapping[str, Any]) -> str | None:
    """Why the signature has no batch dimension to split along, or None when every input and output
    has one. Takes ``ModelSpec.signatures[name]`` (``SignatureInfo.public()``) or the manifest's
    entry, which adds tensor names."""
    inputs = signature_public.get("inputs") or {}
    if not inputs:
        return "the signature takes no inputs: no rows to split"
    for kind in ("inputs", "outputs"):
        for name, info in sorted((signature_public.get(kind) or {}).items()):
            shape = info.get("shape")
            what = f"{kind[:-1]} '{name}'"
            if shape is None:
                return f"{what} has an unknown rank: no leading batch dimension"
            if len(shape) == 0:
                return f"{what} is a scalar: no leading batch dimension"
            if shape[0] not in (-1, None):
                return f"{what} has a fixed first dimension {shape[0]} (shape {shape_text(shape)}): no batch dimension"
    return None
