"""Run stores: zarr v3 groups that open as labeled ``xarray.Dataset``\\s. This module alone knows zarr.

The layout (schema :data:`SCHEMA_VERSION`) is documented in the README. A sample becomes visible
only when its slot's manifest and ``complete`` flag are written, after all its chunks: a process
killed in between leaves a slot that :func:`open_run` hides and a resumed run rewrites. Integrity
(CRC32C per chunk, per-sample manifests) lives in :mod:`taca_probe.integrity`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr
import zarr

from .errors import StoreError, TacaProbeError
from .integrity import BOOKKEEPING, COMPLETE, COMPRESSORS, DAMAGED, INFO_READ_LIMIT, MANIFEST, ChecksumStore, \
    ChunkChecksumError, chunk_read_problems, complete_flags, digest, is_sample_array, manifest_texts, read_each, \
    sample_problems, slot_keys, slot_of

__all__ = [
    "SCHEMA_VERSION", "StoreError", "ChunkChecksumError", "RunLayout", "RunWriter", "open_run", "store_info",
    "is_store", "verify_store", "StoreIntegrityWarning",
]

SCHEMA_VERSION = 1
_SCHEMA_ATTR = "taca_probe_schema"
_MANIFEST_ATTR = "chunk_manifest"  # group attribute: this store keeps manifests (absence is checkable)
#: The ``coordinates`` attribute of the data variables (xarray's encoding).
_COORDS_ALL = "prompt seed batch_index timestep sigma gamma block_type token_text token_source token_is_padding"


class StoreIntegrityWarning(UserWarning):
    """A store recorded before chunk manifests: a deleted chunk cannot be told from an empty one."""


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

    def bytes_per_sample(self, *, map_steps: int | None = None, map_tokens: int | None = None) -> dict[str, int]:
        """Uncompressed bytes one sample adds, by variable; ``maps`` counts the shards of ``map_steps``
        selected steps and, as ``maps (selected tokens)``, ``map_tokens`` tokens (defaults: all)."""
        out: dict[str, int] = {}
        for name, (_, shape, dtype, _) in self.variables().items():
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if name == "maps":
                n = n // self.steps * (self.steps if map_steps is None else map_steps)
                out["maps (selected tokens)"] = n // self.n_txt * (self.n_txt if map_tokens is None else map_tokens)
            out[name] = n
        # timestep, sigma, gamma, padding
        out["coordinates"] = self.steps * 4 * 2 + self.steps * len(self.layers) * 4 + self.n_txt * 1
        return out

    def variables(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str, tuple[int, ...]]]:
        """name -> (dims, shape without sample, dtype, chunk without sample)."""
        s, L, H, T = self.steps, len(self.layers), self.heads, self.n_txt
        b = (len(self.branches),) if self.branch_dim else ()
        lead = ("sample", *self.branch_dim, "step", "layer")
        out = {name: ((*lead, "head"), (*b, s, L, H), "float32", (*b, s, L, H))
               for name in ("vis_txt_mass", "txt_vis_mass", "vis_txt_mass_ref")}
        out["token_mass"] = ((*lead, "token"), (*b, s, L, T), "float32", (*b, s, L, T))
        out["image"] = (("sample", "image_y", "image_x", "channel"), self.image_shape, "uint8", self.image_shape)
        if self.maps:  # one chunk per (sample, [branch,] step, layer)
            out["maps"] = ((*lead, "token", "y", "x"), (*b, s, L, T, *self.grid), "float16",
                           (*(1,) * len(b), 1, 1, T, *self.grid))
        return out


def is_store(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a taca-probe store (of any schema version)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return _SCHEMA_ATTR in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """A store's attributes (provenance, settings), without reading any array."""
    return dict(_open_group(path, "r").attrs)


def store_path(path: Any, what: str) -> Path:
    """The folder of a public reader's ``path`` argument; anything but a str or os.PathLike is one line."""
    if not isinstance(path, (str, os.PathLike)):
        raise StoreError(f"{what} needs the path of a store folder (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _open_group(path: str | os.PathLike, mode: str):
    """The store's group, read through a :class:`ChecksumStore`; schema and count attributes checked."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no store at {str(p)!r}")
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{str(p)!r} is not a taca-probe store (no zarr v3 metadata)")
    try:
        group = zarr.open_group(ChecksumStore(p, read_only=mode == "r"), mode=mode, zarr_format=3)
        version = group.attrs.get(_SCHEMA_ATTR)
    except Exception as e:  # zarr raises many kinds for a damaged store
        raise StoreError(f"cannot open {str(p)!r} as a zarr v3 group: {_first_line(e)}") from None
    if version is None:
        raise StoreError(f"{str(p)!r} is a zarr store but not a taca-probe store (no {_SCHEMA_ATTR} attribute)")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise StoreError(f"{str(p)!r} has store schema {version!r}; this taca-probe reads schema 1..{SCHEMA_VERSION}: "
                         "upgrade taca-probe to read it")
    # the counts analyses and summaries compute with (n_txt: the uniform-attention reference); absent: not checked
    for name in ("steps", "height", "width", "n_txt", "n_vis"):
        value = group.attrs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise StoreError(f"{str(p)!r}: attribute {name!r} in zarr.json must be a positive integer, got {value!r}; "
                             + _DAMAGED_HINT)
    return group


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if not isinstance(e, TacaProbeError) else text


_DAMAGED_HINT = "re-record it with --overwrite, or restore it from a copy"


def _arrays(group: Any, path: Path) -> dict[str, Any]:
    """Every array of the group; damaged metadata is named instead of raising zarr's own error."""
    out = {}
    for child in sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "zarr.json").is_file()):
        try:
            out[child] = group[child]
        except Exception as e:
            raise StoreError(f"the metadata of {str(path / child / 'zarr.json')!r} is damaged ({_first_line(e)}); "
                             + _DAMAGED_HINT) from None
    return out


def _layout_of(group: Any, path: Path) -> RunLayout:
    try:
        d = group.attrs["layout"]
        types = {"steps": int, "heads": int, "n_txt": int, "maps": bool}  # the other fields are tuples
        return RunLayout(**{f.name: types.get(f.name, tuple)(d[f.name]) for f in fields(RunLayout)})
    except Exception as e:
        raise StoreError(f"the 'layout' attribute of {str(path / 'zarr.json')!r} is missing or damaged "
                         f"({_first_line(e)}); " + _DAMAGED_HINT) from None


def _structure_problems(path: Path, group: Any, arrays: Mapping[str, Any], layout: RunLayout) -> list[str]:
    """What is wrong with the store as a whole: arrays missing, checksums switched off in metadata."""
    expected = ["step", "layer", "block_type", "head", "token", "token_source", "y", "x", "channel", "sample",
                COMPLETE, "prompt", "seed", "batch_index", "timestep", "sigma", "gamma", "token_text",
                "token_is_padding", *layout.variables(), *(["branch"] if layout.branch_dim else [])]
    if group.attrs.get(_MANIFEST_ATTR):
        expected.append(MANIFEST)
    problems = [f"array {name!r} is missing" for name in expected if name not in arrays]
    kinds = ChecksumStore(path)
    return problems + [f"array {name!r} has no crc32c codec in its metadata (checksums switched off)"
                       for name in arrays if kinds._kind(name) is None]


def _open_checked(path: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """(group, arrays, whole-store problems), read-only."""
    group = _open_group(path, "r")
    arrays = _arrays(group, path)
    return group, arrays, _structure_problems(path, group, arrays, _layout_of(group, path))


def _raise_structure(path: Path, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{str(path)!r} is damaged: {problems[0]}{more}; " + _DAMAGED_HINT)


class RunWriter:
    """Creates a store and fills it sample slot by sample slot.

    The slot table (prompt, seed, batch index, complete) is read once when the writer opens and
    then kept up to date in memory, so that the work per sample does not grow with the store.
    """

    # Why not xarray's ``to_zarr(compute=False)`` template + ``to_zarr(region=...)`` per sample: a sample must
    # become visible only after its chunk manifest and ``complete`` flag, and region writes have no commit point
    # nor tell which chunk files they produced (the manifest needs their keys and digests); map shards leave
    # unselected layers unwritten; ``append_dim`` (unplanned runs grow) cannot be combined with ``region``
    # (planned slots filled from several ranks). So the arrays are written directly, in xarray's encoding.

    def __init__(self, group: Any, layout: RunLayout, path: Path):
        self.group, self.layout, self.path = group, layout, path
        self.arrays = _arrays(group, path)
        _raise_structure(path, _structure_problems(path, group, self.arrays, layout))
        self._slots = self._read_slots()
        self._done = {s[:3] for s in self._slots if s[3]}
        self._where = {s[:3]: i for i, s in reversed(list(enumerate(self._slots)))}  # key -> its first slot
        self._free_hint = 0

    @classmethod
    def create(cls, path: str | os.PathLike, layout: RunLayout, attrs: Mapping[str, Any], *,
               slots: Sequence[tuple[str, int, int]] | None = None) -> RunWriter:
        """Create a new store; refuses an existing path.

        ``slots`` pre-allocates the sample dimension with its (prompt, seed, batch_index) plan, none
        complete, so that several processes can fill disjoint slots. The store is built in a hidden
        folder and renamed into place: a process killed meanwhile leaves nothing or a whole store.
        """
        n_samples = len(slots) if slots else 0
        p = Path(path)
        if p.exists():
            raise StoreError(f"{str(p)!r} already exists; pass --resume (mode='resume') to complete it or --overwrite "
                             "(mode='overwrite') to replace it")
        if kept := _left_by_the_dead(p, _ASIDE_PREFIX):  # a store replaced by a killed --overwrite: never deleted
            raise StoreError(f"{str(kept[0])!r} holds the store an interrupted --overwrite was replacing; rename it "
                             f"to {p.name!r} to keep it, or delete it")
        _remove_stale_temporaries(p)
        tmp = p.parent / f"{_TMP_PREFIX}{p.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        try:
            layout_json = {k: list(v) if isinstance(v, tuple) else v for k, v in layout.__dict__.items()}
            group.attrs.update({_SCHEMA_ATTR: SCHEMA_VERSION, "layout": layout_json, _MANIFEST_ATTR: True, **attrs})
            L, S, T = layout, layout.steps, layout.n_txt
            fixed = {"step": ("step", np.arange(S), "int64"), "layer": ("layer", list(L.layers), str),
                     "block_type": ("layer", list(L.block_types), str), "head": ("head", np.arange(L.heads), "int64"),
                     "token": ("token", np.arange(T), "int64"), "token_source": ("token", list(L.token_source), str),
                     "y": ("y", np.arange(L.grid[0]), "int64"), "x": ("x", np.arange(L.grid[1]), "int64"),
                     "channel": ("channel", list("RGB")[: L.image_shape[2]], str)}
            if L.branch_dim:
                fixed["branch"] = ("branch", list(L.branches), str)
            for name, (dim, values, dtype) in fixed.items():
                values = np.asarray(values, dtype=dtype if dtype is not str else None)
                group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=dtype,
                                   dimension_names=[dim], compressors=COMPRESSORS)[...] = values

            def grow(name, dims, shape, dtype, fill, chunks=None, coords=None, shards=None):
                group.create_array(name, shape=(n_samples, *shape), chunks=(1, *(shape if chunks is None else chunks)),
                                   dtype=dtype, fill_value=fill, dimension_names=["sample", *dims],
                                   attributes={"coordinates": coords} if coords else {}, compressors=COMPRESSORS,
                                   **({} if shards is None else {"shards": (1, *shards)}))

            for name, dtype, fill in [("sample", "int64", 0), (COMPLETE, "bool", False), (MANIFEST, str, ""),
                                      ("prompt", str, ""), ("seed", "int64", 0), ("batch_index", "int64", 0)]:
                grow(name, (), (), dtype, fill)
            grow("timestep", ("step",), (S,), "float32", np.nan)
            grow("sigma", ("step",), (S,), "float32", np.nan)
            grow("gamma", ("step", "layer"), (S, len(L.layers)), "float32", np.nan)
            grow("token_text", ("token",), (T,), str, "")
            grow("token_is_padding", ("token",), (T,), "bool", False)
            for name, (dims, shape, dtype, chunks) in L.variables().items():
                # a maps shard holds all layers of one (sample, [branch,] step): a FLUX store has
                # steps x samples files instead of steps x layers x samples
                shards = (*chunks[:-4], len(L.layers), *chunks[-3:]) if name == "maps" else None
                grow(name, dims[1:], shape, dtype, 0 if dtype == "uint8" else np.nan, chunks,
                     None if name == "image" else _COORDS_ALL, shards)
            if slots:
                prompts, seeds, batches = zip(*slots)
                group["prompt"][:] = np.array(prompts, dtype=object)
                group["seed"][:], group["batch_index"][:] = np.array(seeds, np.int64), np.array(batches, np.int64)
                group["sample"][:] = np.arange(len(slots))
                group.attrs["planned_samples"] = len(slots)
            try:
                os.rename(tmp, p)  # atomic: the store appears whole or not at all
            except OSError:
                if p.exists():  # another process created it meanwhile
                    raise StoreError(f"{str(p)!r} was created by another process meanwhile; pass --resume to "
                                     "complete it") from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-created store
            raise
        return cls(_open_group(p, "r+"), layout, p)

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> RunWriter:
        """Open an existing store for appending (resume); damaged metadata is a :class:`StoreError`."""
        p = Path(path)
        group = _open_group(p, "r+")
        return cls(group, _layout_of(group, p), p)

    def _read_slots(self) -> list[tuple[str, int, int, bool]]:
        n = self.arrays[COMPLETE].shape[0]
        columns = [read_each(self.arrays[k], n) for k in ("prompt", "seed", "batch_index", COMPLETE)]
        # a damaged key or flag: the slot counts as not complete and is recorded again
        return [UNKNOWN_SLOT if any(v is DAMAGED for v in (p, s, b, d)) else (str(p), int(s), int(b), bool(d))
                for p, s, b, d in zip(*columns)]

    def slots(self) -> list[tuple[str, int, int, bool]]:
        """(prompt, seed, batch_index, complete) of every slot (as this writer knows them)."""
        return list(self._slots)

    def slot(self, slot: int) -> tuple[str, int, int, bool] | None:
        """One slot's (prompt, seed, batch_index, complete), or None beyond the end; O(1)."""
        return self._slots[slot] if 0 <= slot < len(self._slots) else None

    def is_done(self, key: tuple[str, int, int]) -> bool:
        """Whether a (prompt, seed, batch_index) sample is complete; O(1)."""
        return key in self._done

    def place(self, prompt: str, seed: int, n: int = 1) -> int:
        """The first of ``n`` consecutive slots for the images of (prompt, seed): where they already are
        (planned, or left unfinished by a killed run) if all ``n`` sit in a row, else the first ``n`` in a row
        that are neither complete nor held for another sample. A sample must not overwrite a complete one
        after a gap, take a slot that ``record`` planned for another, or be stored twice after a resume."""
        keys = [(prompt, seed, b) for b in range(n)]

        def fits(first: int) -> bool:
            return all(s[:3] == k or (not s[3] and s[:3] in _UNSET_KEYS)
                       for s, k in zip(self._slots[first : first + n], keys))  # slots beyond the end are new

        start = self._where.get(keys[0])
        if start is not None and fits(start):
            return start
        while self._free_hint < len(self._slots) and self._slots[self._free_hint][3]:
            self._free_hint += 1
        slot = self._free_hint
        while not fits(slot):
            slot += 1
        return slot

    def reserve(self, slot: int) -> None:
        """Make the arrays hold ``slot`` and mark it not complete (it is about to be (re)written)."""
        for arr in self.arrays.values():
            if is_sample_array(arr) and arr.shape[0] <= slot:
                arr.resize((slot + 1, *arr.shape[1:]))
        self.arrays[COMPLETE][slot] = False
        self._slots += [("", 0, 0, False)] * (slot + 1 - len(self._slots))
        self._set_slot(slot, False)

    def _set_slot(self, slot: int, done: bool, key: tuple[str, int, int] | None = None) -> None:
        """Set a slot's complete flag and, if given, its (prompt, seed, batch_index) in the table."""
        old = self._slots[slot]
        if old[3]:
            self._done.discard(old[:3])
        key = old[:3] if key is None else key
        self._slots[slot] = (*key, done)
        if self._where.get(old[:3]) == slot:
            del self._where[old[:3]]
        self._where.setdefault(key, slot)
        if done:
            self._done.add(key)
        else:
            self._free_hint = min(self._free_hint, slot)

    def write_sample(self, first_slot: int, sample: Any) -> None:
        """Write a recorded :class:`~taca_probe.capture.Sample` (n images) into slots ``first_slot..+n``,
        each completed only after all its chunks are written."""
        L = self.layout
        diffs = [f"{k}: store {getattr(L, k)!r} vs now {getattr(sample.layout, k)!r}"
                 for k in ("steps", "layers", "heads", "n_txt", "grid", "image_shape", "branches", "maps")
                 if getattr(L, k) != getattr(sample.layout, k)]
        if diffs:
            raise StoreError(f"sample does not fit the store {str(self.path)!r}: " + "; ".join(diffs))
        squeeze = not L.branch_dim
        for b in range(sample.images.shape[0]):
            slot = first_slot + b
            self.reserve(slot)
            values = {"prompt": sample.prompt, "seed": sample.seed, "batch_index": b, "timestep": sample.timestep,
                      "sigma": sample.sigma, "gamma": sample.gamma, "image": sample.images[b],
                      "token_text": np.array(sample.token_text, dtype=object),
                      "token_is_padding": sample.token_is_padding,
                      **{name: v[b, 0] if squeeze else v[b] for name, v in sample.values.items()}}
            for name, value in values.items():
                self.arrays[name][slot] = value
            self._set_slot(slot, False, (str(sample.prompt), int(sample.seed), b))
            for (bi, step), entries in sorted(sample.maps.items()):
                # one shard: every layer of this step; unselected layers stay NaN (those chunks are not stored)
                block = np.full((len(L.layers), L.n_txt, *L.grid), np.nan, np.float16)
                for li, m in entries:
                    block[li, sample.map_tokens] = m[b].T.reshape(len(sample.map_tokens), *L.grid)
                self.arrays["maps"][(slot, *(() if squeeze else (bi,)), step)] = block
            self.complete(slot)

    def complete(self, slot: int) -> None:
        """Mark ``slot`` complete: the last write of a sample, after its chunk manifest."""
        self.arrays["sample"][slot] = slot
        if MANIFEST in self.arrays:
            self.arrays[MANIFEST][slot] = json.dumps(self._manifest(slot), sort_keys=True)
        self.arrays[COMPLETE][slot] = True
        self._set_slot(slot, True)

    def _manifest(self, slot: int) -> dict[str, list | None]:
        """Key -> [digest of the file, size], or None where the sample has no file (all fill value)."""
        out: dict[str, list | None] = {}
        for key in slot_keys(self.arrays, slot):
            try:
                data = (self.path / key).read_bytes()
            except FileNotFoundError:
                out[key] = None
            else:
                out[key] = [digest(data), len(data)]
        return out

    def damaged_slots(self) -> dict[int, list[str]]:
        """Complete samples whose chunks are missing, moved or damaged: slot -> problems (reads everything).

        Stores without manifests: the chunks whose checksum fails, by slot. Damage outside the
        samples (a coordinate array) cannot be repaired by re-recording: :class:`StoreError`.
        """
        done = np.array([s[3] for s in self._slots], dtype=bool)
        if MANIFEST in self.arrays:
            out = sample_problems(self.path, self.arrays, read=True, complete=done)
            keys = chunk_read_problems(self.path, [n for n, a in self.arrays.items() if not is_sample_array(a)])
        else:
            out, keys = {}, []
            for key in chunk_read_problems(self.path, list(self.arrays)):
                slot = slot_of(key)
                name = key.split("/", 1)[0]
                if slot is not None and is_sample_array(self.arrays[name]) and name not in BOOKKEEPING:
                    if slot < len(done) and done[slot]:
                        out.setdefault(slot, []).append(f"{key}: damaged")
                else:
                    keys.append(key)
        if keys:
            raise StoreError(f"{str(self.path)!r}: chunk {keys[0]!r} is damaged and holds no sample that can be "
                             "recorded again; " + _DAMAGED_HINT)
        return out

    def mark_for_repair(self, planned: Mapping[int, tuple[str, int, int]]) -> None:
        """Mark damaged samples not complete so that a resumed run records them again; slot -> the
        (prompt, seed, batch_index) planned there, written first: the slot's own may be the damage,
        and the other ranks read the slot table from disk."""
        for slot, (prompt, seed, batch) in planned.items():
            self.arrays["prompt"][slot], self.arrays["seed"][slot] = prompt, seed
            self.arrays["batch_index"][slot] = batch
            self.arrays[COMPLETE][slot] = False
            self._set_slot(slot, False, (prompt, seed, batch))


_TMP_PREFIX, _ASIDE_PREFIX = ".creating.", ".replaced."  # hidden folders: a store being built, one set aside
#: A slot whose (prompt, seed, batch_index) could not be read: any planned sample may fill it.
UNKNOWN_SLOT = ("", -1, -1, False)
#: The keys of a slot that holds no sample's key: new, or unreadable.
_UNSET_KEYS = (("", 0, 0), UNKNOWN_SLOT[:3])


def _left_by_the_dead(path: Path, prefix: str) -> list[Path]:
    """The hidden folders ``prefix + path.name + .host.pid...`` beside ``path`` whose process (of this host) is gone."""
    start = f"{prefix}{path.name}.{socket.gethostname()}."
    dead = []
    for tmp in path.parent.glob(f"{start}*"):
        try:
            os.kill(int(tmp.name[len(start):].split(".")[0]), 0)
        except ProcessLookupError:
            dead.append(tmp)
        except (ValueError, PermissionError):
            continue
    return dead


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the hidden build folders of ``path`` that a killed process of this host left behind."""
    for tmp in _left_by_the_dead(path, _TMP_PREFIX):  # nobody else would finish them
        if tmp.is_dir() and (not (tmp / "zarr.json").exists() or is_store(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)


def verify_store(path: str | os.PathLike) -> list[str]:
    """Check every chunk; return the keys of damaged, missing, moved or swapped ones (empty: all good).

    Whole-store damage (an array missing, checksums switched off) is one line each. A store recorded
    before chunk manifests is checked for damaged chunks only, with a :class:`StoreIntegrityWarning`.
    """
    p = store_path(path, "verify_store")
    _, arrays, bad = _open_checked(p)
    if MANIFEST not in arrays:
        warnings.warn(f"{str(p)!r} was recorded before chunk manifests: a deleted or moved chunk cannot be detected "
                      "in it, only a damaged one", StoreIntegrityWarning, stacklevel=2)
    for problems in sample_problems(p, arrays, read=True).values():
        bad.extend(problem.split(": ", 1)[0] for problem in problems)
    kinds = ChecksumStore(p)
    bad.extend(chunk_read_problems(p, [n for n in arrays if kinds._kind(n) is not None]))
    return list(dict.fromkeys(bad))


def _checked_open(path: Path, read: bool | int = False,
                  ) -> tuple[Any, dict[str, Any], np.ndarray, dict[int, list[str]], dict[str, Any]]:
    """Open read-only and run the cheap checks: (group, arrays, complete, damaged slots, manifest by key)."""
    group, arrays, problems = _open_checked(path)
    _raise_structure(path, problems)
    try:
        # read chunk by chunk where one is corrupt: a damaged flag or manifest costs its sample, not the store
        complete = complete_flags(arrays)
        texts = manifest_texts(arrays, complete)
        damaged = sample_problems(path, arrays, read=read, complete=complete, texts=texts)
        listed: dict[str, Any] = {}
        for slot, text in texts.items():
            if slot not in damaged:
                listed.update(json.loads(str(text)))
    except ChunkChecksumError:
        raise
    except Exception as e:
        raise StoreError(f"cannot read {str(path)!r}: {_first_line(e)}") from None
    return group, arrays, complete, damaged, listed


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
        Complete samples only unless asked otherwise; data variables in :data:`VARIABLE_ORDER`;
        ``channel`` (``R``, ``G``, ``B``) labels the image's last axis. ``attrs`` hold the
        provenance, among them ``lora``/``lora_scale`` (the LoRA active where gamma != 1) and
        ``planned_samples`` (slots planned up front by ``record``/``sweep``; None for a store grown
        sample by sample with :func:`taca_probe.probe`).

    Raises
    ------
    StoreError
        For a damaged store: an array, or a complete sample's chunk missing, moved or resized
        (checked here); reading a chunk that is not the one recorded (changed, swapped) raises
        :class:`ChunkChecksumError` naming it, while the other chunks still read.
    """
    p = store_path(path, "open_run")
    # presence and sizes only: opening stays cheap, the digests are checked as chunks are read
    _, _, complete, damaged, listed = _checked_open(p)
    if damaged:
        slots = sorted(damaged)
        raise StoreError(f"{str(p)!r}: {len(slots)} complete sample(s) are damaged (slot(s) "
                         f"{', '.join(map(str, slots[:10]))}{'...' if len(slots) > 10 else ''}; first: "
                         f"{damaged[slots[0]][0]}); `taca-probe record ... --resume` records them again")
    try:
        ds = xr.open_zarr(ChecksumStore(p, manifest=listed), consolidated=False, zarr_format=3,
                          chunks=None if chunks is None else {})
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"cannot read {str(path)!r}: {_first_line(e)}") from None
    ds = ds.drop_vars(BOOKKEEPING, errors="ignore")
    if not include_incomplete:
        ds = ds.isel(sample=np.flatnonzero(complete))
    # zarr lists arrays in no fixed order; a stable order keeps printouts and tests comparable
    names = [v for v in VARIABLE_ORDER if v in ds.data_vars] + sorted(set(ds.data_vars) - set(VARIABLE_ORDER))
    coords = [c for c in COORD_ORDER if c in ds.coords] + sorted(c for c in ds.coords if c not in COORD_ORDER)
    data = xr.Dataset({v: ds[v].variable for v in names})
    if chunks is not None and chunks != {}:  # "auto" or sizes: the numeric data only, dask cannot size strings
        try:
            data = data.chunk(chunks)
        except (TypeError, ValueError, ZeroDivisionError) as e:  # xarray/dask's, from deep inside
            raise TacaProbeError(f"open_run: bad chunks {chunks!r} ({_first_line(e)}); give None, {{}}, 'auto' or a "
                                 f"dict of positive sizes by dimension: {dict(data.sizes)}") from None
    # without the on-disk encoding (shards, checksum codecs), which ds.to_zarr() would otherwise reuse
    return xr.Dataset(data.variables, coords={c: ds.coords[c].variable for c in coords},
                      attrs={k: v for k, v in ds.attrs.items() if k not in ("layout", _MANIFEST_ATTR)}).drop_encoding()


#: The order of a run's data variables and coordinates in :func:`open_run`.
VARIABLE_ORDER = ("vis_txt_mass", "vis_txt_mass_ref", "txt_vis_mass", "token_mass", "maps", "image")
COORD_ORDER = ("sample", "prompt", "seed", "batch_index", "branch", "step", "timestep", "sigma", "gamma", "layer",
               "block_type", "head", "token", "token_source", "token_text", "token_is_padding", "y", "x", "channel")


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """Schema, sizes and provenance of a store, for ``taca-probe info``.

    ``samples_damaged`` lists complete samples whose chunks are missing, moved or swapped (presence,
    sizes, and digests of files up to 64 KiB; :func:`verify_store` compares every digest).
    """
    p = store_path(path, "store_info")
    group, arrays_by_name, complete, damaged, _ = _checked_open(p, read=INFO_READ_LIMIT)
    # zarr writes each file as NAME.<uuid>.partial and renames it: one left over is a killed process's
    # unfinished write, no data of the store, so it is listed apart and not counted in the sizes
    unfinished = sorted(str(f.relative_to(p)) for f in p.rglob("*.partial") if f.is_file())
    arrays = {name: {"dims": list(arr.metadata.dimension_names or []), "shape": list(arr.shape),
                     "dtype": str(arr.dtype), "chunks": list(arr.chunks),
                     "stored_bytes": sum(f.stat().st_size for f in (p / name).rglob("*")
                                         if f.is_file() and not f.name.endswith(".partial"))}
              for name, arr in sorted(arrays_by_name.items())}
    attrs = {k: v for k, v in group.attrs.items() if k != "layout"}
    return {"path": str(path), "schema": attrs.get(_SCHEMA_ATTR),
            "samples_complete": int(complete.sum()) - len(damaged), "samples_incomplete": int((~complete).sum()),
            "samples_damaged": {int(k): v for k, v in sorted(damaged.items())},
            "integrity": "chunk manifests" if MANIFEST in arrays_by_name
            else "checksums only (recorded before manifests)",
            "stored_bytes": sum(a["stored_bytes"] for a in arrays.values()), "unfinished_writes": unfinished,
            "arrays": arrays, "attrs": attrs}


def check_removable(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists; a :class:`StoreError` where ``--overwrite`` may not delete it (a link, not a
    store): the CLI asks before a model loads."""
    p = Path(path)
    if p.is_symlink():  # rmtree refuses one with an OSError; deleting what it points to was not asked for
        raise StoreError(f"refusing to overwrite {str(p)!r}: it is a symbolic link (to {os.readlink(p)!r}); "
                         "give the store's own path, or remove the link")
    if p.exists() and not is_store(p):
        raise StoreError(f"refusing to overwrite {str(p)!r}: it is not a taca-probe store")
    return p.exists()


def set_aside(path: str | os.PathLike) -> Path | None:
    """``--overwrite``: rename a store to a hidden name beside it (None: there is none), so that it can be put back
    if its replacement records nothing; one a killed process left blocks a new store there (:meth:`RunWriter.create`)."""
    if not check_removable(path):
        return None
    p = Path(path)
    aside = p.parent / f"{_ASIDE_PREFIX}{p.name}.{socket.gethostname()}.{os.getpid()}"
    os.rename(p, aside)
    return aside


def remove_store(path: str | os.PathLike) -> None:
    """Delete a store folder (``--overwrite``); refuses folders that are not taca-probe stores."""
    if check_removable(path):
        shutil.rmtree(path)
