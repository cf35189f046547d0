"""Who may talk to the server, and who may run its admin commands.

Authentication is ZeroMQ's CURVE (RFC 26/CurveZMQ), with ZeroMQ's own certificate files
(``zmq.auth.create_certificates``: ``NAME.key`` holds a public key, ``NAME.key_secret`` both). With
``--curve-secret-key`` the broker's frontend is a CURVE server, and a ZAP handler
(``zmq.auth.ThreadAuthenticator``, a thread of the broker process) accepts only the public keys found
in ``--curve-authorized-clients`` and ``--curve-admin-clients`` (plus the key made for the gateways).
Any other client fails the handshake inside libzmq: the broker never sees its messages and it gets
no answer at all.

Authorization is one rule, applied by the routing core only to ADMIN_TYPES (never on a predict):
the ZAP handler tags each connection with its public key (the frame property ``User-Id``); with an
admin list, a listed key may run them, others get 403. Without CURVE, or with CURVE but no admin
list, the admin commands are taken only from loopback or ipc peers (``Peer-Address``).

The backend (broker <-> workers) needs none of this: it is an ``ipc://`` socket in the server's
runtime directory, mode 0700 and owned by the server's user, so only that user can connect to it;
and that user can already read the model segments and signal the processes.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any, Iterable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from sgserve.errors import ConfigError
from sgserve.protocol import PIN, RELOAD_CONFIG, SHUTDOWN, UNPIN

log = logging.getLogger(__name__)

# `metrics` is not here: it tells no more than `status` (counts and latencies), which every client
# may read, and the gateway's Prometheus page must not need an admin key.
ADMIN_TYPES = frozenset((SHUTDOWN, PIN, UNPIN, RELOAD_CONFIG))
SERVER_CERT = "server"
GATEWAY_CERT = "gateway"
KEY_LEN = 40  # a Z85-encoded CURVE key

# Environment variables of every command that connects (and defaults of sgserve.Client).
ENV_SERVER_KEY = "SGSERVE_CURVE_SERVER_KEY"
ENV_CLIENT_KEY = "SGSERVE_CURVE_CLIENT_KEY"

Key = str | os.PathLike | bytes | None


# -- keys on disk ----------------------------------------------------------------------------------
def keygen(directory: str, clients: Iterable[str] = ("client",)) -> list[str]:
    """Writes a server key pair (unless DIR has one) and one key pair per client name into DIR, in
    ZeroMQ's certificate format; secret files are 0600. Returns the paths written. An existing
    client key is never overwritten: clients already hold it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    written: list[str] = []
    names = list(clients)
    if not os.path.exists(os.path.join(directory, f"{SERVER_CERT}.key_secret")):
        names.insert(0, SERVER_CERT)
    for name in names:
        if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            raise ConfigError(f"{directory}/{name}.key_secret exists; give another client name")
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    return written


def load_secret_cert(path: str, flag: str) -> tuple[bytes, bytes]:
    """(public, secret) of a ``.key_secret`` certificate; ConfigError naming ``flag`` otherwise."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read a ZeroMQ certificate ({exc}); "
                          f"`sgserve keygen DIR` writes them") from None
    if not secret:
        raise ConfigError(f"{flag} {path} holds no secret key (it is a public .key file; give the .key_secret)")
    return public, secret


def load_public_keys(directory: str, flag: str) -> set[bytes]:
    """The Z85 public keys of every ``*.key`` file in ``directory`` (one per client)."""
    try:
        keys = set(zmq.auth.load_certificates(directory))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {directory}: {exc}") from None
    if not keys:
        raise ConfigError(f"{flag} {directory} holds no public key files (*.key)")
    return keys


def check_settings(config: Any) -> None:
    """Fails a start with a bad CURVE setting before any model loads (ConfigError: exit 2)."""
    secret = getattr(config, "curve_secret_key", None)
    clients = getattr(config, "curve_authorized_clients", None)
    admins = getattr(config, "curve_admin_clients", None)
    if not secret:
        if clients or admins:
            raise ConfigError("--curve-authorized-clients and --curve-admin-clients need --curve-secret-key")
        return
    if not clients:
        raise ConfigError("--curve-secret-key needs --curve-authorized-clients (a directory of client .key files)")
    load_secret_cert(secret, "--curve-secret-key")
    load_public_keys(clients, "--curve-authorized-clients")
    if admins:
        load_public_keys(admins, "--curve-admin-clients")


# -- the client side -----------------------------------------------------------------------------
def _key_material(key: Key, env: str) -> Key:
    return key if key is not None else (os.environ.get(env) or None)


def client_curve(server_key: Key = None, client_key: Key = None) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) for a CURVE client, or None for a plain one.

    A str or path is a certificate file (``server.key``; the client's ``.key_secret``); bytes are
    the Z85 key itself (the server's public key; the client's secret key). None reads
    $SGSERVE_CURVE_SERVER_KEY and $SGSERVE_CURVE_CLIENT_KEY (paths)."""
    server_key, client_key = _key_material(server_key, ENV_SERVER_KEY), _key_material(client_key, ENV_CLIENT_KEY)
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise ValueError("CURVE needs both the server's public key and the client's secret key "
                         "(curve_server_key and curve_client_key)")
    if isinstance(server_key, bytes):
        server_public = server_key
    else:
        server_public, _ = zmq.auth.load_certificate(server_key)
    if isinstance(client_key, bytes):
        client_secret = client_key
        client_public = zmq.curve_public(client_secret)
    else:
        client_public, client_secret = zmq.auth.load_certificate(client_key)
        if not client_secret:
            raise ValueError(f"{client_key} holds no secret key (give the client's .key_secret file)")
    for what, key in (("server public", server_public), ("client secret", client_secret)):
        if len(key) != KEY_LEN:
            raise ValueError(f"the {what} key is not a {KEY_LEN}-character Z85 CURVE key")
    return server_public, client_public, client_secret


def apply_client_curve(sock: zmq.Socket, curve: tuple[bytes, bytes, bytes] | None) -> None:
    """Makes ``sock`` a CURVE client (before it connects); nothing for None."""
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve


# -- the server side -----------------------------------------------------------------------------
def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp ones bound to a loopback address only."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from elsewhere


def is_local_peer(address: str) -> bool:
    """True for a loopback ``Peer-Address`` (IPv4, IPv6 or IPv4-mapped IPv6)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class AdminRule:
    """Decides whether the sender of a message may run ADMIN_TYPES; see the module docstring.

    A key in ``keys`` (the admin list, and the gateways' key) may; with an admin list given, no one
    else may; without one, loopback and ipc peers may."""

    def __init__(self, endpoint: str, admin_keys: set[bytes] | None) -> None:
        self.local_endpoint = not endpoint.startswith("tcp://")  # ipc, inproc: file-system or in-process
        self.listed = admin_keys is not None
        self.keys = {k.decode() for k in admin_keys or ()}

    def add_key(self, public: bytes) -> None:
        self.keys.add(public.decode())

    def allows(self, frame: zmq.Frame) -> bool:
        """``frame``: a frame received from the frontend (it carries the connection's properties)."""
        try:
            if self.keys and frame.get("User-Id") in self.keys:
                return True
            if self.listed:
                return False
            return self.local_endpoint or is_local_peer(frame.get("Peer-Address"))
        except (zmq.ZMQError, AttributeError, TypeError):  # a frame without properties: not trusted
            return False

    def refusal(self, rtype: str) -> str:
        if self.listed:
            return f"'{rtype}' is an admin command: your CURVE key is not in the server's --curve-admin-clients"
        return (f"'{rtype}' is an admin command: accepted only from loopback or ipc clients "
                f"(or from --curve-admin-clients keys with CURVE on)")


class _KeySet:
    """The ZAP credentials provider: is this public key one the server knows."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, _domain: str, key: bytes) -> bool:
        return key in self.keys


class FrontendSecurity:
    """CURVE on the frontend socket and the admin rule; built by the broker from its config.

    Without ``--curve-secret-key`` it only warns about a non-loopback endpoint and keeps the
    loopback admin rule. ``close()`` stops the ZAP thread (before the context terminates)."""

    def __init__(self, config: Any, ctx: zmq.Context) -> None:
        self.curve = bool(getattr(config, "curve_secret_key", None))
        self.authenticator: ThreadAuthenticator | None = None
        self.public = self.secret = b""
        admins = None
        if not self.curve:
            if not is_loopback_endpoint(config.endpoint):
                log.warning("%s is reachable from other hosts and CURVE is off: anyone who can reach it may "
                            "send predicts (admin commands are refused unless they come over loopback). "
                            "See `sgserve keygen` and --curve-secret-key", config.endpoint)
        else:
            check_settings(config)
            self.public, self.secret = load_secret_cert(config.curve_secret_key, "--curve-secret-key")
            keys = load_public_keys(config.curve_authorized_clients, "--curve-authorized-clients")
            if getattr(config, "curve_admin_clients", None):
                admins = load_public_keys(config.curve_admin_clients, "--curve-admin-clients")
                keys |= admins
            self._keys = _KeySet(keys)
            self.authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("sgserve.auth.zap"))
            self.authenticator.start()
            self.authenticator.configure_curve_callback(domain="*", credentials_provider=self._keys)
        self.rule = AdminRule(config.endpoint, admins)

    def apply(self, sock: zmq.Socket) -> None:
        """Makes ``sock`` a CURVE server (before it binds)."""
        if self.curve:
            sock.curve_secretkey, sock.curve_publickey = self.secret, self.public
            sock.curve_server = True

    def trust_admin(self, public: bytes) -> None:
        """Authorizes a key, as an admin (the gateways' key: they serve HandleReloadConfigRequest)."""
        if self.curve:
            self._keys.keys.add(public)
            self.rule.add_key(public)

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def gateway_cert(runtime_dir: str) -> tuple[str, bytes]:
    """A key pair for the gateways, kept in the server's 0700 runtime directory:
    (its secret certificate's path, its public key)."""
    public_path, secret_path = zmq.auth.create_certificates(runtime_dir, GATEWAY_CERT)
    os.chmod(secret_path, 0o600)
    os.unlink(public_path)
    public, _ = zmq.auth.load_certificate(secret_path)
    return secret_path, public


__all__ = ["ADMIN_TYPES", "AdminRule", "FrontendSecurity", "keygen", "client_curve", "apply_client_curve",
           "check_settings", "gateway_cert", "is_loopback_endpoint", "is_local_peer"]
