"""The broker's handle on a long-lived loader process (``python -m sgserve.models.loader --serve``).

TensorFlow takes seconds to import; a loader started per version would pay that on every update,
however little changed. One loader process stays up instead, at SCHED_IDLE priority (it only gets
CPU time the workers leave idle), pinned to cores no worker uses when there are any, and takes one
load job at a time as a JSON line. The broker never blocks on it: ``poll`` reads what has arrived.
If it dies (killed to cancel a load, or crashed on a bad model) the next job starts a new one.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from sgserve.process import child_env, describe_exit

log = logging.getLogger(__name__)


class LoaderDied(Exception):
    """The loader process exited while it held a job; the message says how, with its last words."""


class LoaderService:
    def __init__(self, server_id: str, log_path: str, cores: list[int] | None = None) -> None:
        self.server_id = server_id
        self.log_path = log_path
        self.cores = cores or []
        self.proc: subprocess.Popen | None = None
        self.busy = False
        self.ready = False  # TensorFlow imported: a job starts at once
        self._buf = b""

    def start(self) -> None:
        """Starts the process if it is not running (TensorFlow then imports in the background)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [sys.executable, "-m", "sgserve.models.loader", "--serve", "--background", "--server-id", self.server_id]
        if self.cores:
            cmd += ["--cores", ",".join(map(str, self.cores))]
        env = dict(child_env(), TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        self.busy = False
        self.ready = False
        log.info("loader service started (pid %d)%s", self.proc.pid,
                 f" on spare cores {self.cores}" if self.cores else " at idle priority")

    def submit(self, job: dict[str, Any]) -> None:
        self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: poll() reports it
        self.busy = True

    def state(self) -> str:
        """"stopped", "starting" (importing TensorFlow), "ready" or "loading"; reads what arrived."""
        if self.proc is None:
            return "stopped"
        if not self.ready and not self.busy:
            try:
                self.poll()
            except (LoaderDied, ValueError):
                return "stopped"
        if self.busy:
            return "loading"
        return "ready" if self.ready else "starting"

    def poll(self) -> dict[str, Any] | None:
        """The answer to the current job once it has arrived; raises LoaderDied if the process died."""
        if self.proc is None:
            return None
        while True:
            line = self._line()
            if line is None:
                break
            msg = json.loads(line)
            if "ready" in msg:
                self.ready = True
                continue
            self.busy = False
            return msg
        if not self.busy:
            return None
        rc = self.proc.poll()
        if rc is not None:
            self.busy = False
            self.proc = None
            raise LoaderDied(f"the loader process {describe_exit(rc)}: {self._last_words()}")
        return None

    def _line(self) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            try:
                chunk = self.proc.stdout.read(65536)
            except (BlockingIOError, ValueError):
                chunk = None
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _last_words(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 4000))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return lines[-1].strip() if lines else "(nothing on stderr)"

    def kill(self) -> None:
        """Cancels whatever it is doing; the next job starts a fresh process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.busy = False
        self.ready = False

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # end of input: it exits on its own
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()
