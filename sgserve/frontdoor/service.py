"""What TF Serving's APIs mean in sgserve's terms, shared by the gRPC and the REST front doors.

Each TF Serving call becomes one or more native requests to the broker (through BrokerLink), and
each native reply becomes TF Serving's answer: a ModelSpec becomes the header's model, version or
version_label and signature; a status reply becomes ModelVersionStatus; metadata becomes
SignatureDefs. The transports (grpc_service.py, rest.py) only decode and encode.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from sgserve.errors import CODE_NAMES, DeadlineExceeded, InvalidArgument, NotFound, ServeError
from sgserve.frontdoor import examples, protos, tensors
from sgserve.frontdoor.link import BrokerLink
from sgserve.protocol import DEFAULT_SIGNATURE, METADATA, METRICS, PING, PREDICT, RELOAD_CONFIG, STATUS

protos.load()
from google.protobuf import any_pb2, text_format  # noqa: E402
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2  # noqa: E402

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
PREDICT_METHOD = "tensorflow/serving/predict"
METADATA_TTL = 1.0  # seconds a model's signatures are reused by REST before they are asked again
RELOAD_POLL = 0.05  # seconds between status polls while a reloaded config loads

# sgserve's version states -> TF Serving's ModelVersionStatus.State (FAILED is END with an error).
_STATES = {"LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50, "FAILED": 50}


def model_header(spec: Any) -> dict[str, Any]:
    """The native predict header for a TF Serving ModelSpec (a gRPC message)."""
    choice = spec.WhichOneof("version_choice")
    return predict_header(spec.name, spec.version.value if choice == "version" else None,
                          spec.version_label if choice == "version_label" else None, spec.signature_name)


def predict_header(name: str, version: int | None, label: str | None, signature: str) -> dict[str, Any]:
    """The native predict header for a model, version or label, and signature ("" = the default)."""
    if not name:
        raise InvalidArgument("Missing ModelSpec: the request names no model")
    header: dict[str, Any] = {"type": PREDICT, "model": name, "signature": signature or DEFAULT_SIGNATURE}
    if version is not None:
        header["version"] = version
    elif label is not None:
        header["version_label"] = label
    return header


def spec_proto(name: str, version: int | None = None, label: str | None = None, signature: str = "") -> Any:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    if version is not None:
        spec.version.value = version
    elif label is not None:
        spec.version_label = label
    return spec


class Gateway:
    """The calls both front doors make; one per gateway process, over one BrokerLink (the
    metadata cache is shared by both)."""

    def __init__(self, link: BrokerLink) -> None:
        self.link = link
        self._metadata: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}

    # -- inference -----------------------------------------------------------------------------
    async def predict(self, header: dict[str, Any], inputs: dict[str, np.ndarray], timeout: float | None,
                      entrypoint: str, api: str = "predict") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        header["api"], header["entrypoint"] = api, entrypoint
        return await self.link.call(header, inputs, timeout)

    async def signature(self, header: dict[str, Any], timeout: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metadata reply, the signature a predict header names), cached for METADATA_TTL s."""
        key = (header["model"], header.get("version"), header.get("version_label"))
        now = time.monotonic()
        cached = self._metadata.get(key)
        if cached is None or now - cached[0] > METADATA_TTL:
            meta = await self.metadata(header["model"], header.get("version"), header.get("version_label"), timeout)
            if len(self._metadata) > 1024:
                self._metadata.clear()
            cached = self._metadata[key] = (now, meta)
        meta = cached[1]
        name = header.get("signature") or DEFAULT_SIGNATURE
        sig = meta["signatures"].get(name)
        if sig is None:  # 404, as the broker answers a native or gRPC predict naming it
            raise NotFound(f"model '{meta['model']}' version {meta['version']} has no signature '{name}'; "
                           f"available signatures: {', '.join(sorted(meta['signatures']))}")
        return meta, sig

    async def classify_or_regress(self, header: dict[str, Any], serialized: np.ndarray, method: str,
                                  timeout: float | None, entrypoint: str) -> tuple[dict[str, Any], Any]:
        """(reply, ClassificationResult or RegressionResult) of a classify or regress signature run
        on serialized tf.Examples (examples.serialize_input / parse_examples)."""
        _, sig = await self.signature(header, timeout)
        if sig.get("method") != method:
            raise InvalidArgument(f"Expected {method} signature method_name, got: {sig.get('method')} "
                                  f"(signature \"{header['signature']}\")")
        names = list(sig["inputs"])
        if len(names) != 1:
            raise InvalidArgument(f"Expected one input Tensor, got {len(names)} in signature "
                                  f"\"{header['signature']}\"")
        api = "classify" if method == CLASSIFY_METHOD else "regress"
        reply, outputs = await self.predict(header, {names[0]: serialized}, timeout, entrypoint, api)
        if method == CLASSIFY_METHOD:
            return reply, examples.classification_result(outputs.get("classes"), outputs.get("scores"), len(serialized))
        return reply, examples.regression_result(_regression_output(outputs), len(serialized))

    # -- models --------------------------------------------------------------------------------
    async def metadata(self, model: str, version: int | None, label: str | None,
                       timeout: float | None) -> dict[str, Any]:
        header: dict[str, Any] = {"type": METADATA, "model": model}
        if version is not None:
            header["version"] = version
        if label is not None:
            header["version_label"] = label
        reply, _ = await self.link.call(header, None, timeout)
        return reply

    async def metadata_proto(self, spec: Any, fields: list[str], timeout: float | None) -> Any:
        """GetModelMetadataResponse: only the signature_def field exists, as in TF Serving."""
        if not fields:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != "signature_def":
                raise InvalidArgument(f"Metadata field {field} is not supported")
        choice = spec.WhichOneof("version_choice")
        meta = await self.metadata(spec.name or _missing_spec(), spec.version.value if choice == "version" else None,
                                   spec.version_label if choice == "version_label" else None, timeout)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = meta["model"]
        response.model_spec.version.value = meta["version"]
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in meta["signatures"].items():
            signature_def(sigmap.signature_def[name], sig)
        packed = any_pb2.Any()
        packed.Pack(sigmap)
        response.metadata["signature_def"].CopyFrom(packed)
        return response

    async def status_proto(self, spec: Any, timeout: float | None) -> Any:
        """GetModelStatusResponse for a ModelSpec: every version, or the one it names."""
        if not spec.name:
            _missing_spec()
        status, _ = await self.link.call({"type": STATUS}, None, timeout)
        model = next((m for m in status.get("model_status", []) if m["name"] == spec.name and not m["removed"]), None)
        if model is None:
            raise NotFound(f"Could not find any versions of model {spec.name}")
        versions = model["versions"]
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            label = spec.version_label
            if label not in model["labels"]:
                raise NotFound(f"Unrecognized servable version label: {label}")
            versions = [v for v in versions if v["version"] == model["labels"][label]]
        elif choice == "version":
            versions = [v for v in versions if v["version"] == spec.version.value]
            if not versions:
                raise NotFound(f"Could not find version {spec.version.value} of model {spec.name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            row = response.model_version_status.add(version=v["version"], state=_STATES.get(v["state"], 0))
            row.status.SetInParent()  # error_code OK, written out, as TF Serving does
            if v["state"] == "FAILED" or v.get("error"):
                row.status.error_code = 13  # INTERNAL, as TF Serving reports a failed load
                row.status.error_message = str(v.get("error") or "load failed")
        return response

    async def reload_config(self, config: Any, timeout: float | None) -> None:
        """Applies a ModelServerConfig and waits, as TF Serving does, until each configured model
        has an AVAILABLE version or one of them failed to load."""
        if config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument("ServerConfig type not supported by HandleReloadConfigRequest. Only "
                                  "ModelConfigList is currently supported")
        text = text_format.MessageToString(config)
        reply, _ = await self.link.call({"type": RELOAD_CONFIG, "config": text}, None, timeout)
        names = set(reply.get("models", []))
        end = None if timeout is None else time.monotonic() + timeout
        while names:
            status, _ = await self.link.call({"type": STATUS}, None, timeout)
            for m in status.get("model_status", []):
                if m["name"] not in names:
                    continue
                if any(v["state"] == "AVAILABLE" for v in m["versions"]):
                    names.discard(m["name"])
                elif m.get("error") or any(v["state"] == "FAILED" for v in m["versions"]):
                    failed = next((v.get("error") for v in m["versions"] if v["state"] == "FAILED"), m.get("error"))
                    raise ServeError(f"model '{m['name']}' failed to load: {failed}", 500)
            if names and end is not None and time.monotonic() > end:
                raise DeadlineExceeded(f"config applied, but {', '.join(sorted(names))} not AVAILABLE in time")
            if names:
                await asyncio.sleep(RELOAD_POLL)

    async def alive(self) -> bool:
        """The liveness probe: the broker's loop answers a ping within a second."""
        try:
            await self.link.call({"type": PING}, None, 1.0)
        except ServeError:
            return False
        return True

    async def metrics(self, timeout: float | None = 5.0) -> dict[str, Any]:
        reply, _ = await self.link.call({"type": METRICS}, None, timeout)
        return reply


def signature_def(out: Any, sig: dict[str, Any]) -> None:
    """Fills a SignatureDef from sgserve's signature description (dtype names, -1 for unknown dims)."""
    out.method_name = sig.get("method") or PREDICT_METHOD
    for kind in ("inputs", "outputs"):
        for name, spec in sig[kind].items():
            info = getattr(out, kind)[name]
            info.name = spec.get("tensor") or name
            info.dtype = tensors.dtype_enum(spec["dtype"])
            shape = spec.get("shape")
            if shape is None:
                info.tensor_shape.unknown_rank = True
            else:
                for d in shape:
                    info.tensor_shape.dim.add(size=-1 if d is None else int(d))


def _regression_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "outputs" in outputs:
        return outputs["outputs"]
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    raise InvalidArgument(f"Expected one output Tensor 'outputs' from the regress signature, got "
                          f"{', '.join(sorted(outputs))}")


def grpc_code_name(code: int) -> str:
    return CODE_NAMES.get(code, "INTERNAL")


def _missing_spec() -> str:
    raise InvalidArgument("Missing ModelSpec: the request names no model")


__all__ = ["Gateway", "model_header", "spec_proto", "signature_def", "grpc_code_name", "CLASSIFY_METHOD",
           "REGRESS_METHOD", "PREDICT_METHOD"]
