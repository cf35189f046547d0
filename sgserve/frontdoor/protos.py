"""TF Serving's protos (tensorflow-serving-api) without importing TensorFlow.

Why: the generated ``*_pb2`` modules of tensorflow-serving-api import TensorFlow's own protos
(``tensorflow.core.framework.tensor_pb2`` ...), and importing any ``tensorflow.*`` module first runs
``tensorflow/__init__.py``, which imports all of TensorFlow: 3.3 s and 540 MB for a process that
only needs message classes. The gateway never runs a TensorFlow op, so ``load()`` puts a bare
package module named ``tensorflow`` in ``sys.modules`` (its ``__path__`` is the installed package's,
found with ``importlib.util.find_spec``, which executes nothing), imports the pb2 modules under it
(0.1 s, 34 MB), and then takes the bare module out again.

After ``load()`` the pb2 modules stay in ``sys.modules`` under their real names, and a later
``import tensorflow`` runs the real TensorFlow, which reuses them (tested), so a process that does
need TensorFlow is not broken by having called this. What such a process must not do is import a
``tensorflow.*`` proto module that ``load()`` did not load, expecting it to be cheap: with the bare
module gone, that import is a full TensorFlow import. ``import_module`` loads one more proto module
the cheap way. When the real TensorFlow is already imported (tests, the workers), nothing is
stubbed: its modules are used as they are.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

# Attribute name on the namespace ``load()`` returns -> module, in import order.
MODULES: dict[str, str] = {
    "tensor_pb2": "tensorflow.core.framework.tensor_pb2",
    "tensor_shape_pb2": "tensorflow.core.framework.tensor_shape_pb2",
    "types_pb2": "tensorflow.core.framework.types_pb2",
    "meta_graph_pb2": "tensorflow.core.protobuf.meta_graph_pb2",
    "example_pb2": "tensorflow.core.example.example_pb2",
    "feature_pb2": "tensorflow.core.example.feature_pb2",
    "model_pb2": "tensorflow_serving.apis.model_pb2",
    "input_pb2": "tensorflow_serving.apis.input_pb2",
    "predict_pb2": "tensorflow_serving.apis.predict_pb2",
    "classification_pb2": "tensorflow_serving.apis.classification_pb2",
    "regression_pb2": "tensorflow_serving.apis.regression_pb2",
    "inference_pb2": "tensorflow_serving.apis.inference_pb2",
    "get_model_metadata_pb2": "tensorflow_serving.apis.get_model_metadata_pb2",
    "get_model_status_pb2": "tensorflow_serving.apis.get_model_status_pb2",
    "model_management_pb2": "tensorflow_serving.apis.model_management_pb2",
    "prediction_log_pb2": "tensorflow_serving.apis.prediction_log_pb2",
    "model_server_config_pb2": "tensorflow_serving.config.model_server_config_pb2",
    "prediction_service_pb2_grpc": "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "model_service_pb2_grpc": "tensorflow_serving.apis.model_service_pb2_grpc",
}

_LOCK = threading.RLock()  # the bare module must not be seen, or removed, by another import
_LOADED: types.SimpleNamespace | None = None


def load() -> types.SimpleNamespace:
    """TF Serving's and TensorFlow's proto modules, as attributes named as in MODULES (idempotent).

    The ``*_grpc`` modules need grpcio; without it they are None and the rest still loads.
    """
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    with _LOCK:
        if _LOADED is None:
            loaded: dict[str, Any] = {}
            for attr, name in MODULES.items():
                try:
                    loaded[attr] = import_module(name)
                except ImportError as exc:
                    if not attr.endswith("_grpc") or "grpc" not in str(exc):
                        raise
                    loaded[attr] = None
            _LOADED = types.SimpleNamespace(**loaded)
    return _LOADED


def import_module(name: str) -> types.ModuleType:
    """Imports a module that imports TensorFlow's protos, without importing TensorFlow itself."""
    if name in sys.modules:
        return sys.modules[name]
    with _LOCK:
        if "tensorflow" in sys.modules:  # the real one
            return importlib.import_module(name)
        stub = _bare_tensorflow()
        sys.modules["tensorflow"] = stub
        try:
            return importlib.import_module(name)
        finally:
            if sys.modules.get("tensorflow") is stub:
                del sys.modules["tensorflow"]


def _bare_tensorflow() -> types.ModuleType:
    """A package module named ``tensorflow`` over the installed package's folder, never executed,
    so that ``tensorflow.core...`` submodules import alone."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("TF Serving's protos need the tensorflow package installed (its proto "
                          "modules; TensorFlow itself is not imported)")
    stub = types.ModuleType("tensorflow", "Bare package for TensorFlow's proto modules (sgserve.frontdoor.protos)")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__file__ = None
    return stub
