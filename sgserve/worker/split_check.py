"""Is a signature safe to split by rows? Decided once per version, at load, in each worker.

The broker may split a big predict request's rows across idle workers and concatenate the parts'
outputs (issue #13). That is only correct when each output row depends on its own input row alone.
Two checks decide it, and a signature that fails either is served unsplit, with the reason in status:

1. ``leading_batch_dim``: every input and output has a leading batch dimension (-1 first in the
   signature metadata). A fixed first dimension, a scalar or an unknown rank cannot be split.
2. ``check_split``: the warmup inputs give the same answers split into row ranges and unsplit. This
   catches cross-row ops (``x - mean(x)`` over the batch, a softmax over the rows) that the metadata
   cannot show.

Tolerance. oneDNN and Eigen pick other kernels and blockings for other batch sizes, so a float row
may differ by a few ulps between batch sizes. Measured through the worker's session
(``ModelRuntime``), 1000 rows whole against the same rows in parts of 1-500 rows, 1 and 2 threads:
the demo model differs by at most 2.4e-7 of an output's largest magnitude (sigmoid's vector and
scalar tails; elementwise 3.8e-4 relative, on a logit near zero), a 4 x 1024 GELU MLP by 1.7e-6
(elementwise up to 1.6% relative, again near zero), the text CNN of issue #13 and a Keras model with
a string lookup by nothing. Elementwise relative error is therefore the wrong measure: the error of
a value near zero comes from the magnitudes that cancelled in it. A float element passes when

    |split - whole| <= atol + rtol * (largest |whole| in its column)

where a column is one position of the trailing dimensions, over all rows. float32 uses rtol 1e-4
(60x the deep MLP's measured error), float16/bfloat16 1e-2, float64 1e-9. NaN and infinities must
match exactly. Integer, bool and string outputs must be equal.

Rows. A check needs rows to split: warmup requests of the same shape are concatenated, and a batch
still under ``CHECK_ROWS`` rows is tiled to that many, the float inputs of each further copy scaled
by 1 + copy/4 so that the copies differ (identical rows would hide ``x - mean(x)``, which is zero
for them split or not). If the scaled batch fails to run, the plain tiling is used.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sgserve.models.signatures import leading_batch_dim, shape_text as _shape

log = logging.getLogger(__name__)

__all__ = ["Tolerance", "FLOAT_TOLERANCES", "CHECK_ROWS", "CHECK_PARTS", "leading_batch_dim", "row_ranges",
           "check_split", "check_batch", "check_signature", "check_version"]

CHECK_ROWS = 8  # a check batch has at least this many rows: split in 2 or 3, every part has several
MAX_CHECK_ROWS = 64  # and at most this many: the check runs at load, on every worker
CHECK_PARTS = (2, 3)  # even (4 + 4) and uneven (3 + 3 + 2) row ranges, as the broker makes them
FAILS_UNSPLIT = "cannot be checked: the inputs fail unsplit"

Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """|split - whole| <= atol + rtol * (largest |whole| in the element's column)."""

    rtol: float
    atol: float


FLOAT_TOLERANCES: dict[str, Tolerance] = {
    "float16": Tolerance(1e-2, 1e-3),
    "bfloat16": Tolerance(1e-2, 1e-3),
    "float32": Tolerance(1e-4, 1e-6),
    "complex64": Tolerance(1e-4, 1e-6),
    "float64": Tolerance(1e-9, 1e-12),
    "complex128": Tolerance(1e-9, 1e-12),
}


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, stop) ranges covering ``rows``, sizes differing by at most one,
    larger ones first (np.array_split's rule)."""
    size, extra = divmod(rows, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def check_split(run: Run, inputs: Mapping[str, np.ndarray], parts: int = 2,
                rtol: float | None = None, atol: float | None = None) -> str | None:
    """Runs ``inputs`` whole and in ``parts`` row ranges, concatenating each output's parts in order.
    None when every output matches (floats within the tolerance: ``FLOAT_TOLERANCES`` by dtype
    unless rtol/atol are given; everything else exactly); else the reason, naming the output."""
    rows = _rows(inputs)
    if isinstance(rows, str):
        return rows
    if parts < 2 or rows < parts:
        return f"cannot be checked: {rows} row(s) for {parts} parts"
    try:
        whole = {k: np.asarray(v) for k, v in run(dict(inputs)).items()}
    except Exception as exc:  # noqa: BLE001 - any model error: then nothing can be compared
        return f"{FAILS_UNSPLIT} ({_why(exc)})"
    pieces: dict[str, list[np.ndarray]] = {k: [] for k in whole}
    for k, (start, stop) in enumerate(row_ranges(rows, parts)):
        try:
            got = run({n: v[start:stop] for n, v in inputs.items()})
        except Exception as exc:  # noqa: BLE001 - fails on fewer rows: not splittable
            return f"rows {start}-{stop - 1} alone fail (part {k + 1} of {parts}): {_why(exc)}"
        for name, value in got.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != stop - start:
                return (f"output '{name}' has shape {_shape(value.shape)} for the {stop - start} rows "
                        f"{start}-{stop - 1}: not one row per input row")
            pieces.setdefault(name, []).append(value)
    for name in sorted(whole):
        why = _compare(name, whole[name], np.concatenate(pieces[name]), parts, rtol, atol)
        if why:
            return why
    return None


def check_batch(samples: Sequence[Mapping[str, np.ndarray]], rows: int = CHECK_ROWS,
                perturb: bool = True) -> dict[str, np.ndarray]:
    """One batch to check with, from warmup requests: the first, then every later one with the same
    input names, dtypes and trailing shapes appended (up to MAX_CHECK_ROWS), tiled to ``rows`` rows
    if it has fewer; each further copy's float inputs scaled by 1 + copy/4 when ``perturb``."""
    first = {n: np.asarray(v) for n, v in samples[0].items()}
    key = _layout(first)
    batch = {n: [v] for n, v in first.items()}
    have = _rows(first)
    have = have if isinstance(have, int) else 0
    for sample in samples[1:]:
        if have >= MAX_CHECK_ROWS:
            break
        arrays = {n: np.asarray(v) for n, v in sample.items()}
        n_rows = _rows(arrays)
        if _layout(arrays) != key or not isinstance(n_rows, int):
            continue
        for n, v in arrays.items():
            batch[n].append(v)
        have += n_rows
    merged = {n: np.concatenate(vs)[:MAX_CHECK_ROWS] if vs[0].ndim else vs[0] for n, vs in batch.items()}
    n = min(have, MAX_CHECK_ROWS)
    if n == 0 or n >= rows:
        return merged
    copies = -(-rows // n)
    out = {}
    for name, v in merged.items():
        tiles = [v]
        for c in range(1, copies):
            tiles.append(v * (1 + c / 4) if perturb and v.dtype.kind in "fc" else v)
        out[name] = np.concatenate(tiles)[:rows].astype(v.dtype, copy=False)
    return out


def check_signature(runtime: Any, signature_name: str,
                    warmup_inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None,
                    parts: Sequence[int] = CHECK_PARTS) -> str | None:
    """Why ``signature_name`` of a loaded ``ModelRuntime`` must be served unsplit, or None when it
    may be split. ``warmup_inputs``: this signature's warmup requests (one dict of arrays, or a
    list), or None for synthetic inputs. Calls the signature through the worker's own path
    (``SignatureRunner.run``), the kernels a split part will run."""
    runner = runtime.signatures.get(signature_name)
    if runner is None:
        return f"no signature '{signature_name}'"
    why = leading_batch_dim(runtime.view.manifest["signatures"][signature_name])
    if why:
        return why
    if isinstance(warmup_inputs, Mapping):
        warmup_inputs = [warmup_inputs]
    samples = [_cast(runner, s) for s in warmup_inputs or ()] or _synthetic(runner)
    why: str | None = None
    for perturb in (True, False):
        batch = check_batch(samples, perturb=perturb)
        for k in parts:
            why = check_split(runner.run, batch, k)
            if why:
                break
        if not why or not why.startswith(FAILS_UNSPLIT):
            break  # a verdict; only a batch the model refuses is retried without the scaling
    return why


def check_version(runtime: Any, requests: Sequence[Any] | None) -> dict[str, str | None]:
    """Every signature of a loaded version: name -> why it is served unsplit, or None (splittable).
    Never raises: a check that cannot run is a reason too. ``requests``: the version's warmup
    requests (``sgserve.models.warmup.WarmupRequest``), as the worker warmed it, or None when it
    warmed with synthetic inputs or not at all."""
    verdicts: dict[str, str | None] = {}
    for name in sorted(runtime.signatures):
        mine = [r.inputs for r in requests or () if r.signature == name]
        try:
            verdicts[name] = check_signature(runtime, name, mine or None)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run must not fail the load
            verdicts[name] = f"cannot be checked: {type(exc).__name__}: {_why(exc)}"
        if verdicts[name]:
            log.info("%s version %s, signature %s: served unsplit: %s",
                     runtime.name, runtime.version, name, verdicts[name])
    return verdicts


def _rows(inputs: Mapping[str, np.ndarray]) -> int | str:
    """The common leading dimension of the inputs, or why there is none."""
    if not inputs:
        return "cannot be checked: no inputs"
    counts = {n: (np.shape(v)[0] if np.ndim(v) else None) for n, v in inputs.items()}
    scalars = sorted(n for n, c in counts.items() if c is None)
    if scalars:
        return f"cannot be checked: input(s) {scalars} have no rows"
    if len(set(counts.values())) > 1:
        return f"cannot be checked: the inputs have different row counts {dict(sorted(counts.items()))}"
    return next(iter(counts.values()))


def _compare(name: str, whole: np.ndarray, split: np.ndarray, parts: int,
             rtol: float | None, atol: float | None) -> str | None:
    """Why the concatenated parts of one output differ from the whole, or None."""
    where = f"output '{name}' split in {parts} parts"
    if whole.shape != split.shape:
        return f"{where} has shape {_shape(split.shape)}, unsplit {_shape(whole.shape)}"
    tol = FLOAT_TOLERANCES.get(whole.dtype.name)
    if tol is None and whole.dtype.kind in "fc":
        tol = FLOAT_TOLERANCES["float32"]
    if tol is None:
        same = whole == split
        if np.all(same):
            return None
        bad = np.argwhere(~np.asarray(same))
        return f"{where} differs in {len(bad)} element(s), first at row {bad[0][0]}; {whole.dtype.name} must be exact"
    return _float_diff(where, whole, split, Tolerance(tol.rtol if rtol is None else rtol,
                                                      tol.atol if atol is None else atol))


def _float_diff(where: str, whole: np.ndarray, split: np.ndarray, tol: Tolerance) -> str | None:
    """The float comparison of the module docstring: error relative to the column's magnitude."""
    wide = np.complex128 if whole.dtype.kind == "c" else np.float64
    w, s = whole.astype(wide), split.astype(wide)
    finite_w, finite_s = np.isfinite(w), np.isfinite(s)
    odd = (finite_w != finite_s) | (~finite_w & ~((w == s) | (np.isnan(w) & np.isnan(s))))
    if np.any(odd):
        row = np.argwhere(odd)[0][0]
        return f"{where} differs in NaN or infinity, first at row {row}"
    if w.size == 0:
        return None
    mag = np.where(finite_w, np.abs(w), 0.0)
    scale = mag.max(axis=0, keepdims=True) if w.ndim else mag
    diff = np.where(finite_w, np.abs(s - w), 0.0)
    allowed = tol.atol + tol.rtol * scale
    if np.all(diff <= allowed):
        return None
    ratio = diff / np.maximum(scale, np.finfo(np.float64).tiny)
    worst = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape)
    return (f"{where} differs: max abs diff {diff.max():.3g} (row {worst[0]}), {ratio.max():.3g} of its column's "
            f"largest magnitude; tolerance rtol {tol.rtol:g} of it + atol {tol.atol:g}")


def _layout(arrays: Mapping[str, np.ndarray]) -> tuple:
    """What must agree for two warmup requests to be concatenated: names, dtypes, trailing dims."""
    return tuple(sorted((n, v.dtype.kind if v.dtype.kind in "OSU" else v.dtype.str, v.shape[1:])
                        for n, v in arrays.items()))


def _cast(runner: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The signature's numeric dtypes, as the runtime's warmup gives hand-written JSON numbers."""
    out = {}
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        spec = runner.inputs.get(name)
        if spec is not None and spec.dtype != "string" and arr.dtype.kind in "biuf" and arr.dtype.name != spec.dtype:
            arr = arr.astype(spec.dtype)
        out[name] = arr
    return out


def _synthetic(runner: Any, rows: int = CHECK_ROWS) -> list[dict[str, np.ndarray]]:
    """Inputs for a version without warmup requests, whose rows differ: floats from a seeded normal,
    integers and bools alternating 0 and 1 (valid ids for nearly any table), strings "0".."3".
    Then the zeros the runtime's synthetic warmup uses, for a model that refuses those."""
    rng = np.random.default_rng(13)
    varied: dict[str, np.ndarray] = {}
    for name, spec in runner.inputs.items():
        shape = [rows] + [1 if d in (-1, None) else d for d in (spec.shape or [rows])[1:]]
        index = np.arange(rows).reshape([rows] + [1] * (len(shape) - 1))
        if spec.dtype == "string":
            varied[name] = np.broadcast_to(np.array([str(i % 4).encode() for i in range(rows)], dtype=object)
                                           .reshape(index.shape), shape).copy()
        elif "float" in spec.dtype or "complex" in spec.dtype:
            varied[name] = rng.normal(size=shape).astype(spec.dtype)
        else:
            varied[name] = np.broadcast_to(index % 2, shape).astype(spec.dtype)
    zeros = {n: (np.full(v.shape, b"", dtype=object) if v.dtype == object else np.zeros_like(v))
             for n, v in varied.items()}
    return [varied] if _runs(runner, varied) else [zeros]


def _runs(runner: Any, inputs: dict[str, np.ndarray]) -> bool:
    try:
        runner.run(inputs)
        return True
    except Exception:  # noqa: BLE001 - the model refuses these values; the caller falls back
        return False


def _why(exc: BaseException) -> str:
    text = (getattr(exc, "message", None) or str(exc)).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)
