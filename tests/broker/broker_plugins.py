"""Dispatch policy plugins used by the tests (loaded as broker_plugins:NAME)."""
from __future__ import annotations

from typing import Sequence

from sgserve.broker.policies import DispatchRequest
from sgserve.broker.worker_table import WorkerSlot, WorkerTable


class HighestIndex:
    """A class plugin: always the free worker with the highest index."""

    def __init__(self) -> None:
        self.bound: WorkerTable | None = None

    def bind(self, table: WorkerTable) -> None:
        self.bound = table

    def choose(self, request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
        return slots[-1] if slots else None


def make_highest() -> HighestIndex:
    """A factory plugin (no arguments)."""
    return HighestIndex()


def by_signature(request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
    """A function plugin: "classify" requests to the highest free index, others to the lowest."""
    if not slots:
        return None
    return slots[-1] if request.signature == "classify" else slots[0]


def broken(request: DispatchRequest, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
    raise RuntimeError("plugin bug")


def returns_garbage(request: DispatchRequest, slots: Sequence[WorkerSlot]) -> object:
    return 0


NOT_CALLABLE = 42
