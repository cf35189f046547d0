"""Turn a SavedModel into one flat GraphDef whose variables are plain tensor inputs.

Why: TensorFlow copies shared buffers in two places (../shared/design-notes.md): converting an
ndarray to a tensor, and the first ResourceGather on a variable that aliases foreign memory. So the
workers never create variables. Instead, every variable op in the serving graph becomes a
Placeholder, its readers become plain ops (ReadVariableOp -> Identity, ResourceGather -> GatherV2,
ResourceGatherNd -> GatherNd), and a worker feeds each placeholder a zero-copy view of the shared
segment (worker/runtime.py).

One path serves TF2 (`tf.saved_model.save`, Keras `model.export()`) and TF1
(`tf.compat.v1.saved_model.Builder`, reference or resource variables) exports: both store a
MetaGraphDef whose main graph holds the variable ops, the signature tensors and a saver. We find
each variable's checkpoint key by tracing the saver's restore op (which assigns `RestoreV2:i` to
the variable), inline every function call with Grappler (as TensorFlow's convert_to_constants
does), and then rewrite the variable ops. Lookup tables keep working: their ops get a shared_name,
so the init graph and the serving graphs in one worker find the same table.

Runs in the loader (which stores the result in the segment's manifest) and needs TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from sgserve.errors import InvalidArgument

VARIABLE_OPS = {"VarHandleOp", "VariableV2", "Variable", "VarHandleOpV2"}
# Ops that only pass a handle (or a ref) through; their type attr must follow the new dtype.
FORWARDING_OPS = {"Identity": "T", "IdentityN": "T", "Snapshot": "T", "StopGradient": "T"}
INIT_SIGNATURE = "__saved_model_init_op"
INIT_COLLECTIONS = ("saved_model_main_op", "legacy_init_op", "table_initializer", "saved_model_legacy_init_op")
SERVE_TAG = "serve"


class ModelFormatError(InvalidArgument):
    """The SavedModel cannot be served (corrupt, unsupported op on a variable, ...)."""


@dataclasses.dataclass
class VariableInput:
    node: str  # placeholder node name in the rewritten graph
    key: str  # checkpoint key
    dtype: str  # numpy dtype name, or "string"
    shape: list[int]


@dataclasses.dataclass
class TensorInfo:
    tensor: str  # tensor name in the rewritten graph, e.g. "serving_default_x:0"
    dtype: str  # wire dtype name
    shape: list[int] | None  # -1 for unknown dims; None for unknown rank


@dataclasses.dataclass
class SignatureInfo:
    method: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    def public(self) -> dict[str, Any]:
        """The metadata clients see: names, dtypes and shapes."""
        return {
            "method": self.method,
            "inputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in sorted(self.inputs.items())},
            "outputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in sorted(self.outputs.items())},
        }


@dataclasses.dataclass
class ServingGraph:
    graph_def: bytes  # serialized, rewritten, function-free GraphDef
    variables: list[VariableInput]
    signatures: dict[str, SignatureInfo]
    init_nodes: list[str]  # ops to run once per worker (table initializers)
    assets: dict[str, str]  # tensor name -> absolute asset path to feed


def _tf():
    import tensorflow as tf  # noqa: PLC0415 - TensorFlow is only imported where it is needed

    return tf


def dtype_name(dt_enum: int) -> str:
    """The wire/numpy name of a TF dtype: "float32", "int64", ..., or "string"."""
    tf = _tf()
    dt = tf.as_dtype(dt_enum)
    if dt == tf.string:
        return "string"
    import numpy as np  # noqa: PLC0415

    return np.dtype(dt.as_numpy_dtype).name


def read_meta_graph(version_dir: str):
    """The 'serve' MetaGraphDef of a SavedModel directory; ModelFormatError if unreadable."""
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415

    pb = os.path.join(version_dir, "saved_model.pb")
    if not os.path.isfile(pb):
        if os.path.isfile(os.path.join(version_dir, "saved_model.pbtxt")):
            raise ModelFormatError(f"{version_dir}: saved_model.pbtxt is not supported; export a binary saved_model.pb")
        raise ModelFormatError(f"{version_dir}: no saved_model.pb (expected a SavedModel directory)")
    sm = saved_model_pb2.SavedModel()
    try:
        with open(pb, "rb") as f:
            sm.ParseFromString(f.read())
    except Exception as exc:  # noqa: BLE001 - a protobuf DecodeError or an OS error
        raise ModelFormatError(f"{pb}: corrupt SavedModel ({type(exc).__name__}: {exc})") from None
    if not sm.meta_graphs:
        raise ModelFormatError(f"{pb}: corrupt SavedModel (no MetaGraphDef)")
    for mg in sm.meta_graphs:
        if SERVE_TAG in mg.meta_info_def.tags:
            return mg
    if len(sm.meta_graphs) == 1:
        return sm.meta_graphs[0]
    tags = [list(mg.meta_info_def.tags) for mg in sm.meta_graphs]
    raise ModelFormatError(f"{pb}: no MetaGraphDef tagged 'serve' (found {tags})")


def _node_of(tensor_name: str) -> str:
    name = tensor_name[1:] if tensor_name.startswith("^") else tensor_name
    return name.split(":")[0]


def _output_index(tensor_name: str) -> int:
    """Output index in a main-graph ('n:1') or function-body ('n:tensors:1') tensor name."""
    parts = tensor_name.split(":")
    if len(parts) == 1:
        return 0
    return int(parts[-1])


def _string_list(node) -> list[str]:
    return [s.decode("utf-8") for s in node.attr["value"].tensor.string_val]


def _restore_key(tensor: str, nodes: dict[str, Any]) -> str | None:
    """The checkpoint key restored into ``tensor``: follow Identity chains back to a RestoreV2
    output, then read its tensor_names const."""
    for _ in range(16):
        n = nodes.get(_node_of(tensor))
        if n is None:
            return None
        if n.op in ("Identity", "Snapshot"):
            tensor = n.input[0]
            continue
        if n.op in ("RestoreV2", "Restore"):
            const = nodes.get(_node_of(n.input[1]))
            if const is None or const.op != "Const":
                return None
            names_list = _string_list(const)
            idx = _output_index(tensor)
            return names_list[idx] if idx < len(names_list) else None
        return None
    return None


def _keys_restored_by_call(call, fdef, keys: dict[str, str]) -> None:
    """A TF2 restore function: its arguments are the variable handles it assigns."""
    arg_names = [a.name for a in fdef.signature.input_arg]
    fnodes = {d.name: d for d in fdef.node_def}
    for d in fdef.node_def:
        if d.op in ("AssignVariableOp", "Assign"):
            arg = _node_of(d.input[0])
            if arg in arg_names:
                i = arg_names.index(arg)
                if i < len(call.input):
                    key = _restore_key(d.input[1], fnodes)
                    if key is not None:
                        keys[_node_of(call.input[i])] = key


def checkpoint_keys(mg) -> dict[str, str]:
    """Variable node name -> checkpoint key, by tracing the saver's restore op.

    TF1 savers assign `RestoreV2:i` to each variable in the main graph; TF2 exports call a restore
    function whose arguments are the variable handles. Both are handled; names are the fallback.
    """
    nodes = {n.name: n for n in mg.graph_def.node}
    funcs = {f.signature.name: f for f in mg.graph_def.library.function}
    keys: dict[str, str] = {}
    restore = _node_of(mg.saver_def.restore_op_name) if mg.saver_def.restore_op_name else ""
    stack, seen = ([restore] if restore in nodes else []), set()
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        n = nodes[name]
        if n.op in ("Assign", "AssignVariableOp"):
            key = _restore_key(n.input[1], nodes)
            if key is not None:
                keys[_node_of(n.input[0])] = key
        elif n.op in ("StatefulPartitionedCall", "PartitionedCall") and n.attr["f"].func.name in funcs:
            _keys_restored_by_call(n, funcs[n.attr["f"].func.name], keys)
        stack.extend(_node_of(i) for i in n.input)
    for n in mg.graph_def.node:
        if n.op in VARIABLE_OPS and n.name not in keys:
            shared = n.attr["shared_name"].s.decode() if "shared_name" in n.attr else ""
            keys[n.name] = shared or n.name  # TF1 Saver default: the variable's op name
    return keys


def _inline_functions(graph_def, fetches: list[str]):
    """All function calls inlined by Grappler, so variables can be rewritten in one flat graph."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2  # noqa: PLC0415
    from tensorflow.python.grappler import tf_optimizer  # noqa: PLC0415

    if not graph_def.library.function:
        return graph_def
    for fdef in graph_def.library.function:
        if "api_implements" in fdef.attr:  # a GPU alternative would block inlining
            del fdef.attr["api_implements"]
    meta = meta_graph_pb2.MetaGraphDef()
    meta.graph_def.CopyFrom(graph_def)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(fetches)
    meta.collection_def["train_op"].CopyFrom(fetch)
    cfg = config_pb2.ConfigProto()
    ro = cfg.graph_options.rewrite_options
    ro.min_graph_nodes = -1
    ro.optimizers.append("function")
    ro.function_optimization = rewriter_config_pb2.RewriterConfig.AGGRESSIVE
    out = tf_optimizer.OptimizeGraph(cfg, meta)
    return out


def _tensor_info(info) -> TensorInfo:
    if info.WhichOneof("encoding") != "name":
        raise ModelFormatError("signatures with sparse or composite tensors are not supported")
    shape: list[int] | None
    if info.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = [int(d.size) for d in info.tensor_shape.dim]
    return TensorInfo(tensor=info.name, dtype=dtype_name(info.dtype), shape=shape)


def _init_nodes(mg, node_names: set[str]) -> list[str]:
    """The table initializers: the __saved_model_init_op signature and TF1's init collections."""
    init_nodes: list[str] = []
    if INIT_SIGNATURE in mg.signature_def:
        init_nodes += [_node_of(t.name) for t in mg.signature_def[INIT_SIGNATURE].outputs.values()]
    for coll in INIT_COLLECTIONS:
        if coll in mg.collection_def:
            init_nodes += [_node_of(n) for n in mg.collection_def[coll].node_list.value]
    return [n for n in dict.fromkeys(init_nodes) if n in node_names]


def _scope_shared_resources(gd, table_prefix: str) -> None:
    """Tables (and other shared resources) must be the same object in the init graph and in each
    serving graph of this worker, and distinct across model versions."""
    for n in gd.node:
        if "shared_name" in n.attr and n.op not in VARIABLE_OPS and n.op != "Placeholder":
            if not n.attr["shared_name"].s:
                n.attr["shared_name"].s = f"{table_prefix}/{n.name}".encode()
            else:
                n.attr["shared_name"].s = f"{table_prefix}/".encode() + n.attr["shared_name"].s
            if "use_node_name_sharing" in n.attr:
                n.attr["use_node_name_sharing"].b = False


def build_serving_graph(version_dir: str, table_prefix: str,
                        variable_shapes: dict[str, list[int]] | None = None,
                        variable_dtypes: dict[str, Any] | None = None) -> ServingGraph:
    """The rewritten, flat serving graph of one SavedModel version (see module docstring)."""
    tf = _tf()
    from tensorflow.python.framework import graph_util_impl  # noqa: PLC0415

    mg = read_meta_graph(version_dir)
    sigs = {k: s for k, s in mg.signature_def.items() if k != INIT_SIGNATURE}
    if not sigs:
        raise ModelFormatError(f"{version_dir}: the SavedModel has no serving signatures")
    node_names = {n.name for n in mg.graph_def.node}
    init_nodes = _init_nodes(mg, node_names)

    out_nodes = [_node_of(t.name) for s in sigs.values() for t in s.outputs.values()]
    in_names = [t.name for s in sigs.values() for t in s.inputs.values()]
    missing = [n for n in out_nodes + [_node_of(t) for t in in_names] if n not in node_names]
    if missing:
        raise ModelFormatError(f"{version_dir}: signature tensors missing from the graph: {missing[:5]}")
    keys = checkpoint_keys(mg)

    sub = graph_util_impl.extract_sub_graph(mg.graph_def, list(dict.fromkeys(out_nodes + init_nodes)))
    sub.library.CopyFrom(mg.graph_def.library)
    sub.versions.CopyFrom(mg.graph_def.versions)
    flat = _inline_functions(sub, in_names + [f"{n}" for n in out_nodes] + init_nodes)

    variables = _rewrite_variables(flat, keys, variable_shapes or {}, variable_dtypes or {})
    _scope_shared_resources(flat, table_prefix)
    assets = {a.tensor_info.name: os.path.join(version_dir, "assets", a.filename) for a in mg.asset_file_def}
    signatures = {
        k: SignatureInfo(
            method=s.method_name,
            inputs={n: _tensor_info(t) for n, t in s.inputs.items()},
            outputs={n: _tensor_info(t) for n, t in s.outputs.items()},
        )
        for k, s in sigs.items()
    }
    # Validate: the graph must import (catches unsupported rewrites early, in the loader).
    g = tf.Graph()
    with g.as_default():
        try:
            tf.graph_util.import_graph_def(flat, name="")
        except Exception as exc:  # noqa: BLE001
            raise ModelFormatError(f"{version_dir}: rewritten graph does not import: {exc}") from None
    return ServingGraph(flat.SerializeToString(), variables, signatures, init_nodes, assets)


def _rewrite_variables(gd, keys: dict[str, str], shapes: dict[str, list[int]],
                       dtypes: dict[str, Any]) -> list[VariableInput]:
    """Variable ops -> Placeholders; their readers -> plain ops. Edits ``gd`` in place."""
    consumers: dict[str, list[Any]] = {}
    for n in gd.node:
        for inp in n.input:
            if not inp.startswith("^"):
                consumers.setdefault(_node_of(inp), []).append(n)
    variables: list[VariableInput] = []
    axis_consts: list[tuple[str, int]] = []
    for var in [n for n in gd.node if n.op in VARIABLE_OPS]:
        variable, base = _to_placeholder(var, keys, shapes, dtypes)
        variables.append(variable)
        # Walk everything the handle reaches through forwarding ops.
        stack, visited = [var.name], set()
        while stack:
            src = stack.pop()
            if src not in visited:
                visited.add(src)
                for user in consumers.get(src, []):
                    if _rewrite_reader(user, src, base, var.name, axis_consts):
                        stack.append(user.name)
    _drop_control_edges_on_placeholders(gd)
    _add_axis_consts(gd, axis_consts)
    return variables


def _to_placeholder(var, keys: dict[str, str], shapes: dict[str, list[int]],
                    dtypes: dict[str, Any]) -> tuple[VariableInput, Any]:
    """Turns the variable op ``var`` into a Placeholder of the checkpoint's dtype and shape."""
    tf = _tf()
    from tensorflow.core.framework import tensor_shape_pb2  # noqa: PLC0415

    key = keys.get(var.name, var.name)
    base = tf.as_dtype(dtypes[key] if key in dtypes else var.attr["dtype"].type).base_dtype
    shape = shapes.get(key)
    if shape is None:
        shape = [int(d.size) for d in var.attr["shape"].shape.dim]
    name = var.name
    var.Clear()
    var.name = name
    var.op = "Placeholder"
    var.attr["dtype"].type = base.as_datatype_enum
    var.attr["shape"].shape.CopyFrom(
        tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    return VariableInput(node=name, key=key, dtype=dtype_name(base.as_datatype_enum), shape=list(shape)), base


def _rewrite_reader(user, src: str, base, var_name: str, axis_consts: list[tuple[str, int]]) -> bool:
    """Rewrites one consumer of a variable handle; True when its outputs still carry the handle
    (forwarding ops and reads), so its own consumers must be visited too."""
    tf = _tf()
    op = user.op
    if op in FORWARDING_OPS:
        attr = FORWARDING_OPS[op]
        if op == "IdentityN":
            lst = user.attr[attr].list.type
            for j, inp in enumerate(user.input):
                if _node_of(inp) == src and j < len(lst):
                    lst[j] = base.as_datatype_enum
        else:
            user.attr[attr].type = base.as_datatype_enum
        return True
    if op == "ReadVariableOp":
        user.op = "Identity"
        user.attr["T"].type = user.attr["dtype"].type
        del user.attr["dtype"]
        return True
    if op == "ResourceGather":
        _gather_from_placeholder(user, base, axis_consts)
    elif op == "ResourceGatherNd":
        user.op = "GatherNd"
        user.attr["Tparams"].type = base.as_datatype_enum
        if "dtype" in user.attr:
            del user.attr["dtype"]
    elif op == "VariableShape":
        user.op = "Shape"
        user.attr["out_type"].type = user.attr["out_type"].type or tf.int32.as_datatype_enum
        user.attr["T"].type = base.as_datatype_enum
    elif op in ("VarIsInitializedOp", "IsVariableInitialized"):
        user.op = "Const"
        for a in list(user.attr):
            del user.attr[a]
        del user.input[:]
        user.attr["dtype"].type = tf.bool.as_datatype_enum
        user.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(True))
    elif op not in ("GatherV2", "Gather", "Shape", "Size", "Rank") and _mutates_state(user):
        raise ModelFormatError(
            f"variable '{var_name}' is used by op {op} ('{user.name}'), which sgserve cannot "
            f"serve from shared memory (inference graphs should only read variables)")
    # Otherwise a VariableV2 (ref) read directly by a plain op: the placeholder works as is.
    return False


def _gather_from_placeholder(user, base, axis_consts: list[tuple[str, int]]) -> None:
    """ResourceGather -> GatherV2 with an explicit axis input (a Const added by _add_axis_consts)."""
    tf = _tf()
    from tensorflow.core.framework import attr_value_pb2  # noqa: PLC0415

    batch_dims = user.attr["batch_dims"].i if "batch_dims" in user.attr else 0
    tind = user.attr["Tindices"].type
    user.op = "GatherV2"
    for a in ("dtype", "validate_indices", "batch_dims"):
        if a in user.attr:
            del user.attr[a]
    user.attr["Tparams"].type = base.as_datatype_enum
    user.attr["Tindices"].type = tind
    user.attr["Taxis"].type = tf.int32.as_datatype_enum
    user.attr["batch_dims"].CopyFrom(attr_value_pb2.AttrValue(i=batch_dims))
    axis_name = f"{user.name}/sgserve_axis"
    axis_consts.append((axis_name, batch_dims))
    ctrl = [i for i in user.input if i.startswith("^")]
    data = [i for i in user.input if not i.startswith("^")]
    del user.input[:]
    user.input.extend(data[:2] + [axis_name] + ctrl)


def _drop_control_edges_on_placeholders(gd) -> None:
    """Control edges on placeholders would survive import_graph_def's input_map and demand a feed."""
    placeholders = {n.name for n in gd.node if n.op == "Placeholder"}
    for n in gd.node:
        if any(i.startswith("^") and i[1:] in placeholders for i in n.input):
            kept = [i for i in n.input if not (i.startswith("^") and i[1:] in placeholders)]
            del n.input[:]
            n.input.extend(kept)


def _add_axis_consts(gd, axis_consts: list[tuple[str, int]]) -> None:
    tf = _tf()
    for axis_name, batch_dims in axis_consts:
        c = gd.node.add()
        c.name = axis_name
        c.op = "Const"
        c.attr["dtype"].type = tf.int32.as_datatype_enum
        c.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(batch_dims, dtype=tf.int32))


def _mutates_state(user) -> bool:
    """True for ops that mutate state (Assign*, Scatter*, ...): those cannot read shared memory."""
    mutating = ("Assign", "Scatter", "ApplyAdam", "ApplyGradient", "ResourceApply", "ResourceScatter",
                "ResourceSparse", "DestroyResourceOp", "ApplyFtrl", "ApplyAdagrad", "CountUpTo")
    return any(user.op.startswith(m) for m in mutating)
