"""Gamma sweeps: one store per schedule over the same prompts and seeds, opened as one Dataset.

:func:`run_sweep` records a sweep folder (``sweep.json`` manifest, ``stores/``, ``images/``; see the
README); :func:`open_sweep` concatenates its stores along a ``schedule`` dimension with ``gamma0`` and
``t_thresh`` coordinates. No zarr here: it goes through :mod:`taca_probe.runner` and :func:`open_run`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pandas as pd
import xarray as xr
from PIL import Image

from . import __version__
from .distributed import ranks_from_env
from .errors import ModelError, TacaProbeError
from .logs import quiet
from .models import call_settings, load_pipeline, model_call_defaults
from .models import model_name as loaded_name
from .runner import Target, call_as_run, record_plan
from .schedules import parse
from .selection import MAX_INT, MapSelection, is_seed
from .stats import sample_keys
from .store import is_store, open_run, set_aside

__all__ = ["SweepError", "MANIFEST", "SWEEP_FORMAT", "DEFAULT_GAMMA0", "DEFAULT_T_THRESH", "sweep_schedules",
           "run_sweep", "open_sweep", "read_manifest", "is_sweep", "sample_plan", "schedule_slug"]

#: The manifest's file name inside a sweep folder.
MANIFEST = "sweep.json"
#: Version of the manifest format.
SWEEP_FORMAT = 1
#: The default grid: the paper's ablation range and a larger value.
DEFAULT_GAMMA0: tuple[float, ...] = (1.0, 1.1, 1.2, 1.3, 1.5)
#: The paper's threshold timestep.
DEFAULT_T_THRESH: tuple[float, ...] = (970.0,)


class SweepError(TacaProbeError):
    """A sweep folder that is missing, inconsistent, or resumed with different settings."""


def sweep_schedules(*, gamma0: Sequence[float] = DEFAULT_GAMMA0, t_thresh: Sequence[float] = DEFAULT_T_THRESH,
                    extra: Sequence[str] = ()) -> list[str]:
    """Canonical schedule specs of a grid: ``step:G@T`` for every (T, G), then ``extra``.

    Identity schedules (``gamma0 = 1``, ``none``) become one ``none``, listed first; duplicates are
    dropped; every spec is validated.

    >>> sweep_schedules(gamma0=[1.0, 1.2], t_thresh=[970, 900])
    ['none', 'step:1.2@970', 'step:1.2@900']
    """
    specs = [parse(f"step:{g}@{t}").spec for t in t_thresh for g in gamma0] + [parse(s).spec for s in extra]
    out = list(dict.fromkeys("none" if parse(spec).is_identity else spec for spec in specs))
    out.sort(key=lambda spec: spec != "none")  # stable: "none" first, the rest in order
    if not out:
        raise SweepError("the sweep has no schedule: give gamma0 and t_thresh values or extra schedules")
    return out


def _schedule_coords(spec: str) -> tuple[float, float]:
    """(gamma0, t_thresh): ``step:G@T`` -> (G, T), ``const:G`` -> (G, 0), ``none`` -> (1, NaN), others NaN."""
    s = parse(spec)
    base = getattr(s, "base", s)
    kind = getattr(type(base), "kind", None)
    if s.is_identity:
        return 1.0, math.nan
    if kind in ("step", "const"):
        return float(base.gamma0), float(base.t_thresh) if kind == "step" else 0.0
    return math.nan, math.nan


def schedule_slug(spec: str) -> str:
    """A schedule spec as a file-name part (store and image folders of a sweep, eval image folders)."""
    # cut: a long spec (a table, layer globs) made a store name past the 255-byte file-name limit, and the
    # store is first built under a hidden name up to ~90 characters longer; the NN_ prefix keeps names apart
    return re.sub(r"[^A-Za-z0-9.@=-]+", "_", spec).strip("_")[:120].rstrip("_") or "schedule"


def is_sweep(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a sweep manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the sweep folder ``path``."""
    p = Path(path)
    f = p / MANIFEST
    if not p.exists():
        raise SweepError(f"no sweep at {str(p)!r}")
    if not f.is_file():
        raise SweepError(f"{str(p)!r} is not a sweep folder (no {MANIFEST}); record one with `taca-probe sweep`")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SweepError(f"cannot read {str(f)!r}: {str(e).splitlines()[0]}") from None
    version = doc.get("taca_probe_sweep") if isinstance(doc, dict) else None
    if not isinstance(version, int) or not 1 <= version <= SWEEP_FORMAT:
        raise SweepError(f"{str(f)!r} has sweep format {version!r}; this taca-probe reads 1..{SWEEP_FORMAT}")
    entries = doc.get("schedules")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("spec", "store", "images")) for e in entries):
        raise SweepError(f"{str(f)!r} is damaged: 'schedules' must be a list of entries with the strings 'spec', "
                         "'store' and 'images'; restore the file or record the sweep again elsewhere")
    return doc


def _write_manifest(folder: Path, doc: dict[str, Any]) -> None:
    doc["updated"] = _now()
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def sample_plan(prompts: Sequence[Any], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(prompt, seed) pairs, each once: each prompt is a string (every seed) or a (prompt, seeds) pair."""
    plan: dict[tuple[str, int], None] = {}  # ordered, and a repeat is found in O(1), not by a list scan
    for item in [prompts] if isinstance(prompts, str) else prompts:
        if isinstance(item, str):
            text, item_seeds = item, seeds
        else:
            try:
                text, item_seeds = item
            except (TypeError, ValueError):
                raise SweepError(f"bad prompt {item!r}: expected a string or a (prompt, seeds) pair") from None
            if isinstance(item_seeds, (int, np.integer)):
                item_seeds = [item_seeds]
        if not isinstance(text, str) or not text:
            raise SweepError("every prompt must be a non-empty string")
        bad = [s for s in item_seeds if not is_seed(s)]
        if bad:
            raise SweepError(f"seed {bad[0]!r} of prompt {text!r} is not an integer in 0..{MAX_INT}")
        plan.update(dict.fromkeys((text, int(s)) for s in item_seeds))
    if not plan:
        raise SweepError("no prompt given")
    return list(plan)


def _resume_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in ("model", "plan", "call", "maps", "branch", "lora", "lora_scale"):
        if _jsonable(old.get(key)) != _jsonable(new.get(key)):
            o, n = old.get(key), new.get(key)
            if key == "plan":
                same_size = len(o or []) == len(n)
                o, n = f"{len(o or [])} (prompt, seed) pairs", f"{len(n)} pairs" + (" (different)" if same_size else "")
            diffs.append(f"{key}: sweep has {o!r}, now {n!r}")
    old_specs = [s["spec"] for s in old.get("schedules", [])]
    new_specs = [s["spec"] for s in new["schedules"]]
    if old_specs != new_specs:
        diffs.append(f"schedules: sweep has {', '.join(old_specs)}; now {', '.join(new_specs)}")
    return diffs


def run_sweep(model: Any, out: str | os.PathLike, *, prompts: Sequence[Any], seeds: Sequence[int] = (0,),
              schedules: Sequence[str] | None = None, gamma0: Sequence[float] = DEFAULT_GAMMA0,
              t_thresh: Sequence[float] = DEFAULT_T_THRESH, maps: Any = None, branch: str = "cond",
              mode: str = "create", call: dict[str, Any] | None = None, device: str | None = None, dtype: Any = None,
              lora: str | os.PathLike | None = None, lora_scale: float = 1.0, model_name: str | None = None,
              progress: bool | Callable[[str], None] = True) -> Path:
    """Record every schedule of a sweep over the same prompts and seeds; returns the folder.

    Parameters
    ----------
    model
        An embedded model name, local diffusers folder or cached hub id (loaded with
        :func:`taca_probe.load_pipeline` on ``device``/``dtype``), or a loaded pipeline.
    out
        The sweep folder.
    prompts, seeds
        Each prompt is a string, sampled with every seed, or a ``(prompt, seeds)`` pair.
    schedules
        Schedule specs; default ``sweep_schedules(gamma0=gamma0, t_thresh=t_thresh)``.
    maps, branch, lora, lora_scale
        As for :func:`taca_probe.probe` (the same for every schedule).
    mode
        ``"create"`` refuses an existing non-empty folder; ``"resume"`` continues each schedule's
        store and refuses different settings; ``"overwrite"`` deletes a previous sweep in ``out``.
    call
        ``pipe(...)`` arguments over the model's recommended ones (``models.model_call_defaults``).
    model_name
        The model's name stored in the manifest (default: ``model`` if a string).
    progress
        A progress bar on stderr (``True``), none, or a callable taking one line per sample.
    """
    if mode not in ("create", "resume", "overwrite"):
        raise SweepError(f"unknown mode {mode!r}; choose from create, resume, overwrite")
    specs = sweep_schedules(gamma0=gamma0, t_thresh=t_thresh) if schedules is None else [parse(s).spec for s in schedules]
    if not specs:
        raise SweepError("the sweep has no schedule")
    if len(set(specs)) != len(specs):
        raise SweepError(f"schedule listed twice: {', '.join(sorted({s for s in specs if specs.count(s) > 1}))}")
    maps_sel = MapSelection.parse(maps)
    plan = sample_plan(prompts, seeds)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"{str(folder)!r} is a file; choose another folder for the sweep")
    main_rank = ranks_from_env().is_main  # rank 0 checks and lays out; the others follow
    # only rank 0 looks: the others may look while its --overwrite has deleted sweep.json, not yet rewritten it
    exists = main_rank and folder.exists() and any(folder.iterdir())
    if mode == "create" and exists:
        raise SweepError(f"{str(folder)!r} already exists; pass --resume (mode='resume') to complete it or --overwrite "
                         "(mode='overwrite') to replace it")
    if mode == "resume" and not is_sweep(folder):
        raise SweepError(f"--resume: no sweep at {str(folder)!r} (no {MANIFEST})")
    if mode == "overwrite" and exists and not is_sweep(folder):
        raise SweepError(f"refusing to overwrite {str(folder)!r}: it is not a sweep folder (no {MANIFEST})")

    if isinstance(model, (str, os.PathLike)):
        pipe = load_pipeline(model, device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)  # at most one bar, the sweep's; never one per sample
        name = str(model_name or model)
    else:
        pipe, name = model, str(model_name or loaded_name(model))
    for key in ("generator", "num_images_per_prompt", "output_type", "prompt"):
        if key in (call or {}):
            raise SweepError(f"call setting {key!r} is set by the sweep itself; leave it out")
    settings = call_settings(pipe, call, model=model)

    prompt_list = list(dict.fromkeys(p for p, _ in plan))
    entries = []
    for i, spec in enumerate(specs):
        g0, tt = (None if math.isnan(v) else v for v in _schedule_coords(spec))
        stem = f"{i:02d}_{schedule_slug(spec)}"
        entries.append({"spec": spec, "gamma0": g0, "t_thresh": tt, "store": f"stores/{stem}.zarr",
                        "images": f"images/{stem}", "samples_complete": 0})
    doc: dict[str, Any] = {
        "taca_probe_sweep": SWEEP_FORMAT, "model": name, "model_class": type(pipe.transformer).__name__,
        "plan": [[p, s] for p, s in plan], "prompts": prompt_list, "seeds": sorted({s for _, s in plan}),
        "call": _jsonable(settings), "maps": None if maps_sel is None else maps_sel.spec, "branch": branch,
        "lora": None if lora is None else str(lora), "lora_scale": float(lora_scale),
        "grid": None if schedules is not None else {"gamma0": [float(g) for g in gamma0],
                                                    "t_thresh": [float(t) for t in t_thresh]},
        "image_names": "p{prompt_index:02d}_seed{seed}.png",
        "schedules": entries, "status": "running", "created": _now(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "taca_probe_version": __version__,
    }
    if mode == "resume":
        old = read_manifest(folder)  # guidance or text length left to the pipeline is the same run as its default given
        diffs = _resume_diffs(*({**d, "call": call_as_run(pipe, d.get("call") or {})}
                                for d in (old, doc))) if main_rank else []
        if diffs:
            grow = any(d.startswith(("plan", "schedules")) for d in diffs)  # a sweep never grows in place
            raise SweepError(f"cannot resume {str(folder)!r} with different settings: " + "; ".join(diffs) + (
                "; to add prompts, seeds or schedules, record them into another sweep folder and open both together "
                f"(taca-probe figures {folder} NEW; taca_probe.open_sweep([{str(folder)!r}, NEW]))" if grow else ""))
        doc["created"] = old.get("created", doc["created"])
        for entry, before in zip(entries, old["schedules"]):  # the paths recorded (older versions cut no name)
            for key, kind in (("store", "store"), ("images", "image folder")):
                _inside(folder, before[key], kind)
                entry[key] = before[key]

    asides: list[tuple[Path, Path]] = []  # --overwrite: the old sweep's files, put back if nothing is recorded

    def prepare() -> None:  # rank 0, once every schedule is known to fit the model
        if mode == "overwrite" and is_sweep(folder):
            _set_aside_sweep_outputs(folder, read_manifest(folder), asides)
        folder.mkdir(parents=True, exist_ok=True)
        _write_manifest(folder, doc)

    def save_png(target: Target, prompt: str, seed: int, images: list) -> None:
        path = folder / by_store[target.store]["images"]
        path.mkdir(parents=True, exist_ok=True)
        images[0].save(path / _png_name(prompt_list.index(prompt), seed))

    by_store = {folder / e["store"]: e for e in entries}
    targets = [Target(e["spec"], folder / e["store"], label=e["spec"]) for e in entries]
    try:
        record_plan(pipe, targets, plan, settings, maps=maps_sel, branch=branch,
                    mode="resume" if mode == "resume" or not main_rank else "create", lora=lora, lora_scale=lora_scale,
                    model=name, attrs={"sweep": str(folder)}, prepare=prepare, on_sample=save_png,
                    progress=progress, desc="sweep")
    except BaseException:
        # nothing recorded: record_plan removed the new stores, so the old paths are free again
        if asides and ranks_from_env().world == 1 and not any(
                is_store(t.store) and open_run(t.store).sizes["sample"] for t in targets):
            for path, aside in reversed(asides):
                os.replace(aside, path)
            asides.clear()
        raise
    finally:
        for path, aside in asides:
            if aside.is_dir():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # an image folder with other files, or the new PNGs, stays
                if path.suffix == ".png":
                    aside.parent.rmdir()
    if not main_rank:
        return folder
    for entry in entries:
        images = folder / entry["images"]
        images.mkdir(parents=True, exist_ok=True)
        entry["samples_complete"] = _save_missing_pngs(open_run(folder / entry["store"]), images, prompt_list)
    doc["status"] = "complete"
    _write_manifest(folder, doc)
    return folder


_PNG = re.compile(r"p\d{2,}_seed\d+(_\d+)?\.png")


def _inside(folder: Path, relative: str, kind: str) -> Path:
    """``folder / relative``, refused unless it stays inside ``folder`` (no ``..``, absolute path or link out)."""
    if not relative:
        raise SweepError(f"{str(folder / MANIFEST)!r}: a schedule's {kind} path is {relative!r}; refusing to delete")
    path = folder / relative
    if Path(relative).is_absolute() or ".." in Path(relative).parts or folder.resolve() not in path.resolve().parents:
        raise SweepError(f"{str(folder / MANIFEST)!r} names {kind} {relative!r} outside the sweep folder; "
                         "refusing to use it (fix or remove the manifest)")
    return path


def _set_aside_sweep_outputs(folder: Path, doc: dict[str, Any], asides: list[tuple[Path, Path]]) -> None:
    """``--overwrite``: move the manifest (a copy: the folder stays a sweep), stores and PNGs this tool made in
    ``folder`` to hidden names beside them, nothing else; every path is checked before anything moves."""
    targets = []
    for entry in doc["schedules"]:
        store, images = _inside(folder, entry["store"], "store"), _inside(folder, entry["images"], "image folder")
        if store.exists() and not is_store(store):
            raise SweepError(f"refusing to overwrite {str(store)!r}: the manifest names it but it is not a taca-probe store")
        if images.exists() and not images.is_dir():
            raise SweepError(f"refusing to overwrite {str(images)!r}: the manifest names it as an image folder")
        targets.append((store, images))
    hidden = folder / f".{MANIFEST}.{os.getpid()}.replaced"
    shutil.copyfile(folder / MANIFEST, hidden)
    asides.append((folder / MANIFEST, hidden))
    for store, images in targets:
        if aside := set_aside(store):
            asides.append((store, aside))
        for png in sorted(images.iterdir()) if images.is_dir() else []:
            if png.is_file() and _PNG.fullmatch(png.name):
                os.rename(png, aside := png.with_name(f".{png.name}.{os.getpid()}.replaced"))
                asides.append((png, aside))


def _png_name(prompt_index: int, seed: int, batch_index: int = 0) -> str:
    return f"p{prompt_index:02d}_seed{seed}" + (f"_{batch_index}" if batch_index else "") + ".png"


def _save_missing_pngs(ds: Any, images: Path, prompt_list: list[str]) -> int:
    """Write the PNG of every complete sample that has none yet (e.g. after a resume); returns the count."""
    keys = sample_keys(ds)
    for i, (p, s, b) in enumerate(keys):
        path = images / _png_name(prompt_list.index(p) if p in prompt_list else len(prompt_list) + i, s, b)
        if not path.exists():
            Image.fromarray(np.asarray(ds["image"].isel(sample=i).values, dtype=np.uint8)).save(path)
    return len(keys)


def _recorded(ds: xr.Dataset, key: str) -> Any:
    """A store's attribute ``key``; a ``guidance`` of None (stores before f45725e held None for the
    default) as the default it stood for, resolved as :func:`~taca_probe.runner.record_plan` does."""
    value = ds.attrs.get(key)
    if key != "guidance" or value is not None:
        return value
    with quiet():  # diffusers' pipelines import: torchvision fallbacks of image processors no store uses
        pipeline, model = getattr(diffusers, str(ds.attrs.get("pipeline_class", "")), None), ds.attrs.get("model")
    with contextlib.suppress(ModelError):  # defaults no longer readable: compared as stored
        if pipeline is not None and model:
            return call_as_run(pipeline, model_call_defaults(str(model)))["guidance_scale"]
    return value


def open_sweep(source: str | os.PathLike | Sequence[str | os.PathLike], *, chunks: Any = None):
    """Open a sweep as one :class:`xarray.Dataset` with a ``schedule`` dimension.

    Parameters
    ----------
    source
        A sweep folder (from :func:`run_sweep` / ``taca-probe sweep``), or a list of run stores and/or
        sweep folders. Stores of one schedule (two sweeps over other seeds or prompts) are joined
        along ``sample``; a (prompt, seed, batch_index) found twice in one schedule is refused.
    chunks
        As for :func:`taca_probe.open_run` (``{}`` for dask arrays).

    Returns
    -------
    xarray.Dataset
        Every store variable with a leading ``schedule`` dimension (the specs), coordinates
        ``gamma0`` (for forms other than ``step``, ``const`` and ``none``, the largest gamma
        recorded) and ``t_thresh`` (NaN where none) along it, and ``gamma`` (schedule, sample,
        step, layer). Samples are those complete in every store, in plan order; the others are
        left out with a warning.
    """
    return join_schedules(*open_schedules(source, chunks=chunks))


def open_schedules(source: str | os.PathLike | Sequence[str | os.PathLike], *, chunks: Any = None):
    """``(label, call, {spec: (Dataset, gamma0, t_thresh, store paths)})``: each schedule of :func:`open_sweep`'s
    inputs with all its own complete samples (its stores joined along ``sample``), checked as open_sweep checks them."""
    one = isinstance(source, (str, os.PathLike))
    if not one and isinstance(source, Iterable) and not isinstance(source, bytes):
        source = list(source)  # a list, tuple or generator (Path.glob) of store paths
    if not one and not (isinstance(source, list) and source and all(isinstance(s, (str, os.PathLike)) for s in source)):
        raise SweepError("open_sweep needs a sweep folder or a non-empty list of store paths (str or os.PathLike), "
                         f"got {type(source).__name__}")
    items, docs = [], []
    for path in map(Path, [source] if one else source):  # a sweep folder stands for its stores
        if is_sweep(path):
            docs.append(doc := read_manifest(path))
            found = [(path / e["store"], e["spec"], e.get("gamma0"), e.get("t_thresh")) for e in doc["schedules"]]
            missing = [str(p) for p, *_ in found if not p.exists()]
            if missing:  # not recorded yet, or moved or deleted by hand
                what = f"missing (not recorded yet, or moved or deleted; first {missing[0]}): resume the sweep to " \
                       "record them, or put them back"
                if len(missing) == len(found):
                    raise SweepError(f"sweep {str(path)!r}: every schedule store is {what}")
                warnings.warn(f"sweep {str(path)!r}: {len(missing)} schedule store(s) {what}", stacklevel=3)
            items += [it for it in found if it[0].exists()]
        elif one and path.is_dir() and not (path / "zarr.json").exists():
            raise SweepError(f"{str(path)!r} is neither a sweep folder (no {MANIFEST}) nor a store")
        else:
            items.append((path, None, None, None))
    label = str(source) if one else ", ".join(map(str, source))
    rows = []
    for path, spec, g0, tt in items:
        ds = open_run(path, chunks=chunks)
        stored = str(ds.attrs.get("schedule", "none"))
        if spec is not None and parse(stored).spec != spec:  # a hand-edited manifest would relabel the data
            raise SweepError(f"{str(path)!r} holds schedule {stored!r}, but the sweep's manifest lists it as {spec!r}; "
                             f"fix {MANIFEST} or open the stores as a list")
        spec = spec or stored
        if g0 is None and tt is None:
            g0, tt = _schedule_coords(spec)
        g0, tt = (math.nan if v is None else float(v) for v in (g0, tt))
        if math.isnan(g0) and "gamma" in ds.variables and ds.sizes.get("sample", 0):
            g0 = float(np.nanmax(np.asarray(ds["gamma"].values)))
        rows.append((ds, spec, g0, tt, path.resolve()))
    dsets, specs, *_ = zip(*rows)
    ref = dsets[0]
    settings = [{k: _recorded(ds, k) for k in ("branch", "maps", "model", "guidance", "lora", "lora_scale")}
                for ds in dsets]
    for spec, ds, setting in zip(specs[1:], dsets[1:], settings[1:]):
        diffs = [f"{d} {ref.sizes.get(d)} vs {ds.sizes.get(d)}"
                 for d in ("step", "layer", "head", "token", "y", "x", "image_y", "image_x")
                 if ref.sizes.get(d) != ds.sizes.get(d)]
        if not diffs and list(map(str, ref["layer"].values)) != list(map(str, ds["layer"].values)):
            diffs.append("layer names differ")
        # else concat labels one branch's data as another's, or leaves NaN maps under no map selection;
        # and a sweep's schedules differ in the schedule alone, or its differences are not gamma's
        diffs += [f"{k} {v} vs {setting[k]}" for k, v in settings[0].items() if _jsonable(v) != _jsonable(setting[k])]
        if diffs:
            raise SweepError(f"{label}: the store of {spec!r} does not match the one of {specs[0]!r}: " + "; ".join(diffs))
    merged: dict[str, list] = {}  # stores of one schedule (a second sweep of more seeds) join along sample
    for ds, spec, *rest in rows:
        merged.setdefault(spec, []).append((ds, *rest))
    for spec, parts in merged.items():
        seen: dict[tuple, int] = {}
        for i, (ds, *_) in enumerate(parts):
            for key in sample_keys(ds):
                if seen.setdefault(key, i) != i:
                    raise SweepError(f"{label}: sample {key} of schedule {spec!r} is in two of the inputs; give "
                                     "each (prompt, seed) of a schedule once")
    schedules = {}
    for spec, ps in merged.items():
        ds = ps[0][0]
        if len(ps) > 1:  # numbered anew: each store numbers its own samples
            ds = xr.concat([p[0] for p in ps], dim="sample", data_vars="all", coords="minimal", compat="override",
                           join="override", combine_attrs="drop_conflicts")
            ds = ds.assign_coords(sample=np.arange(ds.sizes["sample"]))
        schedules[spec] = (ds, ps[0][1], ps[0][2], tuple(p[3] for p in ps))
    call = json.dumps(docs[0].get("call", {})) if docs and all(d.get("call") == docs[0].get("call") for d in docs) else None
    return label, call, schedules


def join_schedules(label: str, call: str | None, schedules: dict[str, tuple], *, of: str = "") -> xr.Dataset:
    """:func:`open_schedules`' schedules as one Dataset on the samples complete in all of them (open_sweep's);
    ``of`` names what the warning of the others concerns (e.g. " of Fig. 4")."""
    specs = list(schedules)
    dsets, g0s, tts, _ = zip(*schedules.values())
    keys = [sample_keys(ds) for ds in dsets]
    common = [k for k in keys[0] if all(k in set(other) for other in keys[1:])]
    left_out = sum(len(k) for k in keys) - len(common) * len(keys)
    if left_out:
        warnings.warn(f"{label}: {left_out} sample(s) not complete in every schedule's store were left out{of}; "
                      "resume the sweep to complete them", stacklevel=3)
    aligned = []
    for ds, k in zip(dsets, keys):
        index = {key: i for i, key in enumerate(k)}
        aligned.append(ds.isel(sample=[index[key] for key in common]).assign_coords(sample=np.arange(len(common))))
    coords = ["gamma"] if "gamma" in aligned[0].variables else "minimal"
    combined = xr.concat(aligned, dim=pd.Index(specs, name="schedule"), data_vars="all", coords=coords,
                         compat="override", join="override", combine_attrs="drop_conflicts")
    combined = combined.assign_coords(gamma0=("schedule", np.array(g0s, float)),
                                      t_thresh=("schedule", np.array(tts, float)))
    combined["gamma0"].attrs = {"long_name": "gamma0 (largest gamma of the schedule)"}
    combined["t_thresh"].attrs = {"long_name": "threshold timestep (gamma0 while t >= t_thresh)", "units": "timestep (0..1000)"}
    for key in ("schedule", "schedule_description", "command", "created", "sweep"):
        combined.attrs.pop(key, None)
    combined.attrs.update(schedules=list(specs), sweep=label)
    if call is not None:
        combined.attrs["sweep_call"] = call
    return combined
