"""`sgserve bench` against a TF Serving gRPC endpoint (``grpc://HOST:PORT``): TF Serving itself, or
sgserve's own gRPC front door, through TF Serving's stock PredictionService stub.

Each sender thread has its own channel (one HTTP/2 connection), as separate client processes
would; the request proto is built once per input set (``prepare``), so the load generator pays only
the call.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sgserve.bench.config import BenchConfig
from sgserve.bench.targets import EndpointDown
from sgserve.errors import NOT_FOUND, ServeError

_CODES = {"INVALID_ARGUMENT": "400", "NOT_FOUND": "404", "RESOURCE_EXHAUSTED": "429", "INTERNAL": "500",
          "UNAVAILABLE": "503", "DEADLINE_EXCEEDED": "504"}


class GrpcEndpoint:
    def __init__(self, url: str, cfg: BenchConfig) -> None:
        from sgserve.frontdoor import protos  # noqa: PLC0415 - TF Serving's protos without TensorFlow

        protos.load()
        import grpc  # noqa: PLC0415

        self.grpc = grpc
        self.url, self.cfg = url, cfg
        self.target = url.split("://", 1)[1].rstrip("/")

    def channel(self) -> Any:
        return self.grpc.insecure_channel(self.target)

    def signature(self) -> dict[str, Any]:
        from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc  # noqa: PLC0415

        from sgserve.frontdoor.tensors import dtype_name  # noqa: PLC0415

        cfg = self.cfg
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = cfg.model
        if cfg.version is not None:
            req.model_spec.version.value = int(cfg.version)
        channel = self.channel()
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(req, cfg.timeout)
        except self.grpc.RpcError as exc:
            if exc.code() in (self.grpc.StatusCode.UNAVAILABLE, self.grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EndpointDown(f"no server answering at {self.url} ({exc.code().name})") from None
            raise ServeError(f"{self.url}: {exc.details()}", int(_CODES.get(exc.code().name, "500"))) from None
        finally:
            channel.close()
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sigmap)
        if cfg.signature not in sigmap.signature_def:
            raise ServeError(f"model '{cfg.model}' at {self.url} has no signature '{cfg.signature}'", NOT_FOUND)
        inputs = {}
        for name, info in sigmap.signature_def[cfg.signature].inputs.items():
            shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
            inputs[name] = {"dtype": dtype_name(info.dtype), "shape": shape}
        return {"inputs": inputs}

    def session(self) -> "GrpcSession":
        return GrpcSession(self)

    def close(self) -> None:
        pass


class GrpcSession:
    def __init__(self, ep: GrpcEndpoint) -> None:
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: PLC0415

        self._ep = ep
        self._channel = ep.channel()
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel).Predict

    def prepare(self, inputs: dict[str, np.ndarray]) -> Any:
        from tensorflow_serving.apis import predict_pb2  # noqa: PLC0415

        from sgserve.frontdoor.tensors import from_numpy  # noqa: PLC0415

        cfg = self._ep.cfg
        req = predict_pb2.PredictRequest()
        req.model_spec.name = cfg.model
        req.model_spec.signature_name = cfg.signature
        if cfg.version is not None:
            req.model_spec.version.value = int(cfg.version)
        for name, arr in inputs.items():
            req.inputs[name].CopyFrom(from_numpy(arr))
        return req

    def send(self, request: Any) -> tuple[str, str | None]:
        try:
            self._predict(request, self._ep.cfg.timeout)
        except self._ep.grpc.RpcError as exc:
            code = exc.code().name
            return ("timeout" if code == "DEADLINE_EXCEEDED" else _CODES.get(code, code.lower())), None
        return "200", None

    def close(self) -> None:
        self._channel.close()


__all__ = ["GrpcEndpoint", "GrpcSession"]
