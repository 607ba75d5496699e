"""The one place that reaches into Orbax's internals rather than its public API: writing a
parameter tree whose leaves are produced block by block, and opening stored arrays for slice
reads. `modeldir` uses it; nothing else should.

Tested with orbax-checkpoint 0.12 (0.12.8); setup.py pins `orbax-checkpoint>=0.12,<0.13` for
this module. What it relies on, to re-check when raising that bound:
- `type_handlers.NumpyHandler._background_serialize(values, infos, args)` (private), which
  `PyTreeCheckpointHandler` calls with the `ParamInfo`s of one leaf type
  (`await_path_creation()`, `is_ocdbt_checkpoint`, `ts_context`);
- `type_handlers.get_json_tspec_write` / `get_json_tspec_read`, `is_ocdbt_checkpoint`,
  `get_ts_context`, `ParamInfo`: the TensorStore spec of one stored array;
- `type_handlers.create_type_handler_registry` and `get_type_handler`;
- the checkpoint's `_METADATA` file (its `use_zarr3` flag).

A streamed leaf has `shape`, `dtype`, `size` (read by Orbax: memory estimate, zero-size check)
and `blocks()`: (index, block) pairs that together cover `shape`, all blocks but the last along
an axis of the first block's shape (the storage chunk). It is stored in the format (type
string, zarr array) of Orbax's own NumpyHandler, so a restore sees an ordinary array.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath


class StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Writes streamed leaves block by block, in the format of NumpyHandler. One parameter at a
    time, one block at a time."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            blocks = iter(value.blocks())
            index, block = next(blocks)
            spec = ocp.type_handlers.get_json_tspec_write(
                info,
                use_ocdbt=info.is_ocdbt_checkpoint,
                global_shape=value.shape,
                local_shape=np.shape(block),  # the chunk shape
                dtype=value.dtype,
                process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
                arg=arg,
            )
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            while block is not None:
                await store[index].write(np.asarray(block, value.dtype))
                index, block = next(blocks, (None, None))


def _registry(streamed_type: type):
    # A private registry: the streamed type shares NumpyHandler's type string, which must not
    # replace the global handler that restores plain numpy leaves.
    get = ocp.type_handlers.get_type_handler
    return ocp.type_handlers.create_type_handler_registry(
        (streamed_type, StreamingHandler()), (np.ndarray, get(np.ndarray)),
        (jax.Array, get(jax.Array)),
    )


def save_tree(directory: str | os.PathLike, tree: Mapping, streamed_type: type) -> None:
    """Writes `tree` as an Orbax PyTree checkpoint at `directory`; leaves of `streamed_type`
    are written block by block, numpy and jax arrays as Orbax writes them."""
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(streamed_type))
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(tree))


def open_arrays(directory: str | os.PathLike, names: Mapping) -> dict:
    """{key: TensorStore} for `names` ({key: the stored name of an array, as the checkpoint's
    metadata gives it}) of the PyTree checkpoint at `directory`, opened for slice reads."""
    params = epath.Path(directory)
    meta = json.loads((params / "_METADATA").read_text()) if (params / "_METADATA").exists() else {}
    ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)
    out = {}
    for key, name in names.items():
        info = ocp.type_handlers.ParamInfo(
            name=name, parent_dir=params, is_ocdbt_checkpoint=ocdbt,
            use_zarr3=bool(meta.get("use_zarr3", False)), ts_context=context,
        )
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
        out[key] = ts.open(ts.Spec(spec), open=True, context=context).result()
    return out
