"""The server's handle on the one long-lived loader process (``python -m sgserve.models.loader``).

TensorFlow takes seconds to import; a loader started per version would pay that on every load,
however little changed. One loader process loads the versions served from the start (``load``
waits for each) and stays up for every later update, so TensorFlow is imported once. It takes one
load job at a time as a JSON line. Update jobs are marked ``background``: from the first one on,
the loader runs at SCHED_IDLE priority (it only gets CPU time the workers leave idle), pinned to
cores no worker uses when there are any, and the broker never blocks on it: ``poll`` reads what has
arrived. If it dies (killed to cancel a load, or crashed on a bad model) the next job starts a new
one. Its stderr is the server's: a long load's progress shows there.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from typing import Any

from sgserve.process import child_env, describe_exit

log = logging.getLogger(__name__)


class LoaderDied(Exception):
    """The loader process exited while it held a job; the message says how."""


class LoaderService:
    def __init__(self, server_id: str, segment_dir: str | None = None) -> None:
        self.server_id = server_id
        self.segment_dir = segment_dir  # every job's segment goes there (None: /dev/shm)
        self.background = False  # set by the first background job: a restarted process starts idle
        self.cores: list[int] = []  # where background jobs run (empty: anywhere)
        self.proc: subprocess.Popen | None = None
        self.busy = False
        self.ready = False  # TensorFlow imported: a job starts at once
        self._buf = b""
        self._eof = False  # its stdout reached end of file

    def start(self) -> None:
        """Starts the process if it is not running (TensorFlow then imports in the background)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [sys.executable, "-m", "sgserve.models.loader", "--server-id", self.server_id]
        if self.background:
            cmd += ["--background"] + (["--cores", ",".join(map(str, self.cores))] if self.cores else [])
        env = child_env()  # TensorFlow's log level follows --log-level (process.child_env)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""
        self._eof = False
        self.busy = False
        self.ready = False
        log.info("loader service started (pid %d)%s", self.proc.pid,
                 "" if not self.background else f" on spare cores {self.cores}" if self.cores else " at idle priority")

    def load(self, job: dict[str, Any]) -> dict[str, Any]:
        """Runs one job and waits for its answer (the loads before serving starts)."""
        self.submit(job)
        while True:
            answer = self.poll()
            if answer is not None:
                return answer
            assert self.proc is not None and self.proc.stdout is not None
            if self._eof:  # it closed its stdout: it is exiting, and poll() reports how
                self.proc.wait()
            else:
                select.select([self.proc.stdout], [], [], 1.0)

    def submit(self, job: dict[str, Any]) -> None:
        """Hands the loader one job; ``background`` jobs also move it to idle priority and ``cores``."""
        if job.get("background"):
            self.background = True
            self.cores = list(job.get("cores") or [])
        if self.segment_dir is not None:
            job = dict(job, segment_dir=self.segment_dir)
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
            raise LoaderDied(f"the loader process {describe_exit(rc)}")
        return None

    def _line(self) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            try:
                chunk = self.proc.stdout.read(65536)
            except (BlockingIOError, ValueError):
                chunk = None
            if not chunk:
                self._eof = self._eof or chunk == b""
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

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
