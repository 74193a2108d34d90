"""Round-end housekeeping (fedbrain.fl.housekeeping): what a round leaves in reference cycles is freed at
its end, and the first round's survivors are frozen so later collections stay cheap."""

import gc
import weakref

from fedbrain.fl import housekeeping


class _Node:
    pass


def test_a_rounds_cycles_are_freed_and_the_first_rounds_survivors_frozen():
    gc.disable()  # no automatic collection may do the work in between
    frozen_before, was_frozen = gc.get_freeze_count(), housekeeping._frozen
    housekeeping._frozen = False
    try:
        long_lived = _Node()
        long_lived.me = long_lived  # a cycle still referenced: survives, then frozen
        garbage = _Node()
        garbage.me, garbage.buffer = garbage, bytearray(1 << 20)  # a stream buffer held only by a cycle
        gone = weakref.ref(garbage)
        del garbage
        assert gone() is not None  # reference counting alone does not free a cycle
        housekeeping.collect_round_garbage()
        assert gone() is None
        assert gc.get_freeze_count() > frozen_before and housekeeping._frozen
        frozen = gc.get_freeze_count()
        again = _Node()
        again.me = again
        again_ref = weakref.ref(again)
        del again
        housekeeping.collect_round_garbage()  # later rounds: collect, freeze nothing more
        assert again_ref() is None and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        housekeeping._frozen = was_frozen
        gc.enable()
