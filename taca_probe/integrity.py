"""Chunk integrity: a CRC32C on every chunk, named when it fails, and per-sample chunk manifests.

:class:`ChecksumStore` verifies each chunk's CRC32C as it is read. A completed sample's manifest
records, for every chunk file it owns, the file's digest and size, or that it has none (a chunk
equal to the fill value is not stored), so that a deleted, moved or swapped chunk is found too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import StoreError

COMPLETE = "complete"
#: Per sample: JSON {chunk key: [blake2b-64 digest, size] or None}, written just before ``complete``.
MANIFEST = "chunk_manifest"
#: Per-sample arrays that hold bookkeeping rather than the sample's data.
BOOKKEEPING = (COMPLETE, MANIFEST)
#: :func:`store_info` compares the digests of files up to this size (cheap), sizes of larger ones.
INFO_READ_LIMIT = 64 * 1024
#: What :func:`read_each` gives for a value whose chunk is damaged.
DAMAGED = object()
#: Every array's codecs: zstd, then a CRC32C checksum so that a corrupted chunk is detected on read.
COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


class ChunkChecksumError(StoreError):
    """A chunk whose CRC32C does not match its data, or that is missing, moved or swapped."""


def is_sample_array(arr: Any) -> bool:
    names = arr.metadata.dimension_names
    return bool(names) and names[0] == "sample"


def slot_keys(arrays: Mapping[str, Any], slot: int) -> list[str]:
    """The storage keys (chunk or shard files) that hold ``slot`` of the per-sample data arrays."""
    keys = []
    for name, arr in arrays.items():
        if is_sample_array(arr) and name not in BOOKKEEPING:
            per_file = arr.shards or arr.chunks
            grid = [-(-n // c) for n, c in zip(arr.shape[1:], per_file[1:])]
            keys += [f"{name}/{arr.metadata.encode_chunk_key((slot, *idx))}" for idx in np.ndindex(*grid)]
    return keys


def digest(data: bytes) -> str:
    """A file's fingerprint for the manifest. Not CRC32C: over a chunk that ends in its own CRC32C
    (the codec's), CRC32C gives the same constant for every chunk."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def slot_of(key: str) -> int | None:
    """``image/c/3/0/0/0`` -> 3 (the sample slot a per-sample chunk key belongs to)."""
    parts = key.split("/")
    try:
        return int(parts[parts.index("c") + 1])
    except (ValueError, IndexError):
        return None


def _slot_problems(path: Path, arrays: Mapping[str, Any], slot: int, text: Any, read: bool | int) -> list[str]:
    """Problems of one complete sample against its manifest (a text, or ``DAMAGED``), ``"KEY: what"`` each."""
    if not text:
        return [f"{MANIFEST}/c/{slot}: the sample's chunk manifest is missing"]
    try:
        manifest = None if text is DAMAGED else json.loads(str(text))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):  # not an assert: python -O would skip the check
        return [f"{MANIFEST}/c/{slot}: the sample's chunk manifest is damaged"]
    expected = slot_keys(arrays, slot)
    problems = [f"{key}: not in the sample's manifest (another sample's manifest?)" for key in expected
                if key not in manifest]
    expected_set = set(expected)
    problems += [f"{key}: the manifest of sample {slot} names it" for key in manifest if key not in expected_set]
    for key in (key for key in expected if key in manifest):
        entry, f = manifest[key], path / key
        if entry is None:
            if f.is_file():
                problems.append(f"{key}: a chunk where the sample had none (moved here?)")
        elif not f.is_file():
            problems.append(f"{key}: missing")
        elif (size := f.stat().st_size) != entry[1] or (
                (read is True or (read is not False and size <= read)) and digest(f.read_bytes()) != entry[0]):
            problems.append(f"{key}: does not match the checksum recorded when the sample completed "
                            "(damaged, swapped or moved)")
    return problems


def sample_problems(path: Path, arrays: Mapping[str, Any], *, read: bool | int,
                    complete: np.ndarray | None = None, texts: Mapping[int, Any] | None = None,
                    ) -> dict[int, list[str]]:
    """slot -> problems, for every complete sample (empty for stores without manifests). ``read``: compare
    the digest of every file (True), of files up to that many bytes, or of none (False). ``texts``: the
    :func:`manifest_texts` if already read."""
    if complete is None:
        complete = complete_flags(arrays)
    if texts is None:
        texts = manifest_texts(arrays, complete)
    problems = {slot: _slot_problems(path, arrays, slot, text, read) for slot, text in texts.items()}
    return {slot: found for slot, found in problems.items() if found}


def manifest_texts(arrays: Mapping[str, Any], complete: np.ndarray) -> dict[int, Any]:
    """slot -> the chunk-manifest text (or ``DAMAGED``) of every complete sample; empty without manifests."""
    slots = np.flatnonzero(complete)
    if MANIFEST not in arrays or not len(slots):
        return {}
    texts = read_each(arrays[MANIFEST], int(slots[-1]) + 1)
    return {slot: texts[slot] for slot in slots.tolist()}


def read_each(arr: Any, n: int | None = None) -> list[Any]:
    """The first ``n`` values of a 1-D per-sample array; a damaged chunk gives ``DAMAGED`` (complete: False)."""
    n = arr.shape[0] if n is None else n
    try:
        return list(arr[:n])
    except ChunkChecksumError:  # find which: one read per slot, only when something is wrong
        out = []
        for i in range(n):
            try:
                out.append(arr[i])
            except ChunkChecksumError:
                out.append(DAMAGED)
        return out


def complete_flags(arrays: Mapping[str, Any]) -> np.ndarray:
    """The ``complete`` flag of every slot; a corrupt flag chunk reads as not complete (its sample is re-recorded)."""
    return np.array([v is not DAMAGED and bool(v) for v in read_each(arrays[COMPLETE])], dtype=bool)


_UNLISTED = object()


class ChecksumStore(LocalStore):
    """A zarr ``LocalStore`` that verifies each chunk's CRC32C as it is read and names the damaged
    chunk in the error (zarr's own codec check cannot say which chunk failed).

    Given ``manifest`` (key -> [digest, size] or None, from the complete samples' manifests), a
    read also checks that the file is the one recorded under that key: a missing, moved or swapped
    chunk fails instead of reading back as the fill value or as another sample's data.
    Module-level (not a closure) so that dask workers can unpickle it.
    """

    def __init__(self, root: str | os.PathLike, *, read_only: bool = True,
                 manifest: Mapping[str, Any] | None = None) -> None:
        super().__init__(str(root), read_only=read_only)
        self._kinds: dict[str, tuple[bool, int] | None] = {}
        self._manifest = dict(manifest or {})
        self._verified: set[str] = set()

    def __getstate__(self) -> dict:
        return {**dict(super().__getstate__()), "_kinds": {}, "_verified": set()}

    def _kind(self, name: str) -> tuple[bool, int] | None:
        """None: no checksum; (False, 0): plain chunks; (True, n): shards of n inner chunks."""
        if name not in self._kinds:
            try:
                meta = json.loads((Path(str(self.root)) / name / "zarr.json").read_text())
                codecs = meta.get("codecs", [])
                if codecs and codecs[0].get("name") == "sharding_indexed":
                    conf = codecs[0]["configuration"]
                    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
                    kind = (True, int(np.prod([o // i for o, i in zip(outer, conf["chunk_shape"])])))
                    lists = [conf.get("codecs", []), conf.get("index_codecs", [])]  # both need their CRC32C
                else:
                    kind, lists = (False, 0), [codecs]
                self._kinds[name] = kind if all(any(c.get("name") == "crc32c" for c in cs) for cs in lists) else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._kinds[name] = None
        return self._kinds[name]

    def _check(self, key: str, data: bytes) -> None:
        if len(data) < 4 or google_crc32c.value(data[:-4]).to_bytes(4, "little") != data[-4:]:
            raise ChunkChecksumError(
                f"corrupted chunk {key!r} in {str(self.root)!r}: its CRC32C checksum does not match")

    async def _check_listed(self, key: str, buf: Any, prototype: Any, byte_range: Any) -> None:
        entry = self._manifest.get(key, _UNLISTED)
        if entry is _UNLISTED or key in self._verified:
            return
        hint = "; `taca-probe record --resume` records the sample again"
        if buf is None and entry is not None:
            raise ChunkChecksumError(f"missing chunk {key!r} in {str(self.root)!r}: its sample's manifest lists it{hint}")
        if buf is not None and entry is None:
            raise ChunkChecksumError(f"unexpected chunk {key!r} in {str(self.root)!r}: its sample had none there "
                                     f"(moved?){hint}")
        if buf is not None:
            whole = buf if byte_range is None else await super().get(key, prototype)
            if digest(whole.to_bytes()) != entry[0]:
                raise ChunkChecksumError(f"damaged chunk {key!r} in {str(self.root)!r}: it is not the file recorded "
                                         f"when its sample completed (changed, swapped or moved){hint}")
        self._verified.add(key)

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if "/c/" not in key:
            return buf
        kind = None if buf is None else self._kind(key.split("/c/", 1)[0])
        if kind is not None:
            data = buf.to_bytes()
            sharded, n_inner = kind
            if not sharded or byte_range is not None:
                self._check(key, data)  # a whole chunk, or one inner chunk / the index of a shard
            else:
                index_size = 16 * n_inner + 4  # a whole shard: verify its index, then each inner chunk
                index = data[-index_size:]
                self._check(key, index)
                pairs = np.frombuffer(index[:-4], dtype="<u8").reshape(-1, 2)
                for i, (offset, nbytes) in enumerate(pairs):
                    if offset != np.iinfo(np.uint64).max:
                        self._check(f"{key} (inner chunk {i})", data[int(offset) : int(offset + nbytes)])
        await self._check_listed(key, buf, prototype, byte_range)
        return buf


def settle_pending_reads(timeout: float = 5.0) -> None:
    """Wait for zarr's chunk reads still running after one of them failed, and collect their errors
    (left alone, they print asyncio noise when the process exits)."""
    async def settle() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: no "Task exception was never retrieved"

    try:
        sync(settle())
    except Exception:  # best effort: never mask the error being reported
        pass


def chunk_read_problems(path: Path, names: Sequence[str]) -> list[str]:
    """Keys of the chunks of ``names`` whose CRC32C codec check fails (reads every chunk)."""
    bad: list[str] = []
    group = zarr.open_group(store=ChecksumStore(path), mode="r", zarr_format=3)
    for name in sorted(names):
        arr = group[name]
        for idx in np.ndindex(*arr.cdata_shape):
            try:
                arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks))]
            except ChunkChecksumError as e:
                bad.append(str(e).split("'")[1])
            except ValueError as e:  # zarr's own codec check, should ours not have run
                bad.append(f"{name} chunk {idx}: {str(e).splitlines()[0]}")
    return bad
