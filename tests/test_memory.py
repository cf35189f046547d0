"""The model's variables sit in memory once, however many workers serve it (psutil USS/PSS, smaps)."""
from __future__ import annotations

import os

import numpy as np
import psutil

from tests import model_builders

MIB = 1024 * 1024
MODEL_MIB = 384


def segment_mapping(pid: int, segment: str) -> dict[str, int]:
    """kB figures of the worker's mapping of the segment, from /proc/PID/smaps."""
    out: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ")[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(segment.lstrip("/"))
                continue
            if inside and ":" in line:
                k, v = line.split(":", 1)
                parts = v.split()
                if parts and parts[0].isdigit():
                    out[k] = out.get(k, 0) + int(parts[0])
    return out


def test_two_workers_share_one_copy(start_server, tmp_path):
    base = model_builders.build_big(str(tmp_path / "big"), mib=MODEL_MIB)
    # Unsplit: each request goes whole to one worker, so that both workers touch every row.
    srv = start_server(["--model-base-path", base, "--workers", "2", "--cpus-per-worker", "1", "--split-min-rows", "0"])
    rows = MODEL_MIB * MIB // 256
    with srv.client(timeout=60) as c:
        st = c.status()
        segment = st["models"][0]["segment"]
        model_bytes = st["models"][0]["bytes"]
        # Gather every row of the table in both workers: a private copy, if any, would now exist.
        for start in range(0, rows, 131072):
            ids = np.arange(start, min(rows, start + 131072), dtype=np.int64)
            for _ in range(2):
                assert c.predict("big", {"ids": ids})["y"].shape == (len(ids), 1)
        served = {w["index"]: w["served"] for w in c.status()["workers"]}
    assert model_bytes >= MODEL_MIB * MIB
    assert min(served.values()) > 0, served
    pids = [w["pid"] for w in st["workers"]]
    for pid in pids:
        m = segment_mapping(pid, segment)
        # The whole table is resident through the mapping, all of it shared, none of it private.
        assert m["Rss"] * 1024 >= 0.95 * model_bytes, m
        assert m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) < 1024, m
        assert m["Pss"] * 1024 <= 0.55 * model_bytes, m  # split between the two workers
        info = psutil.Process(pid).memory_full_info()
        # USS is the worker's own memory (TF runtime etc.): a private copy would put it above the model.
        assert info.uss < 0.75 * model_bytes, f"worker {pid} USS {info.uss / MIB:.0f} MiB"
    # Summed over the workers, the segment's proportional share is one copy of the model, not two.
    total_pss = sum(segment_mapping(p, segment)["Pss"] * 1024 for p in pids)
    assert 0.95 * model_bytes <= total_pss <= 1.05 * model_bytes
    assert os.path.exists("/dev/shm" + segment)
