"""The POC's memory figure (the demo's peak-memory goal) counts a page shared by processes once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fedbrain.poc.consortium import PocConsortium

# A process that touches 64 MB, then forks a child that shares those pages (as POC job processes forked
# from fedbrain.poc.warm share torch, MONAI and FLARE with it).
FORKED = """
import os, sys, time
block = bytearray(64 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def test_shared_pages_count_once_in_the_peak_memory_figure(tmp_path, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", FORKED], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        monkeypatch.setattr(PocConsortium, "pids", lambda self: [proc.pid, child])
        memory = PocConsortium(tmp_path).memory_bytes()
        # the block is resident in both processes: counted twice in the sum of resident sizes, once in the shares
        assert memory["rss"] - memory["pss"] >= 50 << 20, memory
        assert memory["pss"] >= 64 << 20, memory
    finally:
        for pid in (child, proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
