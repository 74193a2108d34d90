"""Round-end housekeeping shared by the site loop and the server's round controllers.

A long job's processes climbed by 100+ MB over a few hundred rounds and fell back, in steps, at moments
unrelated to the job (bench/soak.py's plot): the signature of garbage in reference cycles, which Python
frees only at a full (generation 2) collection. Such a collection comes rarely in a process whose heap
holds a network, its optimizer and FLARE's messaging, and until then every cycle keeps what it points
at: FLARE's stream tasks (``TxTask``, ``BlobStream``, ``StreamFuture``, ``BufferList``) end in cycles, with
their 512 KB-1 MB chunk buffers (docs/maintainers.md). One full collection at the end of each
round frees them while they are few.

A full collection walks every object the collector tracks: hundreds of thousands once PyTorch, MONAI and
FLARE are loaded (about 0.25 s a process here). What survives the first round is long-lived (modules, the
network, its optimizer, the data cache, FLARE's machinery), so it is frozen then (``gc.freeze``): later
collections skip it. Frozen objects are still freed when their last reference goes; only a cycle among
them would stay.
"""

from __future__ import annotations

import gc

_frozen = False


def collect_round_garbage() -> None:
    """A full collection now (the first call also freezes what survived it)."""
    global _frozen
    gc.collect()
    if not _frozen:
        gc.freeze()
        _frozen = True
