"""The servers a benchmark can load: an sgserve broker over ZeroMQ, or a TF Serving REST endpoint
(grpc_target.py adds TF Serving gRPC endpoints).

Each target answers its model's signature once (to synthesize inputs) and hands every sender thread
a session whose ``send`` reports one request's outcome as a status string, never raising: the
benchmark counts errors, it does not stop on them.
"""
from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any, Protocol

import numpy as np

from sgserve.bench.config import BenchConfig, endpoint_kind
from sgserve.errors import DEADLINE_EXCEEDED, NOT_FOUND, ServeError, Unavailable

_HTTP_CODES = (400, 404, 429, 500, 503, 504)


class EndpointDown(Unavailable):
    """Nothing answers at the endpoint (refused, or no reply within the timeout)."""


class Session(Protocol):
    """One thread's connection to an endpoint."""

    def prepare(self, inputs: dict[str, np.ndarray]) -> Any:
        """Encodes a request once, so that sending it again costs no encoding."""

    def send(self, request: Any) -> tuple[str, str | None]:
        """Sends one request and waits for it: (status code as a string, worker index or None)."""

    def close(self) -> None: ...


def synth_inputs(signature: dict[str, Any], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs that fit a signature: -1 in the first dim is the batch, other -1 dims are 1."""
    out = {}
    for name, spec in signature["inputs"].items():
        shape = spec["shape"] if spec["shape"] is not None else [-1]
        dims = [batch if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(shape)]
        dt = spec["dtype"]
        if dt == "string":
            out[name] = np.full(dims, b"a", dtype=object)
        elif dt == "bool":
            out[name] = rng.integers(0, 2, dims).astype(bool)
        elif np.dtype(dt).kind in "iu":
            out[name] = rng.integers(0, 1000, dims).astype(dt)
        else:
            out[name] = rng.standard_normal(dims).astype(dt)
    return out


# ------------------------------------------------------------------------------------ sgserve
class SgserveEndpoint:
    """An sgserve broker, through one Client whose sockets are per thread."""

    def __init__(self, url: str, cfg: BenchConfig) -> None:
        from sgserve.client import Client  # noqa: PLC0415 - keeps `import sgserve.bench.loadgen` light

        self.url, self.cfg = url, cfg
        self.client = Client(url, timeout=cfg.timeout)

    def signature(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            meta = self.client.metadata(cfg.model, version=cfg.version)
        except ServeError as exc:
            if exc.code == DEADLINE_EXCEEDED:
                raise EndpointDown(f"no server answering at {self.url} (no reply within about "
                                   f"{cfg.timeout:g} s)") from None
            if exc.code == NOT_FOUND:
                raise ServeError(f"{self.url}: {exc.message}", NOT_FOUND) from None
            raise ServeError(f"{self.url} refused the metadata request: {exc.message}", exc.code) from None
        sig = meta["signatures"].get(cfg.signature)
        if sig is None:
            raise ServeError(f"model '{cfg.model}' at {self.url} has no signature '{cfg.signature}' "
                             f"(it has {', '.join(sorted(meta['signatures']))})", NOT_FOUND)
        return sig

    def session(self) -> "SgserveSession":
        return SgserveSession(self)

    def close(self) -> None:
        self.client.close()


class SgserveSession:
    def __init__(self, ep: SgserveEndpoint) -> None:
        self._ep = ep

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs

    def send(self, request: dict[str, np.ndarray]) -> tuple[str, str | None]:
        cfg = self._ep.cfg
        try:
            res = self._ep.client.predict_full(cfg.model, request, version=cfg.version, signature=cfg.signature,
                                               timeout=cfg.timeout)
        except ServeError as exc:
            return str(exc.code), None
        if res.parts > 1:  # split across workers: counted as e.g. "0+1" in workers seen
            return "200", "+".join(map(str, res.workers))
        return "200", str(res.worker)

    def close(self) -> None:
        pass  # the Client closes every thread's socket


# ------------------------------------------------------------------------------------ TF Serving REST
_TF_DTYPES = {"DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16", "DT_INT8": "int8",
              "DT_INT16": "int16", "DT_INT32": "int32", "DT_INT64": "int64", "DT_UINT8": "uint8",
              "DT_UINT16": "uint16", "DT_UINT32": "uint32", "DT_UINT64": "uint64", "DT_BOOL": "bool",
              "DT_STRING": "string"}


def signature_from_tfserving(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """TF Serving's metadata JSON -> the signature form synth_inputs reads ({"inputs": {n: {dtype, shape}}}).

    Sizes may be strings (protobuf's JSON writes int64 as strings); -1 is an unknown dimension and
    ``unknown_rank`` an unknown shape.
    """
    try:
        sigs = meta["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError):
        raise ValueError("metadata has no metadata.signature_def.signature_def") from None
    if name not in sigs:
        raise KeyError(name)
    inputs = {}
    for inp, spec in sigs[name].get("inputs", {}).items():
        dtype = _TF_DTYPES.get(spec.get("dtype", ""))
        if dtype is None:
            raise ValueError(f"input '{inp}' has dtype {spec.get('dtype')}, which bench cannot synthesize")
        ts = spec.get("tensor_shape") or {}
        shape = None if ts.get("unknown_rank") else [int(d.get("size", -1)) for d in ts.get("dim", [])]
        inputs[inp] = {"dtype": dtype, "shape": shape}
    return {"inputs": inputs}


class HttpEndpoint:
    """A TF Serving compatible REST endpoint (TF Serving itself, or any server speaking its API).

    Plain http.client, one keep-alive connection per sender thread, rather than urllib3's pool: the
    load generator's own CPU per request is what limits how hard one process can push a server, and
    urllib3 (2.8, no retries) measured 1.4 to 1.7 times the client CPU per request of this path
    against the same local server (about 260 against 160 us), for nothing a benchmark needs.
    """

    def __init__(self, url: str, cfg: BenchConfig) -> None:
        self.url, self.cfg = url, cfg
        u = urllib.parse.urlsplit(url)
        if not u.hostname:
            raise ValueError(f"endpoint {url!r} has no host")
        self.https = u.scheme.lower() == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        model = urllib.parse.quote(cfg.model, safe="")
        base = u.path.rstrip("/") + f"/v1/models/{model}"
        if cfg.version is not None:
            base += f"/versions/{int(cfg.version)}"
        self.metadata_path, self.predict_path = base + "/metadata", base + ":predict"

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.cfg.timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stall on small bodies
        return conn

    def signature(self) -> dict[str, Any]:
        cfg = self.cfg
        try:
            conn = self.connect()
            try:
                conn.request("GET", self.metadata_path)
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
        except TimeoutError:
            raise EndpointDown(f"no server answering at {self.url} (no answer within {cfg.timeout:g} s)") from None
        except (OSError, http.client.HTTPException) as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
            raise EndpointDown(f"no server answering at {self.url} ({why})") from None
        text = body.decode("utf-8", "replace")[:300]
        if resp.status != 200:
            raise ServeError(f"{self.url}: GET {self.metadata_path} answered HTTP {resp.status}: {text}",
                             resp.status if resp.status in _HTTP_CODES else 500)
        try:
            return signature_from_tfserving(json.loads(body), cfg.signature)
        except KeyError:
            raise ServeError(f"model '{cfg.model}' at {self.url} has no signature '{cfg.signature}'",
                             NOT_FOUND) from None
        except ValueError as exc:
            raise ServeError(f"{self.url}: unusable metadata: {exc}", 500) from None

    def session(self) -> "HttpSession":
        return HttpSession(self)

    def close(self) -> None:
        pass


class HttpSession:
    """One keep-alive connection; reconnects after an error or a server-side close."""

    def __init__(self, ep: HttpEndpoint) -> None:
        self._ep = ep
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0  # requests answered on the current connection
        self._headers = {"Content-Type": "application/json"}

    def prepare(self, inputs: dict[str, np.ndarray]) -> bytes:
        cols = {k: (np.char.decode(v.astype("S"), "utf-8").tolist() if v.dtype == object else v.tolist())
                for k, v in inputs.items()}
        return json.dumps({"signature_name": self._ep.cfg.signature, "inputs": cols}).encode()

    def send(self, request: bytes) -> tuple[str, str | None]:
        for attempt in (0, 1):
            reused = self._used > 0
            try:
                if self._conn is None:
                    self._conn, self._used = self._ep.connect(), 0
                self._conn.request("POST", self._ep.predict_path, body=request, headers=self._headers)
                resp = self._conn.getresponse()
                body = resp.read()
            except TimeoutError:
                self._drop()
                return "timeout", None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                # A kept-alive connection the server closed while idle: retry once on a fresh one.
                if attempt == 0 and reused and isinstance(exc, (ConnectionResetError, BrokenPipeError,
                                                                http.client.RemoteDisconnected)):
                    continue
                return "connection", None
            break
        self._used += 1
        if resp.will_close:
            self._drop()
        if resp.status != 200:
            return str(resp.status), None
        try:
            reply = json.loads(body)
        except ValueError:
            return "bad_reply", None
        return ("200" if isinstance(reply, dict) and ("outputs" in reply or "predictions" in reply)
                else "bad_reply"), None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._used = None, 0

    def close(self) -> None:
        self._drop()


Endpoint = Any  # SgserveEndpoint | HttpEndpoint | grpc_target.GrpcEndpoint


def open_endpoint(url: str, cfg: BenchConfig) -> Endpoint:
    kind = endpoint_kind(url)
    if kind == "grpc":
        from sgserve.bench.grpc_target import GrpcEndpoint  # noqa: PLC0415 - grpc only when asked for

        return GrpcEndpoint(url, cfg)
    return SgserveEndpoint(url, cfg) if kind == "sgserve" else HttpEndpoint(url, cfg)
