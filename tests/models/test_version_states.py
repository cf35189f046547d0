"""The version state machine, fed events directly: no disk, no processes, no sockets, no clock."""
from __future__ import annotations

import pytest

from sgserve.config import ModelSpec
from sgserve.models.tfs_config import ModelConfig, parse_version_policy
from sgserve.models.versions import (RESOURCE_PRESERVING, CancelLoad, Release, StartLoad, VersionState,
                                     VersionTable)
from sgserve.errors import names


def config(policy: str = "latest", labels: dict[str, int] | None = None) -> ModelConfig:
    return ModelConfig(name="m", base_path="/models/m", version_policy=parse_version_policy(policy),
                       version_labels=labels or {})


def spec(version: int, *shared: str) -> ModelSpec:
    seg = f"/sgs_t_m_{version}"
    return ModelSpec(name="m", version=version, base_path="/models/m", segment=seg, segment_bytes=64,
                     signatures={}, segments=[seg, *shared])


def serving(v: int, transition: str = "availability-preserving", policy: str = "latest") -> VersionTable:
    """A table serving version ``v`` of model m, found on disk."""
    table = VersionTable(transition)
    table.configure(config(policy))
    table.add_loaded(spec(v), now=0.0, wall=1000.0)
    table.disk_scanned("m", [v])
    assert table.reconcile("m", 0.0) == []
    return table


def states(table: VersionTable) -> dict[int, str]:
    return {v: mv.state.value for v, mv in table.models["m"].versions.items()}


def test_a_new_version_loads_then_switches_and_the_old_one_unloads() -> None:
    table = serving(1)
    table.disk_scanned("m", [1, 2])
    assert table.reconcile("m", 10.0) == [StartLoad(("m", 2))]
    assert states(table) == {1: "AVAILABLE", 2: "LOADING"}
    assert table.models["m"].default == 1, "requests stay on 1 while 2 loads"
    assert table.ready_to_load(("m", 2), 10.0) is True
    assert table.segment_written(("m", 2), spec(2, "/sgs_t_m_1"))
    assert table.ready_to_load(("m", 2), 10.0) is None, "written: nothing left for the loader"
    assert [mv.version for mv, _ in table.for_workers()] == [1, 2]
    assert table.loaded_everywhere([("m", 2)], workers=2, now=12.5, wall=2000.0) == []
    assert states(table) == {1: "UNLOADING", 2: "AVAILABLE"}
    mv2 = table.get(("m", 2))
    assert mv2.load_seconds == 2.5 and mv2.available_since == 2000.0
    assert table.models["m"].default == 2 and sorted(table.models["m"].available) == [2]
    assert table.with_segments(VersionState.UNLOADING, VersionState.FAILED) == [("m", 1)]
    assert table.dropped(("m", 1)) == [Release(("m", 1), ("/sgs_t_m_1",))]
    assert states(table) == {1: "END", 2: "AVAILABLE"}
    assert table.dropped(("m", 1)) == [], "released once"


def test_a_failed_load_retries_then_fails_and_the_old_version_keeps_serving() -> None:
    table = serving(1)
    table.max_retries, table.retry_interval = 1, 30.0
    table.disk_scanned("m", [1, 2])
    table.reconcile("m", 0.0)
    assert table.load_failed(("m", 2), "corrupt checkpoint", now=5.0) == [StartLoad(("m", 2))]
    mv2 = table.get(("m", 2))
    assert mv2.state is VersionState.LOADING and mv2.retry_at == 35.0
    assert "load attempt 1 failed: corrupt checkpoint; retrying in 30 s" in mv2.error
    assert table.ready_to_load(("m", 2), 34.9) is False
    assert table.ready_to_load(("m", 2), 35.0) is True
    assert table.load_failed(("m", 2), "corrupt checkpoint", now=40.0) == []
    assert mv2.state is VersionState.FAILED and mv2.error == "corrupt checkpoint (after 2 attempts)"
    assert states(table)[1] == "AVAILABLE" and table.models["m"].default == 1
    assert "FAILED: corrupt checkpoint" in VersionTable.state_of(table.models["m"], 2)
    table.disk_scanned("m", [1])
    table.reconcile("m", 50.0)
    assert 2 not in table.models["m"].versions, "a failure gone from disk is forgotten"


def test_a_worker_failure_fails_only_a_loading_version() -> None:
    table = serving(1)
    assert table.fail(("m", 1), "worker 0 could not load it", 1.0) == []
    assert states(table) == {1: "AVAILABLE"}
    table.disk_scanned("m", [1, 2])
    table.reconcile("m", 1.0)
    table.segment_written(("m", 2), spec(2))
    table.fail(("m", 2), "worker 0 could not load it: boom", 2.0)
    assert table.get(("m", 2)).error == "worker 0 could not load it: boom"
    assert table.with_segments(VersionState.FAILED) == [("m", 2)], "its segment goes once workers drop it"


def test_resource_preserving_unloads_first_and_loads_after() -> None:
    table = serving(1, transition=RESOURCE_PRESERVING)
    table.disk_scanned("m", [1, 2])
    assert table.reconcile("m", 0.0) == [StartLoad(("m", 2))]
    assert states(table) == {1: "UNLOADING", 2: "LOADING"}
    assert table.ready_to_load(("m", 2), 0.0) is False, "waits until version 1 frees its memory"
    table.dropped(("m", 1))
    assert table.ready_to_load(("m", 2), 0.0) is True


def test_a_vanished_directory_bridges_until_its_replacement_serves() -> None:
    table = serving(1)
    table.disk_scanned("m", [2])
    assert table.reconcile("m", 0.0) == [StartLoad(("m", 2))]
    assert states(table) == {1: "AVAILABLE", 2: "LOADING"}, "1 keeps serving from shared memory"
    table.segment_written(("m", 2), spec(2))
    table.loaded_everywhere([("m", 2)], 1, 1.0, 1.0)
    assert states(table) == {1: "UNLOADING", 2: "AVAILABLE"}


def test_a_version_unwanted_before_its_segment_is_written_cancels_the_load() -> None:
    table = serving(1)
    table.disk_scanned("m", [1, 2])
    table.reconcile("m", 0.0)
    table.disk_scanned("m", [1])
    assert table.reconcile("m", 1.0) == [CancelLoad(("m", 2))]
    assert states(table) == {1: "AVAILABLE", 2: "END"}
    assert not table.segment_written(("m", 2), spec(2)), "a late answer is not taken"


def test_pin_serves_the_pinned_version_and_unpin_returns_to_the_policy() -> None:
    table = VersionTable()
    table.configure(config("all"))
    for v in (1, 2):
        table.add_loaded(spec(v), 0.0, 0.0)
    table.disk_scanned("m", [1, 2])
    table.reconcile("m", 0.0)
    assert table.models["m"].default == 2
    assert table.pin("m", 1, 1.0) == []
    assert table.models["m"].default == 1
    table.pin("m", None, 2.0)
    assert table.models["m"].default == 2


def test_removing_a_model_unloads_everything_then_forgets_it() -> None:
    table = serving(1)
    assert table.remove("m", 1.0) == []
    assert states(table) == {1: "UNLOADING"} and table.models["m"].default is None
    assert table.forget_removed() == []
    table.dropped(("m", 1))
    assert table.forget_removed() == ["m"] and table.models == {}


def test_warmup_is_noted_once_and_unknown_versions_are_ignored() -> None:
    table = serving(1)
    table.note_warmup("m", 1, {"requests": 3})
    table.note_warmup("m", 1, {"requests": 9})
    table.note_warmup("nope", 1, {"requests": 1})
    table.note_warmup(None, None, None)
    assert table.get(("m", 1)).warmup == {"requests": 3}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="version transition"):
        VersionTable("fastest")
    with pytest.raises(ValueError, match="model 'x' has no config"):
        VersionTable().add_loaded(ModelSpec(name="x", version=1, base_path="/x", segment="/s", segment_bytes=0,
                                            signatures={}), 0.0, 0.0)
    assert names([]) == "(none)" and names([3, 1]) == "1, 3"
