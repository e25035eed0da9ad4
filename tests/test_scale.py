"""Scaling out: several processes (torchrun, gloo on CPU) fill one store; checksums catch damage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from taca_probe.store import ChunkChecksumError, open_run, store_info, verify_store

pytestmark = pytest.mark.slow  # multi-process and large-run recordings

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"a shape number {i}" for i in range(5)]
# Attributes that name the process that wrote them; everything else must match.
VOLATILE = ("command", "created", "device")


def _record_argv(store: Path, prompts_file: Path, steps: int = 3) -> list[str]:
    return ["-m", "taca_probe", "record", "--model", "tiny-flux", "--prompts", str(prompts_file), "--seeds", "0,1",
            "--steps", str(steps), "--height", "64", "--width", "64", "--schedule", "first:1.3@1",
            "--maps", "steps=0", "--out", str(store)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _assert_same_store(a: Path, b: Path) -> None:
    da, db = open_run(a), open_run(b)
    for k in VOLATILE:
        da.attrs.pop(k, None)
        db.attrs.pop(k, None)
    xr.testing.assert_identical(da.load(), db.load())


def test_torchrun_two_processes_equal_one_process(tmp_path, prompts_file):
    single, multi = tmp_path / "single.zarr", tmp_path / "multi.zarr"
    r1 = subprocess.run([sys.executable, *_record_argv(single, prompts_file)], env=_env(),
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*_torchrun(2), *_record_argv(multi, prompts_file)], env=_env(),
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "recorded now by 2 process(es)" in r2.stdout
    _assert_same_store(single, multi)
    info = store_info(multi)
    # every array with a sample axis is chunked one sample a chunk: no two ranks share a chunk
    for name, a in info["arrays"].items():
        if a["dims"] and a["dims"][0] == "sample":
            assert a["chunks"][0] == 1, name


def test_killed_rank_then_resume_with_another_process_count(tmp_path, prompts_file):
    store = tmp_path / "k.zarr"
    argv = [*_torchrun(2), *_record_argv(store, prompts_file, steps=12)]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, done = time.time() + 300, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if (store / "complete").exists():
                try:
                    import zarr

                    done = int(np.asarray(zarr.open_array(str(store / "complete"), mode="r")[:]).sum())
                except Exception:
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a rank could be killed"
        # kill one worker (a child of the launcher); the launcher then stops the other
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert workers, "no worker processes found"
        os.kill(int(workers[0]), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    before = open_run(store)
    n_before = before.sizes["sample"]
    assert 2 <= n_before < 10
    kept = {(str(p), int(s)): before["vis_txt_mass"].values[i].copy()
            for i, (p, s) in enumerate(zip(before["prompt"].values, before["seed"].values))}
    # resume with ONE process
    rerun = subprocess.run([sys.executable, *_record_argv(store, prompts_file, steps=12), "--resume"], env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ds = open_run(store)
    pairs = [(str(p), int(s)) for p, s in zip(ds["prompt"].values, ds["seed"].values)]
    assert pairs == [(p, s) for p in PROMPTS for s in (0, 1)]  # none lost, none duplicated
    for i, key in enumerate(pairs):
        if key in kept:
            np.testing.assert_array_equal(ds["vis_txt_mass"].values[i], kept[key])
    assert store_info(store)["samples_incomplete"] == 0


def test_a_corrupted_chunk_is_named_on_read(tmp_path, prompts_file):
    from taca_probe.cli import main

    store = tmp_path / "c.zarr"
    assert main(_record_argv(store, prompts_file)[2:]) == 0
    assert verify_store(store) == []
    victim = store / "vis_txt_mass" / "c" / "3" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    ds = open_run(store)
    ds["vis_txt_mass"].isel(sample=2).values  # other chunks still read
    with pytest.raises(ChunkChecksumError, match=r"corrupted chunk 'vis_txt_mass/c/3/0/0/0'"):
        ds["vis_txt_mass"].isel(sample=3).values
    assert verify_store(store) == ["vis_txt_mass/c/3/0/0/0"]
    # a shard of maps: the inner chunk is named too
    shard = next(p for p in (store / "maps").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    key = str(shard.relative_to(store))
    with pytest.raises(ChunkChecksumError, match="corrupted chunk 'maps/c/"):
        open_run(store)["maps"].values
    assert any(k.startswith(key) for k in verify_store(store))


def test_store_size_per_sample_matches_the_chunk_layout(tmp_path, prompts_file):
    from taca_probe.cli import main
    from taca_probe.store import RunWriter

    store = tmp_path / "size.zarr"
    argv = _record_argv(store, prompts_file)[2:]
    argv[argv.index("--maps") + 1] = "steps=0;tokens=prompt"
    assert main(argv) == 0
    layout = RunWriter.reopen(store).layout
    info = store_info(store)
    n = info["samples_complete"]
    ds = open_run(store)
    n_prompt_tokens = int((~ds["token_is_padding"].values).sum(axis=1).max())
    est = layout.bytes_per_sample(map_steps=1, map_tokens=n_prompt_tokens)
    # the estimate against what one sample decodes to when read back (xarray's view, not the layout's)
    one = ds.isel(sample=0, step=0)
    for name in ("vis_txt_mass", "txt_vis_mass", "vis_txt_mass_ref", "token_mass", "image"):
        assert est[name] == ds[name].isel(sample=0).nbytes, name
    assert est["maps"] == one["maps"].nbytes  # one selected step
    # what lands on disk for maps is about the selected tokens' share (NaN elsewhere compresses away)
    stored_maps = info["arrays"]["maps"]["stored_bytes"] / n
    assert stored_maps < 1.5 * est["maps (selected tokens)"] + 4096


def test_torchrun_sweep_equals_one_process(tmp_path):
    from taca_probe.sweep import open_sweep

    def argv(out):
        return ["-m", "taca_probe", "sweep", "--model", "tiny-sd3", "--prompt", "a red cube", "--prompt", "a blue ball",
                "--seeds", "0,1", "--gamma0", "1.0,1.3", "--t-thresh", "970", "--steps", "2", "--height", "64",
                "--width", "64", "--out", str(out)]

    r1 = subprocess.run([sys.executable, *argv(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                        timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*_torchrun(2), *argv(tmp_path / "two")], env=_env(), capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    # the summary is printed once, by rank 0 (rank 1 printed one too, of 0 samples, before the sweep ended)
    assert r2.stdout.count("open_sweep(") == 1, r2.stdout
    a, b = open_sweep(tmp_path / "one").load(), open_sweep(tmp_path / "two").load()
    for ds in (a, b):
        for k in VOLATILE + ("sweep",):
            ds.attrs.pop(k, None)
    for name in ("vis_txt_mass", "token_mass", "image", "gamma", "timestep"):
        xr.testing.assert_identical(a[name], b[name])
    pngs = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two" / "images").rglob("*.png"))
    assert len(pngs) == 2 * 4 and pngs == sorted(p.relative_to(tmp_path / "one")
                                                 for p in (tmp_path / "one" / "images").rglob("*.png"))


def test_sweep_overwrite_on_rank_1_leaves_the_folder_to_rank_0(tmp_path, monkeypatch, pipes):
    """torchrun sweep --overwrite: rank 1 refused the folder ("not a sweep folder") when it looked while rank 0
    had deleted sweep.json and not yet written the new one; torchrun then killed rank 0 mid-overwrite."""
    import taca_probe.sweep as sweep

    folder = tmp_path / "sweep"
    (folder / "stores").mkdir(parents=True)  # what rank 0's --overwrite leaves for a moment
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    modes = []
    monkeypatch.setattr(sweep, "record_plan", lambda *a, **k: modes.append(k["mode"]))  # no barrier to wait at
    sweep.run_sweep(pipes("tiny-sd3"), folder, prompts=["a red cube"], schedules=["none"], mode="overwrite",
                    progress=False)
    assert modes == ["resume"]  # rank 1 went on to record its share of what rank 0 lays out


def test_analysis_on_a_dask_local_cluster_equals_in_memory(tmp_path, prompts_file):
    distributed = pytest.importorskip("dask.distributed")
    from taca_probe import analysis
    from taca_probe.cli import main

    store = tmp_path / "d.zarr"
    assert main(_record_argv(store, prompts_file)[2:]) == 0
    eager = open_run(store).load()
    results = {
        "suppression": lambda ds: analysis.suppression(ds, by="block_type", n_resamples=200, seed=0),
        "amplification": lambda ds: analysis.amplification(ds, by="layer", n_resamples=200, seed=0),
        "timestep_awareness": lambda ds: analysis.timestep_awareness(ds, by="block_type", n_resamples=200, seed=0),
        "token_ranking": lambda ds: analysis.token_ranking(ds, top=5),
    }
    expected = {k: f(eager) for k, f in results.items()}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            lazy = open_run(store, chunks={})
            assert lazy["vis_txt_mass"].chunks is not None  # dask-backed, nothing loaded yet
            for k, f in results.items():
                got = f(lazy)
                got = got.compute() if hasattr(got, "compute") else got
                xr.testing.assert_allclose(got, expected[k], rtol=1e-6, atol=1e-7)
            assert len(client.scheduler_info()["workers"]) == 2
