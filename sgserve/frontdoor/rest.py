"""TF Serving's REST API on aiohttp, plus the liveness and Prometheus endpoints.

Routes (TF Serving's, tensorflow_serving/model_servers/http_rest_api_handler.cc):

    GET  /v1/models/M[/versions/V | /labels/L]            model status (the readiness probe)
    GET  /v1/models/M[/versions/V | /labels/L]/metadata   signatures
    POST /v1/models/M[/versions/V | /labels/L]:predict    row ("instances") or columnar ("inputs")
    POST /v1/models/M[/versions/V | /labels/L]:classify   tf.Examples ("examples", "context")
    POST /v1/models/M[/versions/V | /labels/L]:regress
    GET  /healthz                                          200 while the broker's loop answers
    GET  <monitoring path>                                 Prometheus text, with --monitoring_config_file

Errors are ``{"error": "..."}`` with the status code's HTTP value (sgserve's codes are TF Serving's
HTTP mapping already). aiohttp was chosen for one event loop shared with grpc.aio and the broker
link, a C HTTP parser, and a long maintenance record; see docs/architecture.md for the numbers.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format

from sgserve.errors import InvalidArgument, ServeError
from sgserve.frontdoor import examples, metrics, rest_json
from sgserve.frontdoor.link import CONNECTION
from sgserve.frontdoor.service import CLASSIFY_METHOD, REGRESS_METHOD, Gateway, predict_header, spec_proto

log = logging.getLogger(__name__)
ENTRYPOINT = "REST"
_JSON = "application/json"
_GET = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(/metadata)?$")
_POST = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(predict|classify|regress)$")


class RestApi:
    def __init__(self, gateway: Gateway, timeout_ms: int, metrics_path: str | None) -> None:
        self.gw = gateway
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        self.metrics_path = metrics_path

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, handler_args={"max_field_size": 1 << 16})
        app.router.add_get("/healthz", self.healthz)
        if self.metrics_path:
            app.router.add_get(self.metrics_path, self.prometheus)
        app.router.add_route("*", "/v1/models/{tail:.*}", self.models)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        return app

    async def healthz(self, _request: web.Request) -> web.Response:
        if await self.gw.alive():
            return web.Response(body=b'{"status": "ok"}', content_type=_JSON)
        return _error(503, "the broker does not answer")

    async def prometheus(self, _request: web.Request) -> web.Response:
        try:
            snapshot = await self.gw.metrics()
        except ServeError as exc:
            return _error(exc.code, exc.message)
        return web.Response(body=metrics.render(snapshot), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def unknown(self, request: web.Request) -> web.Response:
        return _error(404, f"Malformed request: {request.method} {request.path}")

    async def models(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        CONNECTION.set(f"rest:{peer[0]}:{peer[1]}" if peer else None)  # the broker's fair admission
        try:
            if request.method == "GET":
                return await self._get(request.path)
            if request.method == "POST":
                return await self._post(request.path, await request.read())
            raise InvalidArgument(f"Malformed request: {request.method} {request.path}")
        except ServeError as exc:
            return _error(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            log.exception("unexpected error in a REST call")
            return _error(500, f"internal error in the gateway: {type(exc).__name__}: {exc}")

    async def _get(self, path: str) -> web.Response:
        m = _GET.match(path)
        if m is None:
            raise InvalidArgument(f"Malformed request: GET {path}")
        name, version, label, meta = m.groups()
        spec = spec_proto(name, _version(version), label)
        if meta:
            proto = await self.gw.metadata_proto(spec, ["signature_def"], self.timeout)
        else:
            proto = await self.gw.status_proto(spec, self.timeout)
        # Every field, empty ones too, as TF Serving's REST handler prints them (status.error_code "OK").
        return _json(json_format.MessageToDict(proto, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True))

    async def _post(self, path: str, body: bytes) -> web.Response:
        m = _POST.match(path)
        if m is None:
            raise InvalidArgument(f"Malformed request: POST {path}")
        name, version, label, verb = m.groups()
        doc = rest_json.read_json(body)  # its signature_name first: the signature says the dtypes
        header = predict_header(name, _version(version), label, doc.signature_name or "")
        if verb == "predict":
            return await self._predict(header, doc)
        serialized, _ = examples.parse_examples(doc)
        if verb == "classify":
            _, result = await self.gw.classify_or_regress(header, serialized, CLASSIFY_METHOD, self.timeout, ENTRYPOINT)
            return _raw(examples.format_classify(result))
        _, result = await self.gw.classify_or_regress(header, serialized, REGRESS_METHOD, self.timeout, ENTRYPOINT)
        return _raw(examples.format_regress(result))

    async def _predict(self, header: dict[str, Any], doc: rest_json.JsonRequest) -> web.Response:
        _, sig = await self.gw.signature(header, self.timeout)
        inputs, fmt, _ = rest_json.parse_predict(doc, sig)
        _, outputs = await self.gw.predict(header, inputs, self.timeout, ENTRYPOINT)
        return _raw(rest_json.format_predict(outputs, fmt))


def _version(text: str | None) -> int | None:
    """The URL's version number: a version past int64 is a 400, not a failed proto assignment."""
    if not text:
        return None
    version = int(text)
    if version >= 1 << 63:
        raise InvalidArgument(f"version {text} is out of range: versions are 64-bit integers")
    return version


def _raw(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=_JSON)


def _json(doc: Any) -> web.Response:
    return _raw(orjson.dumps(doc))


def _error(code: int, message: str) -> web.Response:
    return web.Response(status=code, body=rest_json.error_body(message), content_type=_JSON)


__all__ = ["RestApi"]
