"""One log format for every sgserve process (broker, worker i, zygote, loader): time, level, role, pid,
message; ``--log-format json`` writes one JSON object per line for log shippers. Children inherit the
server's choice through SGSERVE_LOG_LEVEL and SGSERVE_LOG_FORMAT (``setup_logging`` exports them).

TensorFlow's own chatter is hidden below ``debug``: its Python logger and warnings here, its C++
start-up lines through the environment children get (sgserve/process.py ``child_env``).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import warnings

LEVEL_ENV = "SGSERVE_LOG_LEVEL"
FORMAT_ENV = "SGSERVE_LOG_FORMAT"
DEFAULT_LEVEL = "warning"
DEFAULT_FORMAT = "text"
ANNOUNCE_LOGGER = "sgserve.announce"
# Modules whose Python warnings (deprecations mostly) are TensorFlow's chatter, not ours.
CHATTY_MODULES = r"(tensorflow|keras|tf_keras|absl|google\.protobuf|h5py)(\.|$)"


def _time(record: logging.LogRecord) -> str:
    """ISO 8601 local time with milliseconds and offset: sortable, and unambiguous for shippers."""
    return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``2025-06-01T12:00:00.123+00:00 WARNING worker 1 [4242] message``."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record)} {record.levelname} {self.role} [{record.process}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exc``)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": _time(record), "level": record.levelname, "role": self.role, "pid": record.process,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def resolved(level: str | None = None, fmt: str | None = None) -> tuple[str, str]:
    """(level, format): the arguments, else what the parent exported, else warning and text."""
    level = (level or os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL).lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or DEFAULT_FORMAT).lower()
    return level, fmt


def setup_logging(role: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger of this process for ``role`` ("broker", "worker 0", "zygote",
    "loader"), and export the level and format for the children it starts.

    ``level`` and ``fmt`` default to the environment the parent set (warning, text)."""
    level, fmt = resolved(level, fmt)
    os.environ[LEVEL_ENV] = level
    os.environ[FORMAT_ENV] = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper(), logging.WARNING)
    root.setLevel(numeric)
    debug = numeric <= logging.DEBUG
    # The line a person starting the server waits for shows at the default level too.
    logging.getLogger(ANNOUNCE_LOGGER).setLevel(min(numeric, logging.INFO) if numeric <= logging.WARNING
                                                else numeric)
    # TensorFlow's Python logger (deprecation notices, retracing hints): ours to show at debug only.
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if debug else logging.ERROR)
    logging.captureWarnings(True)  # warnings are records too, in the same format
    if not debug:
        warnings.filterwarnings("ignore", module=CHATTY_MODULES)


def announce(message: str, *args: object) -> None:
    """Log a line a person starting the server waits for ("serving ..."): INFO, shown unless the
    level is error."""
    logging.getLogger(ANNOUNCE_LOGGER).info(message, *args)


def is_debug() -> bool:
    """Whether this process (and so its children) run at --log-level debug."""
    return resolved()[0] == "debug"
