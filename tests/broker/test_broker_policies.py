"""Dispatch policies, built-in and plugins, fed slots directly."""
from __future__ import annotations

import zlib

import pytest

from sgserve.broker import example_policy
from sgserve.broker.policies import (FunctionPolicy, LeastLoaded, Mod, RoundRobin, load_policy,
                                     routing_hash)
from test_broker_worker_table import ready_table, request


def free_after(table, busy: dict[int, int]):
    """The table's free slots after putting busy[index] requests on each index."""
    n = 1000
    for index, count in busy.items():
        for _ in range(count):
            n += 1
            table.mark_busy(table.get(index), request(n))
    return table.free()


def with_key(key, client_id: bytes = b"client"):
    r = request(1)
    r.routing_key = key
    r.client_id = client_id
    return r


def test_round_robin_cycles_over_free_workers() -> None:
    table = ready_table(3)
    rr = RoundRobin()
    slots = table.free()
    assert [rr.choose(request(i), slots).index for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    # worker 1 full: skipped, order continues after the last choice
    slots = free_after(table, {1: 2})
    assert [rr.choose(request(i), slots).index for i in range(4)] == [2, 0, 2, 0]
    assert rr.choose(request(9), ()) is None


def test_least_loaded_prefers_fewest_then_lowest_index() -> None:
    table = ready_table(3, pipeline=3)
    ll = LeastLoaded()
    assert ll.choose(request(1), table.free()).index == 0
    slots = free_after(table, {0: 2, 1: 1})
    assert ll.choose(request(1), slots).index == 2
    free_after(table, {2: 1})
    assert ll.choose(request(1), table.free()).index == 1


def test_routing_hash_is_stable() -> None:
    assert routing_hash(7) == 7
    assert routing_hash("user-42") == zlib.crc32(b"user-42")
    assert routing_hash(b"user-42") == zlib.crc32(b"user-42")


def test_mod_maps_keys_and_falls_to_next_index() -> None:
    table = ready_table(3)
    mod = Mod()
    mod.bind(table)
    assert mod.choose(with_key(4), table.free()).index == 1
    assert mod.choose(with_key(-1), table.free()).index == 2  # Python modulo: non-negative
    assert mod.choose(with_key("user-42"), table.free()).index == zlib.crc32(b"user-42") % 3
    # no routing key: the client's identity is the key, so one client sticks to one worker
    ident = b"\x00k\x8bEg"
    assert mod.choose(with_key(None, ident), table.free()).index == zlib.crc32(ident) % 3
    # target 1 full -> next index 2; target 2 full too -> wraps to 0
    slots = free_after(table, {1: 2})
    assert mod.choose(with_key(4), slots).index == 2
    slots = free_after(table, {2: 2})
    assert mod.choose(with_key(4), slots).index == 0
    assert mod.choose(with_key(4), ()) is None


def test_mod_uses_configured_count_not_free_count() -> None:
    table = ready_table(4)
    mod = Mod()
    mod.bind(table)
    slots = free_after(table, {0: 2})  # 3 free, 4 configured
    assert mod.choose(with_key(5), slots).index == 1  # 5 % 4, not 5 % 3


@pytest.mark.parametrize("spec,cls", [("rr", RoundRobin), ("round-robin", RoundRobin), ("mod", Mod),
                                      ("least-loaded", LeastLoaded)])
def test_builtin_names(spec, cls) -> None:
    assert isinstance(load_policy(spec), cls)


def test_plugins_class_factory_function() -> None:
    table = ready_table(3)
    cls_policy = load_policy("broker_plugins:HighestIndex")
    assert cls_policy.choose(request(1), table.free()).index == 2
    assert load_policy("broker_plugins:make_highest").choose(request(1), table.free()).index == 2
    fn_policy = load_policy("broker_plugins:by_signature")
    assert isinstance(fn_policy, FunctionPolicy)
    r = request(1)
    r.signature = "classify"
    assert fn_policy.choose(r, table.free()).index == 2
    assert fn_policy.choose(request(2), table.free()).index == 0


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown dispatch policy 'nope'"),
    ("no_such_module_xyz:f", "cannot load dispatch policy 'no_such_module_xyz:f': importing"),
    ("broker_plugins:missing", "cannot load dispatch policy 'broker_plugins:missing': .* no attribute"),
    ("broker_plugins:NOT_CALLABLE", "dispatch policy 'broker_plugins:NOT_CALLABLE' is neither"),
    (":f", "must look like package.module:callable"),
    ("", "--policy must be"),
])
def test_bad_specs_name_the_spec(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_policy(spec)


def test_example_policy_vip_first() -> None:
    policy = load_policy("sgserve.broker.example_policy:vip_first")
    table = ready_table(3)
    assert policy.choose(with_key("vip-alice"), table.free()).index == 0
    assert policy.choose(with_key(b"vip-bob"), table.free()).index == 0
    # others go least-loaded, keeping worker 0 free on ties
    assert policy.choose(with_key("bob"), table.free()).index == 1
    assert policy.choose(with_key(None), table.free()).index == 1
    slots = free_after(table, {1: 1})
    assert policy.choose(with_key("bob"), slots).index == 2
    # worker 0 busy: a VIP goes least-loaded rather than waiting
    slots = free_after(table, {0: 2})
    assert policy.choose(with_key("vip-carol"), slots).index == 2
    assert example_policy.vip_first(with_key("vip"), ()) is None
