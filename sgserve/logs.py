"""One log format for every sgserve process (broker, worker i, loader): time, level, role, pid,
message; ``--log-format json`` for log shippers. Children inherit the server's choice through
SGSERVE_LOG_LEVEL and SGSERVE_LOG_FORMAT."""
from __future__ import annotations

import logging
import os

LEVEL_ENV = "SGSERVE_LOG_LEVEL"
FORMAT_ENV = "SGSERVE_LOG_FORMAT"


def setup_logging(role: str, level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger of this process for ``role`` ("broker", "worker 0", "loader").

    ``level`` and ``fmt`` default to the environment the parent set (warning, text)."""
    level = (level or os.environ.get(LEVEL_ENV) or "warning").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING),
                        format=f"%(asctime)s %(levelname)s {role} [%(process)d] %(message)s", force=True)
