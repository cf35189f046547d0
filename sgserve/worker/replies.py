"""The worker's replies to W_REQUESTs, in one place for both request paths.

serve.py runs requests one at a time and serve_batched.py runs them in batches; both answer through
these functions, so a reply says the same thing whichever path ran the request. Each returns the
whole W_REPLY message: the command frame (request id, status code, batch rows) in place of MAGIC. Every reply the
worker sends carries where the request went (docs/protocol.md section 5): ``model``, ``version``
and ``worker``. An exception becomes a code and message through ``errors.wire_error``, the mapping
the broker uses too; an output the wire cannot carry is a 500, the server's fault and not the
request's.
"""
from __future__ import annotations

import logging
from typing import Any

from sgserve import protocol
from sgserve.errors import INTERNAL, OK, ServeError, wire_error

log = logging.getLogger("sgserve.worker")


def succeeded(rid: int, request_id: Any, outputs: dict[str, Any], model: Any, version: int, worker: int,
              batch_size: int | None = None) -> list[Any]:
    """The W_REPLY message carrying a request's outputs, or the 500 when they cannot be sent.
    ``batch_size``: the rows of the batch it ran in, when batching."""
    if batch_size is None:
        header = protocol.ok_header(request_id, model=model, version=version, worker=worker)
    else:
        header = protocol.ok_header(request_id, model=model, version=version, worker=worker, batch_size=batch_size)
    try:
        frames = protocol.pack(header, outputs, key="outputs")
    except Exception as exc:  # noqa: BLE001 - e.g. an output dtype the wire cannot carry: our fault
        frames = protocol.error_reply(request_id, INTERNAL, f"output cannot be sent: {wire_error(exc)[1]}",
                                      model=model, version=version, worker=worker)
        frames[0] = protocol.reply_frame(rid, INTERNAL, batch_size or 0)
        return frames
    frames[0] = protocol.reply_frame(rid, OK, batch_size or 0)
    return frames


def failed(rid: int, request_id: Any, exc: BaseException, model: Any, version: int, worker: int) -> list[Any]:
    """The W_REPLY message answering a request that raised ``exc``; anything but a ServeError is a
    bug of ours, logged with its traceback."""
    if not isinstance(exc, ServeError):
        log.error("request failed", exc_info=exc)
    code, message = wire_error(exc)
    frames = protocol.error_reply(request_id, code, message, model=model, version=version, worker=worker)
    frames[0] = protocol.reply_frame(rid, code)
    return frames


__all__ = ["succeeded", "failed"]
