"""Recording runs: :func:`probe` for Python, and :func:`record_plan`, the loop behind ``record``
and ``sweep`` (rank 0 lays out or checks and repairs each store, the ranks share the unfinished slots)."""

from __future__ import annotations

import contextlib
import datetime
import difflib
import inspect
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .attention import describe_stats_backend
from .capture import BRANCHES, Recorder, planned_steps
from .distributed import ranks_from_env
from .errors import TacaProbeError
from .intervention import TacaConfig, TacaHandle, apply_taca, reusable
from .models import model_call_defaults, model_name
from .schedules import Schedule, parse
from .selection import MAX_INT, MapSelection, is_seed, positive_int
from .store import UNKNOWN_SLOT, RunWriter, StoreError, is_store, read_attrs, remove_store, set_aside, \
    store_path

__all__ = ["probe", "Run", "Target", "record_plan", "run_settings", "check_resume"]

_MODES = ("create", "resume", "overwrite")
_RESUME_KEYS = ("model_class", "pipeline_class", "dtype", "schedule", "maps", "branch")
#: The pipeline arguments run.sample() passes itself -> what sets them.
_RESERVED_CALL_KEYS = {"generator": "from seed=", "output_type": "'np', to record the images",
                       "return_dict": "True, to read the images"}


class Run:
    """What :func:`probe` yields: :meth:`sample` generates, records and writes."""

    def __init__(self, pipe: Any, path: Path, handle: TacaHandle, recorder: Recorder, attrs: dict[str, Any]):
        self.pipe, self.path, self.handle, self.recorder, self.attrs = pipe, path, handle, recorder, attrs
        self.maps, self.sites = recorder.maps, handle.sites
        self.call_defaults = model_call_defaults(pipe)
        self._writer: RunWriter | None = None
        # the plain pipeline kwargs of the first sample written: a resumed store's own, else set by sample()
        stored = read_attrs(path).get("pipeline_kwargs") if is_store(path) else None
        self._first_kwargs: dict[str, Any] | None = {k: v for k, v in stored.items() if v is None or isinstance(
            v, (bool, int, float, str))} if isinstance(stored, dict) else None

    def __repr__(self) -> str:
        done = "" if self._writer is None else f", {sum(d for *_, d in self._writer.slots())} samples complete"
        return (f"<Run {'ended' if self.handle.removed else 'active'}: {str(self.path)!r}, schedule "
                f"{self.handle.schedule.spec!r}, branch {self.recorder.branch!r}, maps {self.attrs.get('maps')!r}{done}>")

    @property
    def writer(self) -> RunWriter | None:
        """The store's writer (None until the store exists), opened on first use (the record loop sets its own)."""
        if self._writer is None and self.path.exists():
            self._writer = RunWriter.reopen(self.path)
        return self._writer

    @writer.setter
    def writer(self, writer: RunWriter | None) -> None:
        self._writer = writer

    def sample(self, prompt: str, *, seed: int = 0, num_images_per_prompt: int = 1, slot: int | None = None,
               **pipe_kwargs: Any) -> list:
        """Generate from ``prompt`` with ``torch.Generator('cpu').manual_seed(seed)`` and record.

        Other keyword arguments go to the pipeline. Returns the PIL images, ``[]`` for a prompt and
        seed already complete in the store. ``slot`` writes into a planned slot (one image).
        """
        if not isinstance(prompt, str) or not prompt:
            raise TacaProbeError("prompt must be a non-empty string")
        if not is_seed(seed):
            raise TacaProbeError(f"seed must be an integer in 0..{MAX_INT}, got {seed!r}")
        positive_int(num_images_per_prompt, "num_images_per_prompt")
        # sample() passes these itself: the pipeline would raise a TypeError that prints its whole config
        if reserved := [k for k in _RESERVED_CALL_KEYS if k in pipe_kwargs]:
            key = reserved[0]
            raise TacaProbeError(f"run.sample sets {key} itself ({_RESERVED_CALL_KEYS[key]}); do not pass {key}=")
        # else the pipeline's TypeError, and on a later sample a 'setting other than the first sample's'
        params = inspect.signature(self.pipe.__call__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()) and (
                unknown := sorted(set(pipe_kwargs) - set(params))):
            close = difflib.get_close_matches(unknown[0], list(params), n=1, cutoff=0.6)
            raise TacaProbeError(f"{type(self.pipe).__name__} takes no argument {unknown[0]!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else
                                    f"; it takes {', '.join(k for k in params if k not in {*_RESERVED_CALL_KEYS, 'prompt'})}"))
        if self.handle.removed:  # the pipeline would run stock, and the recorder would see no call
            raise TacaProbeError(f"the probe() block of {str(self.path)!r} has ended; sample inside it, or open "
                                 "it again with probe(..., mode='resume')")
        dtype = str(self.handle.transformer.dtype).removeprefix("torch.")
        if dtype != self.attrs.get("dtype"):  # pipe.to(dtype) inside the block: the store's dtype would mislabel it
            raise TacaProbeError(f"the transformer's dtype changed from {self.attrs.get('dtype')} to {dtype} inside "
                                 "probe(); a store holds one dtype: record it into another store")
        call, recorded = self._resolve_call(pipe_kwargs)
        n, seed, writer = int(num_images_per_prompt), int(seed), self.writer
        if slot is not None:
            planned = writer.slot(slot) if writer is not None else None
            if n != 1 or planned is None or planned[:3] not in ((prompt, seed, 0), UNKNOWN_SLOT[:3]):
                raise StoreError(f"slot {slot} of {str(self.path)!r} is not planned for ({prompt!r}, seed {seed})")
            if planned[3]:
                return []
        elif writer is not None and all(writer.is_done((prompt, seed, b)) for b in range(n)):
            return []
        # the T5 encoder reads prompt_3 (SD3) / prompt_2 (FLUX) where given
        self.recorder.begin(prompt, n, call.get("max_sequence_length"),
                            call.get("prompt_3" if self.handle.family == "sd3" else "prompt_2"))
        self.handle.calls.clear()
        try:
            out = self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=n,
                            output_type="np", **call)
        except BaseException:
            self.recorder.cancel()
            raise
        sample = self.recorder.finish(out.images, seed)
        created = writer is None
        if created:
            writer = self._create(sample.layout, attrs=recorded)
        try:
            writer.write_sample(writer.place(prompt, seed, n) if slot is None else slot, sample)
        except BaseException:
            if created and not any(done for *_, done in writer.slots()):
                remove_store(self.path)  # a store with no finished sample is not left behind
                self.writer = None
            raise
        if self._first_kwargs is None:
            self._first_kwargs = recorded["pipeline_kwargs"]
        return [Image.fromarray(im) for im in sample.images]

    def _resolve_call(self, pipe_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's call defaults under ``pipe_kwargs``, and the store's ``pipeline_kwargs`` and
        ``guidance`` of that call (the first written sample's, unless the caller gave them). A setting
        other than the first written sample's is refused (texts, e.g. ``negative_prompt``, may differ)."""
        call = {**self.call_defaults, **pipe_kwargs}
        plain = {k: v for k, v in call.items() if v is None or isinstance(v, (bool, int, float, str))}
        first, defaults = self._first_kwargs, _call_defaults(self.pipe)

        def value(kwargs: dict[str, Any], k: str) -> Any:  # unset (absent or None): what pipe(...) runs at
            return defaults.get(k) if kwargs.get(k) is None else kwargs[k]

        if first is not None and (diffs := [f"{k}={value(plain, k)!r} (the first sample's: {value(first, k)!r})"
                                            for k in {**first, **plain} if value(plain, k) != value(first, k)
                                            and not isinstance(plain.get(k), str) and not isinstance(first.get(k), str)]):
            raise TacaProbeError(f"run.sample with other settings than this store's first sample: {'; '.join(diffs)}; "
                                 "a store holds one set of settings: record these into another store")
        return call, {"pipeline_kwargs": plain, "guidance": call_as_run(self.pipe, call)["guidance_scale"]}

    def create_planned(self, plan: Sequence[tuple[str, int]], call: dict[str, Any]) -> None:
        """Create the store with one slot per (prompt, seed) of ``plan``, none complete yet."""
        self._create(self.recorder.planned_layout(call), slots=[(p, int(s), 0) for p, s in plan])

    def _create(self, layout: Any, slots: list | None = None, attrs: dict[str, Any] | None = None) -> RunWriter:
        if self.maps is not None:
            self.maps.check(layout)  # before the store exists
        size = {"steps": layout.steps, "height": layout.image_shape[0], "width": layout.image_shape[1],
                "n_txt": layout.n_txt, "n_vis": layout.grid[0] * layout.grid[1], "latent_grid": list(layout.grid)}
        self.writer = RunWriter.create(self.path, layout, {**(attrs or {}), **self.attrs, **size}, slots=slots)
        return self.writer


@reusable
def probe(pipe: Any, path: str | os.PathLike, *, schedule: Schedule | str = "none",
          maps: MapSelection | str | None = None, branch: str = "cond", mode: str = "create",
          lora: str | os.PathLike | None = None, lora_scale: float = 1.0, attrs: dict[str, Any] | None = None,
          model: str | None = None) -> Iterator[Run]:
    """Record cross-modal attention into a zarr store while ``pipe`` samples; yields a :class:`Run`.

    The object may be entered again: each ``with`` opens ``path`` afresh under ``mode`` (so
    ``"create"`` then refuses the store the first block made) and yields a new :class:`Run`.

    Parameters
    ----------
    pipe
        A ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or compatible).
    path
        Store folder (created on the first finished sample).
    schedule
        TACA schedule applied while recording (``"none"``: the stock model).
    maps
        Map selection (:class:`~taca_probe.selection.MapSelection` or its string form), or None.
    branch
        ``"cond"``, ``"uncond"`` or ``"both"`` (adds a ``branch`` dimension).
    mode
        ``"create"`` refuses an existing path; ``"resume"`` appends, skipping complete samples;
        ``"overwrite"`` replaces it.
    lora, lora_scale
        As for :func:`taca_probe.taca`.
    attrs
        Extra provenance attributes.
    model
        The model's name as given (default: the pipeline's ``name_or_path``); compared on resume.
    """
    if branch not in BRANCHES:
        raise TacaProbeError(f"unknown branch {branch!r}; choose from {', '.join(BRANCHES)}")
    if mode not in _MODES:
        raise TacaProbeError(f"unknown mode {mode!r}; choose from {', '.join(_MODES)}")
    schedule, maps, p = parse(schedule), MapSelection.parse(maps), store_path(path, "probe")
    try:  # zarr writes attrs as JSON when the first sample is done: refuse what it cannot hold before sampling
        if attrs is not None and not (isinstance(attrs, dict) and all(isinstance(k, str) for k in attrs)):
            raise TypeError(f"got {type(attrs).__name__} {list(attrs)[:5] if isinstance(attrs, dict) else ''}")
        json.dumps(attrs)
    except (TypeError, ValueError) as e:
        raise TacaProbeError(f"attrs must be a dict of str keys to JSON values (str, number, bool, None, list, "
                             f"dict): {e}") from None
    if mode == "create" and p.exists():
        raise StoreError(f"{str(p)!r} already exists; pass --resume (mode='resume') to complete it or --overwrite "
                         "(mode='overwrite') to replace it")
    if p.exists() and not is_store(p):
        raise StoreError(f"{str(p)!r} exists and is not a taca-probe store; choose another path")
    handle = apply_taca(pipe, TacaConfig(schedule=schedule, lora=lora, lora_scale=lora_scale))
    with contextlib.ExitStack() as cleanup:  # on exit: the recorder's listener, then TACA, removed
        cleanup.callback(handle.remove)
        settings = run_settings(pipe, schedule=schedule, maps=maps, branch=branch, model=model)
        if clash := sorted(set(attrs or {}) & {*settings, "lora", "lora_scale"}):  # the store would mislabel itself
            raise TacaProbeError(f"attrs cannot set {', '.join(clash)}: probe() records them from its own arguments")
        if mode == "resume" and p.exists():
            check_resume(p, settings)
        if mode == "overwrite":
            remove_store(p)
        # where the transformer runs: with model offload it sits on the CPU until its forward call
        device = getattr(pipe, "_execution_device", handle.transformer.device)
        base_attrs = {
            **settings, "lora": None if lora is None else str(lora), "lora_scale": float(lora_scale),
            "planned_samples": None,  # a store planned up front (record, sweep) holds its slot count
            "taca_probe_version": __version__, "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__, "schedule_description": schedule.describe(),
            "device": str(device),
            "stats_backend": describe_stats_backend(device, handle.transformer.dtype),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(attrs or {})}
        recorder = Recorder(pipe, handle, maps=maps, branch=branch)
        cleanup.callback(recorder.close)
        yield Run(pipe, p, handle, recorder, base_attrs)


def _call_defaults(pipe: Any) -> dict[str, Any]:
    """The keyword defaults of ``pipe.__call__`` (a keyword without one is absent)."""
    return {k: p.default for k, p in inspect.signature(pipe.__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def call_as_run(pipe: Any, call: dict[str, Any]) -> dict[str, Any]:
    """``call`` with ``guidance_scale`` and ``max_sequence_length`` as ``pipe(**call)`` runs at them: ``call``'s,
    else (absent or None) the ``__call__`` default (None: none). Left unset, each is the same run as its
    default given, and a resume compares it so."""
    defaults = _call_defaults(pipe)
    return {**call, **{k: defaults.get(k) if call.get(k) is None else call[k]
                       for k in ("guidance_scale", "max_sequence_length")}}


def run_settings(pipe: Any, *, schedule: Schedule, maps: MapSelection | None, branch: str,
                 model: str | None = None) -> dict[str, Any]:
    """The settings a resumed run must share with its store."""
    transformer = pipe.transformer
    return {"model": str(model or model_name(pipe) or getattr(transformer.config, "_name_or_path", "")),
            "model_class": type(transformer).__name__, "pipeline_class": type(pipe).__name__,
            "dtype": str(transformer.dtype).removeprefix("torch."), "schedule": schedule.spec,
            "maps": None if maps is None else maps.spec,
            "map_selection": None if maps is None else maps.to_attrs(), "branch": branch}


def check_resume(path: str | os.PathLike, settings: dict[str, Any], extra: dict[str, Any] | None = None,
                 unset: dict[str, Any] | None = None) -> None:
    """Refuse to resume ``path`` with different settings, listing every difference. ``unset``: the
    value a stored None stands for (older stores held ``guidance`` None for the pipeline's default; a store
    recorded without ``max_sequence_length`` holds none)."""
    stored = read_attrs(path)
    if isinstance(stored.get("pipeline_kwargs"), dict):  # not an attribute of its own
        stored.setdefault("max_sequence_length", stored["pipeline_kwargs"].get("max_sequence_length"))
    stored.update({k: v for k, v in (unset or {}).items() if k in stored and stored[k] is None})
    want = {k: settings.get(k) for k in _RESUME_KEYS}
    if settings.get("model"):
        want["model"] = settings["model"]
    want.update(extra or {})

    def shown(v: Any) -> str:  # None: a setting left to the pipeline
        return "unset (the pipeline's default)" if v is None else repr(v)

    diffs = [f"{k}: store has {shown(stored.get(k))}, now {shown(v)}" for k, v in want.items()
             if k in stored and stored.get(k) != v]
    if diffs:
        raise StoreError(f"cannot resume {str(path)!r} with different settings: " + "; ".join(diffs))


@dataclass(frozen=True)
class Target:
    """One store of a job and the schedule it is recorded with."""

    schedule: str
    store: Path
    label: str = ""  # how progress lines and messages name it (default: the store path)


def record_plan(pipe: Any, targets: Sequence[Target], plan: Sequence[tuple[str, int]], call: dict[str, Any], *,
                maps: MapSelection | None = None, branch: str = "cond", mode: str = "create",
                lora: str | os.PathLike | None = None, lora_scale: float = 1.0, model: str | None = None,
                attrs: dict[str, Any] | None = None,
                prepare: Callable[[], None] | None = None,
                on_sample: Callable[[Target, str, int, list], None] | None = None,
                progress: bool | Callable[[str], None] = True, desc: str = "samples") -> list[int]:
    """Record every (prompt, seed) of ``plan`` into every target store; returns, per target, the
    number of samples not complete when it started (recorded now, by all ranks).

    Rank 0 checks every target against this model before any store is touched, then creates each
    missing store with one slot per planned sample, or checks an existing one against the settings
    and the plan and marks its damaged samples for re-recording (``mode="resume"``). After a
    barrier every rank records its share of the unfinished slots. ``prepare`` runs on rank 0
    before any store is written; ``on_sample(target, prompt, seed, images)`` after each sample.
    """
    ranks = ranks_from_env()  # torchrun / accelerate launch: several processes share the slots
    defaults = model_call_defaults(pipe)  # under call in run.sample
    ran, unset = call_as_run(pipe, {**defaults, **call}), call_as_run(pipe, defaults)  # unset: a stored None's value
    guidance = ran["guidance_scale"]
    as_unset = {"guidance": unset["guidance_scale"], "max_sequence_length": unset["max_sequence_length"]}
    common = dict(maps=maps, branch=branch, lora=lora, lora_scale=lora_scale, model=model,
                  attrs={**(attrs or {}), "guidance": guidance, "pipeline_kwargs": call})
    extra = {"steps": planned_steps(pipe, call["num_inference_steps"]), "height": call["height"],
             "width": call["width"], "guidance": guidance,
             "max_sequence_length": ran["max_sequence_length"],
             "lora": None if lora is None else str(lora), "lora_scale": float(lora_scale)}
    created: list[Path] = []
    asides: dict[Path, Path] = {}  # --overwrite: each replaced store, put back if the run records nothing
    writers: dict[Path, RunWriter | None] = {}
    recorded = [0] * len(targets)
    report = _progress(False, 0, desc, 0)
    try:
        if ranks.is_main:
            for t in targets:  # nothing is written until every target is known to fit this model
                with probe(pipe, t.store.parent / ".unused", schedule=t.schedule, mode="create", **common) as run:
                    if maps is not None:
                        maps.check(run.recorder.planned_layout(call))
            if prepare is not None:
                prepare()
            for t in targets:
                if mode == "overwrite" and (aside := set_aside(t.store)):
                    asides[t.store] = aside
                if t.store.exists() and mode == "resume":
                    check_resume(t.store, run_settings(pipe, schedule=parse(t.schedule), maps=maps, branch=branch,
                                                       model=model), extra, as_unset)
                    with probe(pipe, t.store, schedule=t.schedule, mode="resume", **common) as run:
                        damaged = run.writer.damaged_slots()  # their keys may be unreadable: any planned one
                        _check_plan(t.store, [UNKNOWN_SLOT[:3] if i in damaged else s[:3]
                                              for i, s in enumerate(run.writer.slots())], plan)  # before any write
                        _repair(t, run.writer, damaged, plan)
                else:  # refuses an existing store
                    with probe(pipe, t.store, schedule=t.schedule, mode="create", **common) as run:
                        run.create_planned(plan, call)
                    created.append(t.store)
                writers[t.store] = run.writer  # it knows which damaged samples are to be recorded again
        ranks.barrier()
        todo = []
        for i, t in enumerate(targets):
            if writers.get(t.store) is None:  # other ranks open the stores rank 0 laid out
                writers[t.store] = RunWriter.reopen(t.store)
            slots = writers[t.store].slots()
            todo += [(i, slot) for slot, (*_, done) in enumerate(slots) if not done]
            recorded[i] = sum(1 for *_, done in slots if not done)
        mine = ranks.share(todo)
        report = _progress(progress, len(mine), desc if ranks.world == 1 else f"rank {ranks.rank}", ranks.rank)
        with contextlib.ExitStack() as stack:
            current, run = None, None
            for i, slot in mine:
                if i != current:  # one probe per target, in order
                    stack.close()
                    run = stack.enter_context(probe(pipe, targets[i].store, schedule=targets[i].schedule,
                                                    mode="resume", **common))
                    run.writer = writers[targets[i].store]
                    current = i
                prompt, seed = plan[slot]
                report(f"{targets[i].label + ': ' if targets[i].label else ''}seed {seed}: "
                       + textwrap.shorten(" ".join(prompt.split()), 40, placeholder=" …"))
                images = run.sample(prompt, seed=seed, slot=slot, **call)
                if images and on_sample is not None:
                    on_sample(targets[i], prompt, seed, images)
        ranks.barrier()  # every rank's samples are in the stores before rank 0 reads them
    except BaseException:
        report(None, done=False)  # the sample under way did not finish: the bar must not count it
        # A store this run created in which nothing finished would only block the rerun.
        if ranks.world == 1:
            for path in created:
                if path.exists() and not any(done for *_, done in RunWriter.reopen(path).slots()):
                    remove_store(path)
            for path in [p for p in asides if not p.exists()]:
                os.rename(asides.pop(path), path)
        raise
    finally:
        report(None)
        for aside in asides.values():
            shutil.rmtree(aside, ignore_errors=True)
        ranks.close()
    return recorded


def _repair(target: Target, writer: RunWriter, damaged: dict[int, list[str]],
            plan: Sequence[tuple[str, int]]) -> None:
    """Mark complete samples whose chunks are missing, moved or damaged for re-recording as ``plan`` has them."""
    if damaged:
        listed = "; ".join(f"sample {slot}: {problems[0]}" for slot, problems in sorted(damaged.items())[:5])
        more = f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else ""
        print(f"taca-probe: repairing {len(damaged)} damaged sample(s) of {str(target.store)!r}: {listed}{more}",
              file=sys.stderr)
        writer.mark_for_repair({slot: (plan[slot][0], int(plan[slot][1]), 0) for slot in sorted(damaged)})


def _check_plan(path: Path, slots: list[tuple[str, int, int]], plan: Sequence[tuple[str, int]]) -> None:
    """Refuse a resumed store that does not hold exactly this plan's samples, in order, naming what differs."""
    planned = [(p, int(s), 0) for p, s in plan]
    if len(slots) == len(planned) and all(a in (b, UNKNOWN_SLOT[:3]) for a, b in zip(slots, planned)):
        return
    known = [a for a in slots if a != UNKNOWN_SLOT[:3]]

    def short(values: list) -> str:
        return f"{len(values)} [" + ",".join(map(str, values[:8])) + (",..." if len(values) > 8 else "") + "]"

    def first_difference(then: list, now: list) -> tuple[int, Any, Any]:
        i = next((i for i, (a, b) in enumerate(zip(then, now)) if a != b), min(len(then), len(now)))
        return i, then[i] if i < len(then) else None, now[i] if i < len(now) else None

    diffs = []
    seeds_then, seeds_now = list(dict.fromkeys(s for _, s, _ in known)), list(dict.fromkeys(s for _, s in plan))
    if seeds_then != seeds_now:
        diffs.append(f"--seeds: store has {short(seeds_then)}, now {short(seeds_now)}")
    prompts_then, prompts_now = list(dict.fromkeys(p for p, _, _ in known)), list(dict.fromkeys(p for p, _ in plan))
    if prompts_then != prompts_now:
        first, a, b = first_difference(prompts_then, prompts_now)
        diffs.append(f"prompts: store has {len(prompts_then)}, now {len(prompts_now)}; prompt {first}: "
                     f"store {a!r}, now {b!r}")
    if not diffs:
        diff, a, b = first_difference(slots, planned)
        diffs.append(f"order: sample {diff} is {a and a[:2]} in the store, {b and b[:2]} now")
    raise StoreError(f"cannot resume {str(path)!r} with different samples: " + "; ".join(diffs))


def _progress(progress: bool | Callable[[str], None], total: int, desc: str, position: int) -> Callable[[str | None], None]:
    """One line per sample to a callable, a tqdm bar on stderr, or nothing; called with None at the end."""
    if callable(progress):
        return lambda line, done=True: progress(line) if line is not None else None
    bar = tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, position=position, disable=not progress)
    started = [False]

    def report(line: str | None, done: bool = True) -> None:
        if started[0] and done:
            bar.update(1)  # the previous sample is done
        started[0] = line is not None
        if line is None:
            bar.close()
        else:
            bar.set_postfix_str(line)

    return report
