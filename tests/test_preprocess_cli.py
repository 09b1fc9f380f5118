"""`shapeflow preprocess` end to end: real and broken files, exit codes, shards readable by tar and
webdataset, resume after interruptions, disjoint job splits, per-mesh timeout, usage errors."""
from __future__ import annotations

import glob
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds
from conftest import BROKEN_DIR, MESH_DIR, TINY_CONFIG

from data_pipeline.preprocess.jobs import discover, job_of
from data_pipeline.preprocess.mesh_io import MESH_EXTENSIONS
from data_pipeline.preprocess.shard_writer import tar_ids
from trainer import commands as cli

CHEAP = ["wallhole.obj", "multibody.stl", "BoxTextured.glb", "featuretype.STL"]


def preprocess(*args, config=TINY_CONFIG) -> int:
    return cli.main(["preprocess", *map(str, args), "--config", str(config), "--no-progress"])


def shard_ids(out: Path) -> list[str]:
    """Every sample id in every complete shard (duplicates kept, to detect them)."""
    return [i for shard in sorted(out.glob("*.tar")) for i in tar_ids(shard)]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_bundled_real_and_broken_meshes(tmp_path):
    out = tmp_path / "shards"
    rc = preprocess(MESH_DIR, BROKEN_DIR, "--out", out, "--workers", "2")
    assert rc == 3                                     # some inputs failed, the others were written
    good = sorted(p.name for p in MESH_DIR.iterdir() if p.suffix.lower() in MESH_EXTENSIONS)
    broken = sorted(p.name for p in BROKEN_DIR.iterdir())
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["source"] for f in failures) == broken
    assert all(f["reason"] for f in failures)
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == len(good)      # one sample per good mesh
    assert manifest(out)["totals"]["samples"] == len(good)
    assert manifest(out)["totals"]["failures"] == len(broken)

    listing = subprocess.run(["tar", "tf", str(sorted(out.glob("*.tar"))[0])], capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(name.endswith(".surface.npy") for name in listing)
    dataset = wds.WebDataset(sorted(glob.glob(str(out / "*.tar"))), shardshuffle=False).decode()
    samples = list(dataset)
    assert sorted(s["json"]["source"] for s in samples) == good
    assert all(s["vol_sdf.npy"].dtype.name == "float16" and s["surface.npy"].shape[1] == 3 for s in samples)


def test_shard_members_have_plain_ustar_headers(small_shards):
    """No PAX header per member (a float mtime adds one): readers parse half the headers."""
    import tarfile
    for path in sorted(small_shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert members and all(m.pax_headers == {} and isinstance(m.mtime, int) for m in members)


def test_small_shards_fixture(small_shards):
    ids = shard_ids(small_shards)
    assert len(ids) == len(set(ids)) == 4
    m = manifest(small_shards)
    assert m["totals"] == {"shards": 2, "samples": 4, "bytes": m["totals"]["bytes"], "failures": 0}
    assert [s["num_samples"] for s in m["shards"]] == [2, 2]
    assert (small_shards / "failures.jsonl").read_text() == ""


def test_resume_never_duplicates_or_drops(tmp_path, capsys):
    out = tmp_path / "shards"
    inputs = [MESH_DIR / name for name in CHEAP[:3]]
    assert preprocess(*inputs, "--out", out, "shard_max_samples=1") == 0
    first = sorted(shard_ids(out))
    assert len(first) == 3

    assert preprocess(*inputs, "--out", out, "shard_max_samples=1") == 0      # nothing left to do
    assert "0 written, 3 already done" in capsys.readouterr().out

    # A crash: one shard lost, a half-written shard left behind, one complete shard missing from the manifest.
    shards = sorted(out.glob("*.tar"))
    shards[0].unlink()
    (out / (shards[1].name.replace(".tar", "") + "-999999.tar.tmp")).write_bytes(b"partial")
    part = next(out.glob("manifest-j*.json"))
    data = json.loads(part.read_text())
    data["shards"] = [s for s in data["shards"] if s["name"] != shards[2].name]
    part.write_text(json.dumps(data))

    assert preprocess(*inputs, "--out", out, "shard_max_samples=1") == 0
    assert "1 written, 2 already done" in capsys.readouterr().out
    assert sorted(shard_ids(out)) == first
    assert not list(out.glob("*.tmp"))
    assert manifest(out)["totals"]["samples"] == 3


def test_job_split_is_a_disjoint_cover(tmp_path):
    sources = [source for _, source in discover([str(MESH_DIR), str(BROKEN_DIR)])]
    for jobs in (1, 2, 3, 7):
        parts = [[s for s in sources if job_of(s, jobs) == j] for j in range(jobs)]
        assert sorted(sum(parts, [])) == sorted(sources)

    out = tmp_path / "shards"
    inputs = [MESH_DIR / name for name in CHEAP]
    for job in (1, 0):
        assert preprocess(*inputs, "--out", out, "--job-index", job, "--num-jobs", 2) == 0
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == len(CHEAP)
    m = manifest(out)
    assert m["jobs"] == ["j00000of00002", "j00001of00002"] and m["totals"]["samples"] == len(CHEAP)
    assert sorted(s["name"] for s in m["shards"]) == sorted(p.name for p in out.glob("*.tar"))


def test_shards_hold_the_same_samples_in_the_same_order_for_any_worker_count(tmp_path):
    # the slow bunny first: two workers finish the cheap meshes before it, one worker after it
    inputs = [MESH_DIR / "stanford-bunny.obj", *(MESH_DIR / name for name in CHEAP)]
    orders = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert preprocess(*inputs, "--out", out, "--workers", workers, "shard_max_samples=2") == 0
        orders.append(shard_ids(out))
    assert orders[0] == orders[1] and len(orders[0]) == len(inputs)


def test_outcomes_that_finish_early_wait_for_older_ones_in_a_bounded_buffer():
    from data_pipeline.preprocess.worker_pool import _InputOrder
    seen = []
    ordered = _InputOrder(seen.append, limit=2)
    ordered.add(2, "c")
    ordered.add(1, "b")
    assert seen == [] and not ordered.has_room()     # two early outcomes wait for task 0: feed no more
    ordered.add(0, "a")
    assert seen == ["a", "b", "c"] and ordered.has_room()


def test_pathological_mesh_times_out_and_the_job_goes_on(tmp_path):
    # 40k random triangles filling the whole box: the narrow band becomes the whole grid (minutes).
    rng = np.random.default_rng(0)
    corners = rng.uniform(-1, 1, (40_000, 1, 3)) + rng.normal(0, 0.1, (40_000, 3, 3))
    soup = trimesh.Trimesh(corners.reshape(-1, 3), np.arange(120_000).reshape(-1, 3), process=False)
    soup.export(tmp_path / "soup.ply")
    out = tmp_path / "shards"
    started = time.monotonic()
    rc = preprocess(tmp_path / "soup.ply", MESH_DIR / "multibody.stl", "--out", out, "--workers", "2",
                    "watertight.resolution=128", "mesh_timeout_s=20")   # multibody: 3.3 CPU-s, 5.4 s wall at load 2
    assert rc == 3
    assert time.monotonic() - started < 60
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["source"], f["reason"].split(":")[0]) for f in failures] == [("soup.ply", "timeout")]
    assert len(shard_ids(out)) == 1


def test_unsupported_files_in_a_folder_are_failures_and_docs_are_ignored(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(MESH_DIR / "wallhole.obj", folder)
    (folder / "model.fbx").write_bytes(b"Kaydara FBX Binary")
    (folder / "README.md").write_text("about these meshes")
    out = tmp_path / "shards"
    assert preprocess(folder, "--out", out) == 3
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["source"], "unsupported format" in f["reason"]) for f in failures] == [("model.fbx", True)]
    assert len(shard_ids(out)) == 1


@pytest.mark.parametrize("extra", [
    ["sampling.no_such_key=1"],                       # unknown key
    ["watertight.resolution=big"],                    # wrong type
    ["watertight.resolution=100"],                    # not a power of two
    ["--job-index", "2", "--num-jobs", "2"],          # no such job
])
def test_usage_and_config_errors_exit_2(tmp_path, extra):
    assert preprocess(MESH_DIR / "wallhole.obj", "--out", tmp_path / "o", *extra) == 2
    assert not list((tmp_path).glob("o/*.tar"))


def test_missing_input_and_other_config_in_out_dir_exit_2(tmp_path):
    assert preprocess(tmp_path / "nope.obj", "--out", tmp_path / "o") == 2
    out = tmp_path / "shards"
    assert preprocess(MESH_DIR / "wallhole.obj", "--out", out) == 0
    assert preprocess(MESH_DIR / "wallhole.obj", "--out", out, "seed=1") == 2    # another config hash
