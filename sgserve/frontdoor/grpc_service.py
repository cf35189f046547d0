"""TF Serving's gRPC services (PredictionService, ModelService) from its own generated stubs.

Served by grpc.aio on the gateway's event loop. Each call becomes native requests through
service.Gateway; a ServeError becomes TF Serving's status code (errors.CODE_NAMES holds the same
names) with its message. The call's gRPC deadline travels to the broker as the request's timeout,
so a request whose caller has given up is answered 504 in the broker's queue and never run.
"""
from __future__ import annotations

import logging
import ssl
from typing import Any

import grpc

from sgserve.auth import is_local_peer
from sgserve.errors import InvalidArgument, PermissionDenied, ServeError
from sgserve.frontdoor import examples, protos, tensors
from sgserve.frontdoor.link import CONNECTION
from sgserve.frontdoor.service import CLASSIFY_METHOD, REGRESS_METHOD, Gateway, grpc_code_name, model_header

protos.load()
from google.protobuf import message, message_factory  # noqa: E402
from tensorflow_serving.apis import (classification_pb2, inference_pb2, model_management_pb2,  # noqa: E402
                                     model_service_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2, prediction_service_pb2_grpc, regression_pb2)

log = logging.getLogger(__name__)
ENTRYPOINT = "GRPC"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ServeError):
        await context.abort(grpc.StatusCode[grpc_code_name(exc.code)], exc.message)
    log.exception("unexpected error in a gRPC call")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the gateway: {type(exc).__name__}: {exc}")


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The call's remaining time (its gRPC deadline), and, for the broker's fair admission, the
    connection it arrived on (link.CONNECTION: each RPC runs in its own task and context)."""
    CONNECTION.set(context.peer())
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining, 0.001)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - TF Serving's name
        try:
            header = model_header(request.model_spec)
            if request.output_filter:
                header["output_filter"] = list(request.output_filter)
            inputs = {name: tensors.to_numpy(tp, name) for name, tp in request.inputs.items()}
            reply, outputs = await self.gw.predict(header, inputs, _timeout(context), ENTRYPOINT)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = reply.get("model", header["model"])
            response.model_spec.version.value = reply.get("version", 0)
            response.model_spec.signature_name = header["signature"]
            for name, arr in outputs.items():
                # The typed value fields (float_val...), as TF Serving answers by default: clients
                # that read them directly, not through make_ndarray, get their values.
                response.outputs[name].CopyFrom(tensors.from_numpy(arr, typed_fields=True))
            return response
        except Exception as exc:  # noqa: BLE001 - every call gets a status
            await _abort(context, exc)

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            return await self.gw.metadata_proto(request.model_spec, list(request.metadata_field), _timeout(context))
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._examples(request, context, CLASSIFY_METHOD, classification_pb2.ClassificationResponse)

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._examples(request, context, REGRESS_METHOD, regression_pb2.RegressionResponse)

    async def _examples(self, request: Any, context: grpc.aio.ServicerContext, method: str, response_class: Any) -> Any:
        """Classify or Regress: the signature run on the request's tf.Examples."""
        try:
            reply, result = await self.gw.classify_or_regress(
                model_header(request.model_spec), examples.serialize_input(request.input), method,
                _timeout(context), ENTRYPOINT)
            response = response_class(result=result)
            _fill_spec(response.model_spec, reply, request.model_spec)
            return response
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Each task (classify or regress, one model each, as TF Serving requires) on the same input."""
        try:
            if not request.tasks:
                raise InvalidArgument("Inference tasks should not be empty")
            names = {t.model_spec.name for t in request.tasks}
            if len(names) != 1:
                raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same model name")
            serialized = examples.serialize_input(request.input)
            response = inference_pb2.MultiInferenceResponse()
            for task in request.tasks:
                if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                    raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
                reply, result = await self.gw.classify_or_regress(
                    model_header(task.model_spec), serialized, task.method_name, _timeout(context), ENTRYPOINT)
                out = response.results.add()
                _fill_spec(out.model_spec, reply, task.model_spec)
                if task.method_name == CLASSIFY_METHOD:
                    out.classification_result.CopyFrom(result)
                else:
                    out.regression_result.CopyFrom(result)
            return response
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, gateway: Gateway, admin_certs: list[str] | None = None) -> None:
        self.gw = gateway
        self.admin_certs = {ssl.PEM_cert_to_DER_cert(pem) for pem in admin_certs or ()}

    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            return await self.gw.status_proto(request.model_spec, _timeout(context))
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    async def HandleReloadConfigRequest(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Applies the config and waits for its models (TF Serving answers failures with the error
        status both on the RPC and in the response's status; a stock client sees the RPC's)."""
        try:
            if not _may_admin(context, self.admin_certs):
                raise PermissionDenied("HandleReloadConfigRequest is an admin call: accepted only from loopback, "
                                       "or over TLS with a client certificate in --ssl-admin-client-certs")
            await self.gw.reload_config(request.config, _timeout(context))
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0
        return response


def _fill_spec(out: Any, reply: dict[str, Any], spec: Any) -> None:
    out.name = reply.get("model", spec.name)
    out.version.value = reply.get("version", 0)
    out.signature_name = spec.signature_name or "serving_default"


def _may_admin(context: grpc.aio.ServicerContext, admin_certs: set[bytes]) -> bool:
    """The gateway's admin rule (the broker trusts the gateway's own key, so the gateway judges its
    callers): a loopback peer, or a verified TLS client whose certificate is listed."""
    kind, _, address = (context.peer() or "").partition(":")
    if kind == "unix" or (kind in ("ipv4", "ipv6") and is_local_peer(address.rpartition(":")[0])):
        return True
    if not admin_certs:
        return False  # client_verify off, or no --ssl-admin-client-certs: a certificate proves nothing here
    presented = (context.auth_context() or {}).get("x509_pem_cert") or []
    return any(ssl.PEM_cert_to_DER_cert(pem.decode()) in admin_certs for pem in presented)


def add_services(server: grpc.aio.Server, gateway: Gateway, admin_certs: list[str] | None = None) -> None:
    """``admin_certs``: PEM certificates whose verified holders may reload the config from anywhere."""
    server.add_generic_rpc_handlers((
        _handlers(prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"], PredictionService(gateway)),
        _handlers(model_service_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelService(gateway, admin_certs))))


def _handlers(service: Any, servicer: Any) -> grpc.GenericRpcHandler:
    """The service's methods, each parsing its own request: bytes that are not the request message
    get INVALID_ARGUMENT from us (grpc's own deserializer would answer UNKNOWN and log a traceback)."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_class),
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _parsing(impl: Any, request_class: Any) -> Any:
    async def call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_class.FromString(data)
        except message.DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {request_class.DESCRIPTOR.full_name}: {exc}")
        return await impl(request, context)
    return call


__all__ = ["PredictionService", "ModelService", "add_services"]
