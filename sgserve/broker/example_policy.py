"""An example dispatch policy plugin: keep worker 0 for VIP traffic.

Use it with::

    sgserve start --workers 4 --policy sgserve.broker.example_policy:vip_first

A plugin is any importable callable; this one is the simplest kind, a plain function
``(request, slots) -> slot | None``. ``slots`` are the workers that can take a request now (READY,
pipeline not full), sorted by index; ``request`` is a DispatchRequest (``model``, ``version``,
``signature``, ``routing_key``, ``client_id``, ``header``...). Return one of ``slots``, or None to
keep the request queued until a worker frees up. A class (or zero-argument factory) whose instances
have ``choose(request, slots)`` works too, and may define ``bind(table)`` to see every slot.
"""
from __future__ import annotations

from typing import Sequence

from sgserve.broker.policies import DispatchRequest
from sgserve.broker.worker_table import WorkerSlot

VIP_PREFIX = "vip"
VIP_WORKER = 0


def is_vip(request: DispatchRequest) -> bool:
    key = request.routing_key
    if isinstance(key, bytes):
        return key.startswith(VIP_PREFIX.encode())
    return isinstance(key, str) and key.startswith(VIP_PREFIX)


def vip_first(request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
    """Routing keys starting with "vip" go to worker 0 when it is free; the rest go least-loaded.

    Ties among the rest avoid worker 0, so it stays free for the next VIP. A VIP request never waits
    for worker 0: when it is busy the request goes least-loaded like any other.
    """
    if not slots:
        return None
    if is_vip(request):
        for slot in slots:
            if slot.index == VIP_WORKER:
                return slot
    return min(slots, key=lambda s: (len(s.inflight), s.index == VIP_WORKER, s.index))
