"""Releasing the shared memory that Grain's worker processes send batches in, before exit.

A worker process writes each array of an element into a POSIX shared-memory block and sends
its name; the main process maps it (a `grain.multiprocessing.SharedMemoryArray`), and Grain
unlinks the name when that array is deleted, through a background thread (at most 50
pending). Python's multiprocessing terminates that thread's pool at exit, before the
interpreter frees what is left: arrays freed just before or after that point (the batch a
program still holds, the windows read ahead that closing the iterator drops) are never
unlinked, and the resource tracker reports them at shutdown: "There appear to be N leaked
shared_memory objects to clean up at shutdown". So the pipeline
- unlinks the names of a window's arrays as soon as the window arrives (`unlink_on_arrival`):
  no other process opens them again, and the memory stays mapped until the last array using
  it is gone;
- after closing Grain's iterators, waits for Grain's deletions to be done (`flush_deletions`);
- closes an iterator nobody closed before multiprocessing's exit handler runs
  (`close_before_exit`).

Relies on Grain internals (`SharedMemoryArray._unlink_on_del`, `SharedMemoryArray.
_del_thread_pool`: one thread, tasks in order), as in grain 0.2.12 to 0.2.18; where they are
missing, Grain's own behaviour remains.

A run stopped mid-stream (SIGTERM, Ctrl-C) closes the pipeline while Grain holds windows read
ahead in reference cycles; the pipeline's `close` collects them before flushing (it left one
window, 32 blocks, behind before it did).
"""

from __future__ import annotations

import atexit
import contextlib
import weakref

import grain.multiprocessing

_Array = grain.multiprocessing.SharedMemoryArray


def unlink_on_arrival(window: dict) -> dict:
    """Unlinks the shared-memory names behind the arrays of `window["batches"]` now; each
    array's deletion then only unmaps it."""
    for batch in window["batches"]:
        for array in batch.values():
            if isinstance(array, _Array) and getattr(array, "_unlink_on_del", False):
                array.shm.unlink()
                array._unlink_on_del = False
    return window


def flush_deletions() -> None:
    """Waits until Grain's background thread has unlinked the blocks of every array freed so
    far (it runs its tasks in order, in one thread)."""
    pool = getattr(_Array, "_del_thread_pool", None)
    if pool is not None:
        with contextlib.suppress(ValueError):  # terminated already: nothing more will run
            pool.apply(lambda: None)


def close_before_exit(iterator) -> None:
    """Closes `iterator` at exit, if it is still alive then, before multiprocessing's own exit
    handler (registered earlier, so run later) stops Grain's deletion thread."""
    import multiprocessing.util  # noqa: F401  (its exit handler registered first)

    ref = weakref.ref(iterator)

    def close() -> None:
        if (it := ref()) is not None:
            it.close()

    atexit.register(close)
