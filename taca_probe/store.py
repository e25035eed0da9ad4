"""Run stores: zarr v3 groups that open as labeled ``xarray.Dataset``\\s. This module alone knows zarr.

Layout (schema version :data:`SCHEMA_VERSION`; the names are a contract, see the README):

=====================  ==========================================  =========  ===============================
variable               dimensions                                  dtype      chunk
=====================  ==========================================  =========  ===============================
``vis_txt_mass``       (sample, [branch,] step, layer, head)       float32    one sample
``txt_vis_mass``       (sample, [branch,] step, layer, head)       float32    one sample
``vis_txt_mass_ref``   (sample, [branch,] step, layer, head)       float32    one sample
``token_mass``         (sample, [branch,] step, layer, token)      float32    one sample
``maps`` (optional)    (sample, [branch,] step, layer, token, y, x) float16   one (sample, step, layer)
``image``              (sample, image_y, image_x, channel)         uint8      one sample
=====================  ==========================================  =========  ===============================

Samples are written slot by slot: the arrays grow by one slot along ``sample``, the slot is filled,
and only then is ``complete[slot]`` set. A process killed in between leaves a slot that is not
complete: :func:`open_run` hides it and a resumed run rewrites it, so nothing finished is lost
and nothing is duplicated. ``maps`` chunks that were not selected are never written and read back
as NaN (the fill value).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from zarr.storage import LocalStore

from .errors import TacaProbeError

__all__ = [
    "SCHEMA_VERSION", "StoreError", "ChunkChecksumError", "RunLayout", "RunWriter", "open_run", "store_info",
    "is_store", "verify_store",
]

SCHEMA_VERSION = 1
_SCHEMA_ATTR = "taca_probe_schema"
_COMPLETE = "complete"

#: Non-dimension coordinates, by the dimensions they hang on.
_COORDS_SAMPLE = ("prompt", "seed", "batch_index")
_COORDS_ALL = "prompt seed batch_index timestep sigma gamma block_type token_text token_source token_is_padding"


class StoreError(TacaProbeError):
    """A store that is missing, not a taca-probe store, of an unknown schema, or inconsistent."""


@dataclass(frozen=True)
class RunLayout:
    """The fixed sizes of a store, known once the first sample's shapes are."""

    steps: int
    layers: tuple[str, ...]
    block_types: tuple[str, ...]
    heads: int
    n_txt: int
    grid: tuple[int, int]  # latent token grid (y, x)
    image_shape: tuple[int, int, int]  # (height, width, channels)
    token_source: tuple[str, ...]
    branches: tuple[str, ...]  # ("cond",) or ("uncond",) or ("cond", "uncond")
    maps: bool

    @property
    def branch_dim(self) -> tuple[str, ...]:
        return ("branch",) if len(self.branches) > 1 else ()

    def map_shards(self) -> tuple[int, ...]:
        """Shard of ``maps`` without the sample axis: all layers of one (sample, [branch,] step).

        Inner chunks stay one (sample, step, layer) block; a shard holds a step's layers in one
        file, so a FLUX store has steps x samples files instead of steps x layers x samples.
        """
        ones = (1,) * len(self.branch_dim)
        y, x = self.grid
        return (*ones, 1, len(self.layers), self.n_txt, y, x)

    def bytes_per_sample(self, *, map_steps: int | None = None, map_tokens: int | None = None) -> dict[str, int]:
        """Uncompressed bytes that one sample adds, by variable (what compression starts from).

        ``maps`` counts the written shards only: ``map_steps`` selected steps (default all) of
        ``map_tokens`` tokens (default all), the rest of each inner chunk being NaN.
        """
        itemsize = {"float32": 4, "float16": 2, "uint8": 1}
        out: dict[str, int] = {}
        for name, (_, shape, dtype, _) in self.variables().items():
            n = int(np.prod(shape)) * itemsize[dtype]
            if name == "maps":
                steps = self.steps if map_steps is None else map_steps
                tokens = self.n_txt if map_tokens is None else map_tokens
                n = n // self.steps * steps  # only the written steps' shards
                out["maps (selected tokens)"] = n // self.n_txt * tokens
            out[name] = n
        L = len(self.layers)
        out["coordinates"] = self.steps * 4 * 2 + self.steps * L * 4 + self.n_txt * 1  # timestep, sigma, gamma, padding
        return out

    def variables(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str, tuple[int, ...]]]:
        """name -> (dims, shape without sample, dtype, chunk without sample)."""
        s, L, H, T = self.steps, len(self.layers), self.heads, self.n_txt
        b = (len(self.branches),) if self.branch_dim else ()
        y, x = self.grid
        out = {
            "vis_txt_mass": (("sample", *self.branch_dim, "step", "layer", "head"), (*b, s, L, H), "float32", (*b, s, L, H)),
            "txt_vis_mass": (("sample", *self.branch_dim, "step", "layer", "head"), (*b, s, L, H), "float32", (*b, s, L, H)),
            "vis_txt_mass_ref": (("sample", *self.branch_dim, "step", "layer", "head"), (*b, s, L, H), "float32", (*b, s, L, H)),
            "token_mass": (("sample", *self.branch_dim, "step", "layer", "token"), (*b, s, L, T), "float32", (*b, s, L, T)),
            "image": (("sample", "image_y", "image_x", "channel"), self.image_shape, "uint8", self.image_shape),
        }
        if self.maps:
            ones = (1,) * len(b)
            out["maps"] = (
                ("sample", *self.branch_dim, "step", "layer", "token", "y", "x"),
                (*b, s, L, T, y, x),
                "float16",
                (*ones, 1, 1, T, y, x),
            )
        return out


def is_store(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a taca-probe store (of any schema version)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return _SCHEMA_ATTR in attrs


def _open_group(path: str | os.PathLike, mode: str):
    import zarr

    p = Path(path)
    if not p.exists():
        raise StoreError(f"no store at {str(p)!r}")
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{str(p)!r} is not a taca-probe store (no zarr v3 metadata)")
    try:
        group = zarr.open_group(str(p), mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises many kinds for a damaged store
        raise StoreError(f"cannot open {str(p)!r} as a zarr v3 group: {str(e).splitlines()[0]}") from None
    version = group.attrs.get(_SCHEMA_ATTR)
    if version is None:
        raise StoreError(f"{str(p)!r} is a zarr store but not a taca-probe store (no {_SCHEMA_ATTR} attribute)")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise StoreError(
            f"{str(p)!r} has store schema {version!r}; this taca-probe reads schema 1..{SCHEMA_VERSION}: "
            "upgrade taca-probe to read it"
        )
    return group


class RunWriter:
    """Creates a store and fills it sample slot by sample slot.

    Parameters
    ----------
    path
        Folder of the store.
    layout
        Fixed sizes.
    attrs
        Provenance attributes (JSON-serialisable).
    """

    def __init__(self, group: Any, layout: RunLayout, path: Path):
        self.group, self.layout, self.path = group, layout, path
        self.arrays = {name: group[name] for name in group.array_keys()}

    # -- creation / reopening ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: RunLayout,
        attrs: Mapping[str, Any],
        *,
        slots: Sequence[tuple[str, int, int]] | None = None,
    ) -> RunWriter:
        """Create a new store; refuses an existing path.

        ``slots`` pre-allocates the sample dimension with its (prompt, seed, batch_index) plan,
        all marked not complete, so that several processes can fill disjoint slots.
        """
        import zarr

        n_samples = len(slots) if slots else 0
        p = Path(path)
        if p.exists():
            raise StoreError(f"{str(p)!r} already exists; pass --resume to complete it or --overwrite to replace it")
        group = zarr.open_group(str(p), mode="w-", zarr_format=3)
        try:
            group.attrs.update({_SCHEMA_ATTR: SCHEMA_VERSION, "layout": _layout_json(layout), **attrs})
            L = layout

            def fixed(name, dims, values, dtype):
                values = np.asarray(values, dtype=dtype if dtype is not str else None)
                arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=dtype,
                                         dimension_names=list(dims), compressors=_compressors(dtype))
                arr[...] = values

            fixed("step", ("step",), np.arange(L.steps), "int64")
            fixed("layer", ("layer",), list(L.layers), str)
            fixed("block_type", ("layer",), list(L.block_types), str)
            fixed("head", ("head",), np.arange(L.heads), "int64")
            fixed("token", ("token",), np.arange(L.n_txt), "int64")
            fixed("token_source", ("token",), list(L.token_source), str)
            fixed("y", ("y",), np.arange(L.grid[0]), "int64")
            fixed("x", ("x",), np.arange(L.grid[1]), "int64")
            fixed("channel", ("channel",), list("RGB")[: L.image_shape[2]], str)
            if L.branch_dim:
                fixed("branch", ("branch",), list(L.branches), str)

            def growing(name, dims, rest_shape, dtype, rest_chunks, fill, coords=True, rest_shards=None):
                attributes = {"coordinates": _COORDS_ALL} if coords else {}
                extra = {} if rest_shards is None else {"shards": (1, *rest_shards)}
                group.create_array(name, shape=(n_samples, *rest_shape), chunks=(1, *rest_chunks), dtype=dtype,
                                   fill_value=fill, dimension_names=list(dims), attributes=attributes,
                                   compressors=_compressors(dtype), **extra)

            growing("sample", ("sample",), (), "int64", (), 0, coords=False)
            growing(_COMPLETE, ("sample",), (), "bool", (), False, coords=False)
            growing("prompt", ("sample",), (), str, (), "", coords=False)
            growing("seed", ("sample",), (), "int64", (), 0, coords=False)
            growing("batch_index", ("sample",), (), "int64", (), 0, coords=False)
            growing("timestep", ("sample", "step"), (L.steps,), "float32", (L.steps,), np.nan, coords=False)
            growing("sigma", ("sample", "step"), (L.steps,), "float32", (L.steps,), np.nan, coords=False)
            n_layers = len(L.layers)
            growing("gamma", ("sample", "step", "layer"), (L.steps, n_layers), "float32", (L.steps, n_layers),
                    np.nan, coords=False)
            growing("token_text", ("sample", "token"), (L.n_txt,), str, (L.n_txt,), "", coords=False)
            growing("token_is_padding", ("sample", "token"), (L.n_txt,), "bool", (L.n_txt,), False, coords=False)
            for name, (dims, shape, dtype, chunks) in L.variables().items():
                fill = 0 if dtype == "uint8" else np.nan
                shards = L.map_shards() if name == "maps" else None
                growing(name, dims, shape, dtype, chunks, fill, coords=name != "image", rest_shards=shards)
            if slots:
                n = len(slots)
                group["prompt"][:] = np.array([p for p, _, _ in slots], dtype=object)
                group["seed"][:] = np.array([s for _, s, _ in slots], dtype=np.int64)
                group["batch_index"][:] = np.array([b for _, _, b in slots], dtype=np.int64)
                group["sample"][:] = np.arange(n)
                group.attrs["planned_samples"] = n
        except BaseException:
            shutil.rmtree(p, ignore_errors=True)  # never leave a half-created store
            raise
        return cls(group, layout, p)

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> RunWriter:
        """Open an existing store for appending (resume)."""
        group = _open_group(path, "r+")
        return cls(group, _layout_from_json(group.attrs["layout"]), Path(path))

    # -- state ---------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def slots(self) -> list[tuple[str, int, int, bool]]:
        """(prompt, seed, batch_index, complete) of every slot."""
        n = self.arrays[_COMPLETE].shape[0]
        if n == 0:
            return []
        prompts = self.arrays["prompt"][:n]
        seeds = self.arrays["seed"][:n]
        batch = self.arrays["batch_index"][:n]
        done = self.arrays[_COMPLETE][:n]
        return [(str(prompts[i]), int(seeds[i]), int(batch[i]), bool(done[i])) for i in range(n)]

    def reserve(self, slot: int) -> None:
        """Make the arrays hold ``slot`` and mark it not complete (it is about to be (re)written)."""
        for name, arr in self.arrays.items():
            if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample" and arr.shape[0] <= slot:
                arr.resize((slot + 1, *arr.shape[1:]))
        self.arrays[_COMPLETE][slot] = False

    def write(self, slot: int, values: Mapping[str, np.ndarray]) -> None:
        """Write per-sample values (anything with a leading ``sample`` dimension) into ``slot``."""
        for name, value in values.items():
            self.arrays[name][slot] = value

    def write_maps(self, slot: int, index: tuple[int, ...], block: np.ndarray) -> None:
        """Write one maps shard: ``index`` is ([branch,] step); block (layer, token, y, x) float16
        with NaN where nothing was selected (those inner chunks are not stored)."""
        self.arrays["maps"][(slot, *index)] = block

    def complete(self, slot: int) -> None:
        """Mark ``slot`` complete: the last write of a sample."""
        self.arrays["sample"][slot] = slot
        self.arrays[_COMPLETE][slot] = True

    def set_attrs(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)


def _compressors(dtype: Any) -> tuple:
    """zstd, then a CRC32C checksum so that a corrupted chunk is detected on read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=3), Crc32cCodec())


class ChunkChecksumError(StoreError):
    """A chunk whose CRC32C does not match its data: the file was damaged after writing."""


def _crc_ok(data: bytes) -> bool:
    import google_crc32c

    return len(data) >= 4 and google_crc32c.value(data[:-4]).to_bytes(4, "little") == data[-4:]


class _ChecksumLocalStore(LocalStore):
    """A read-only zarr ``LocalStore`` that verifies each chunk's CRC32C as it is read and names
    the damaged chunk in the error (zarr's own codec check cannot say which chunk failed).

    Module-level (not a closure) so that dask workers can unpickle it.
    """

    def __init__(self, root: str | os.PathLike, *, read_only: bool = True) -> None:
        super().__init__(str(root), read_only=read_only)
        self._kinds: dict[str, tuple[bool, int] | None] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state["_kinds"] = {}
        return state

    def _kind(self, name: str) -> tuple[bool, int] | None:
        """None: no checksum; (False, 0): plain chunks; (True, n): shards of n inner chunks."""
        if name not in self._kinds:
            try:
                meta = json.loads((Path(str(self.root)) / name / "zarr.json").read_text())
            except (OSError, ValueError):
                self._kinds[name] = None
                return None
            codecs = meta.get("codecs", [])
            if codecs and codecs[0].get("name") == "sharding_indexed":
                conf = codecs[0]["configuration"]
                inner = conf["chunk_shape"]
                outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
                has = any(c.get("name") == "crc32c" for c in conf.get("codecs", [])) and any(
                    c.get("name") == "crc32c" for c in conf.get("index_codecs", []))
                self._kinds[name] = (True, int(np.prod([o // i for o, i in zip(outer, inner)]))) if has else None
            else:
                self._kinds[name] = (False, 0) if any(c.get("name") == "crc32c" for c in codecs) else None
        return self._kinds[name]

    def _check(self, key: str, data: bytes) -> None:
        if not _crc_ok(data):
            raise ChunkChecksumError(
                f"corrupted chunk {key!r} in {str(self.root)!r}: its CRC32C checksum does not match")

    async def get(self, key, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if buf is None or "/c/" not in key:
            return buf
        kind = self._kind(key.split("/c/", 1)[0])
        if kind is None:
            return buf
        data = buf.to_bytes()
        sharded, n_inner = kind
        if not sharded or byte_range is not None:
            self._check(key, data)  # a whole chunk, or one inner chunk / the index of a shard
            return buf
        index_size = 16 * n_inner + 4  # a whole shard: verify its index, then each inner chunk
        index = data[-index_size:]
        self._check(key, index)
        pairs = np.frombuffer(index[:-4], dtype="<u8").reshape(-1, 2)
        for i, (offset, nbytes) in enumerate(pairs):
            if offset != np.iinfo(np.uint64).max:
                self._check(f"{key} (inner chunk {i})", data[int(offset) : int(offset + nbytes)])
        return buf


def _checksum_store(root: str | os.PathLike) -> _ChecksumLocalStore:
    return _ChecksumLocalStore(root, read_only=True)


def verify_store(path: str | os.PathLike) -> list[str]:
    """Read every chunk of every array; return the keys of damaged chunks (empty: all good)."""
    import zarr

    _open_group(path, "r")
    bad: list[str] = []
    store = _checksum_store(path)
    group = zarr.open_group(store=store, mode="r", zarr_format=3)
    for name in sorted(group.array_keys()):
        arr = group[name]
        for idx in np.ndindex(*arr.cdata_shape):
            sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks))
            try:
                arr[sel]
            except ChunkChecksumError as e:
                bad.append(str(e).split("'")[1])
            except ValueError as e:  # zarr's own codec check, should ours not have run
                bad.append(f"{name} chunk {idx}: {str(e).splitlines()[0]}")
    return bad


def _layout_json(layout: RunLayout) -> dict:
    d = dict(layout.__dict__)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _layout_from_json(d: Mapping[str, Any]) -> RunLayout:
    return RunLayout(
        steps=int(d["steps"]), layers=tuple(d["layers"]), block_types=tuple(d["block_types"]), heads=int(d["heads"]),
        n_txt=int(d["n_txt"]), grid=tuple(d["grid"]), image_shape=tuple(d["image_shape"]),
        token_source=tuple(d["token_source"]), branches=tuple(d["branches"]), maps=bool(d["maps"]),
    )


def open_run(path: str | os.PathLike, *, chunks: Any = None, include_incomplete: bool = False):
    """Open a store as a lazy, labeled :class:`xarray.Dataset`.

    Parameters
    ----------
    path
        The store folder.
    chunks
        Passed to :func:`xarray.open_zarr`: ``None`` (default) opens lazily without dask, loading
        what is indexed; ``"auto"``, ``{}`` or a dict of sizes gives dask arrays (needs dask).
    include_incomplete
        Also return slots whose sample was not finished (for inspection only).

    Returns
    -------
    xarray.Dataset
        Only complete samples unless asked otherwise. Data variables in a fixed order
        (:data:`VARIABLE_ORDER`); coordinates include ``channel`` (``R``, ``G``, ``B``: the image's
        last axis). ``attrs`` hold the provenance, among them ``lora`` and ``lora_scale`` (the LoRA
        active where gamma != 1, and its weight) and ``planned_samples`` (the number of slots a
        ``record``/``sweep`` run planned up front; None for a store grown sample by sample with
        :func:`taca_probe.probe`).
    """
    import xarray as xr

    group = _open_group(path, "r")  # validates the schema before xarray sees anything
    del group
    try:
        ds = xr.open_zarr(_checksum_store(path), consolidated=False, zarr_format=3, chunks=chunks)
    except Exception as e:
        raise StoreError(f"cannot read {str(path)!r}: {str(e).splitlines()[0]}") from None
    complete = ds[_COMPLETE].values.astype(bool)
    ds = ds.drop_vars(_COMPLETE)
    if not include_incomplete:
        ds = ds.isel(sample=np.flatnonzero(complete))
    ds.attrs.pop("layout", None)
    # zarr lists arrays in no fixed order; a stable order keeps printouts and tests comparable
    names = [v for v in VARIABLE_ORDER if v in ds.data_vars] + sorted(v for v in ds.data_vars if v not in VARIABLE_ORDER)
    coords = [c for c in COORD_ORDER if c in ds.coords] + sorted(c for c in ds.coords if c not in COORD_ORDER)
    return xr.Dataset({v: ds[v].variable for v in names}, coords={c: ds.coords[c].variable for c in coords},
                      attrs=ds.attrs)


#: The order of a run's data variables and coordinates in :func:`open_run`.
VARIABLE_ORDER = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass", "maps", "image")
COORD_ORDER = ("sample", "prompt", "seed", "batch_index", "branch", "step", "timestep", "sigma", "gamma", "layer",
               "block_type", "head", "token", "token_source", "token_text", "token_is_padding", "y", "x", "channel")


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """Schema, sizes and provenance of a store, for ``taca-probe info``."""
    group = _open_group(path, "r")
    arrays = {}
    total_stored = 0
    for name in sorted(group.array_keys()):
        arr = group[name]
        stored = _folder_bytes(Path(path) / name)
        total_stored += stored
        arrays[name] = {
            "dims": list(arr.metadata.dimension_names or []),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "stored_bytes": stored,
        }
    complete = group[_COMPLETE][:] if group[_COMPLETE].shape[0] else np.zeros(0, bool)
    attrs = dict(group.attrs)
    attrs.pop("layout", None)
    return {
        "path": str(path),
        "schema": attrs.get(_SCHEMA_ATTR),
        "samples_complete": int(complete.sum()),
        "samples_incomplete": int((~complete.astype(bool)).sum()),
        "stored_bytes": total_stored,
        "arrays": arrays,
        "attrs": attrs,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def remove_store(path: str | os.PathLike) -> None:
    """Delete a store folder (``--overwrite``); refuses folders that are not taca-probe stores."""
    p = Path(path)
    if not p.exists():
        return
    if not is_store(p):
        raise StoreError(f"refusing to overwrite {str(p)!r}: it is not a taca-probe store")
    shutil.rmtree(p)
