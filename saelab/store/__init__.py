"""Activation stores: HDF5 shards + ``manifest.json``, written atomically, read as a stream.

Layout of one store (one hook), e.g. ``activations/demo/blocks.1.hook_resid_post/``::

    manifest.json        the schema in ``manifest``; lists only complete shards
    shard_00000.h5       activations [rows, d_in], tokens [rows/ctx, ctx] int32, grads [rows, d_in]?
    shard_00001.h5 ...

- ``manifest``: the schema, ``new_manifest``, ``read_manifest``, finding stores in a RUN folder;
- ``writer``: ``ShardWriter`` (a shard enters the manifest only complete);
- ``reader``: ``ActivationStore`` (shards checksummed on first open, random access);
- ``stream``: ``BatchIterator`` (shuffled rows in bounded memory, resumable exactly);
- ``pairs``: ``paired_stores`` (a transcoder's input and target stores), ``check_aligned`` (row for row).

A store knows neither models nor SAEs: which store an SAE reads is resolved in ``saelab.targets``.
"""

from saelab.layout import MANIFEST, shard_name
from saelab.store.manifest import (
                                   DTYPES,
                                   FORMAT_VERSION,
                                   MANIFEST_KEYS,
                                   check_complete,
                                   new_manifest,
                                   read_manifest,
                                   resolve_stores,
)
from saelab.store.pairs import check_aligned, paired_stores
from saelab.store.reader import ActivationStore
from saelab.store.stream import BatchIterator, release_free_memory
from saelab.store.writer import ShardWriter, plan_shards

__all__ = ["ActivationStore", "BatchIterator", "DTYPES", "FORMAT_VERSION", "MANIFEST", "MANIFEST_KEYS", "ShardWriter",
           "check_aligned", "check_complete", "new_manifest", "paired_stores", "plan_shards", "read_manifest",
           "release_free_memory", "resolve_stores", "shard_name"]
