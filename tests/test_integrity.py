"""Data integrity on real shards (loader_fixtures.py): per-member checksums (XXH3) written by preprocessing and
verified by the loader and `shapeflow inspect --verify`; damaged headers reported with their shortfall;
old shards without checksums still load; a run whose only data is damaged exits with code 5."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

from loader_fixtures import shard_files, stored_samples

from data_pipeline import make_loader
from data_pipeline.loading.loader import LoaderWarning
from data_pipeline.schema import CHECKSUM_KEY
from trainer import commands as cli

SMALL = dict(task="vae", num_surface=64, num_vol=16, num_near=16)


def member_offset(shard: Path, name_suffix: str, index: int = 0) -> tuple[str, int, int]:
    """(sample key, data offset, header offset) of the index-th member whose name ends with name_suffix."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(name_suffix)]
    member = members[index]
    return member.name.split(".", 1)[0], member.offset_data, member.offset


def flip(path: Path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def eval_ids(directory: Path, **kwargs) -> tuple[list[str], object, list[str]]:
    loader = make_loader(directory, batch_size=2, mode="eval", seed=0, **SMALL, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LoaderWarning)
        ids = [i for batch in loader for i, ok in zip(batch["id"], batch["valid"]) if ok]
    return ids, loader, [str(w.message) for w in caught if issubclass(w.category, LoaderWarning)]


def test_every_member_has_a_checksum(loader_shards):
    for sample in stored_samples(loader_shards).values():
        recorded = sample["json"][CHECKSUM_KEY]
        assert set(recorded) == set(sample) - {"json"} and all(isinstance(v, int) for v in recorded.values())


def test_a_flipped_payload_byte_is_skipped_counted_and_never_batched(shard_copy, loader_shards):
    victim = shard_files(shard_copy)[0]
    key, data_offset, _ = member_offset(victim, ".vol_sdf.npy")
    flip(victim, data_offset + 200)   # past the .npy header: a plain wrong SDF value
    victim_id = str(stored_samples(loader_shards, [loader_shards / victim.name])[key]["json"]["id"])
    ids, loader, messages = eval_ids(shard_copy)
    assert victim_id not in ids and len(ids) == len(stored_samples(loader_shards)) - 1
    assert loader.stats["corrupt_samples"] == 1 and loader.counts()["corrupt_samples"] == 1
    assert any(victim.name in m and key in m and "vol_sdf.npy" in m for m in messages), messages
    unverified, _, _ = eval_ids(shard_copy, verify=False)   # what went unnoticed before
    assert victim_id in unverified


def test_a_damaged_member_header_is_reported_with_its_shortfall(shard_copy):
    victim = max(shard_files(shard_copy), key=lambda p: len(stored_samples(shard_copy, [p])))
    expected = len(stored_samples(shard_copy, [victim]))
    _, _, header = member_offset(victim, ".json", index=1)   # the second sample's first... json header
    flip(victim, header + 100, 8)    # inside the header's mode/uid fields: its checksum fails
    _, loader, messages = eval_ids(shard_copy)
    assert loader.stats["short_shards"] == 1 and loader.stats["missing_samples"] >= 1
    assert any("manifest" in m and f"of the {expected} samples" in m and victim.name in m for m in messages)
    assert str(victim) in loader.stats["failed_shards"]


def strip_checksums(shard: Path) -> None:
    """Rewrite ``shard`` as preprocessing wrote it before checksums existed."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as out:
        for member, data in members:
            if member.name.endswith(".json"):
                meta = json.loads(data)
                meta.pop(CHECKSUM_KEY)
                data = json.dumps(meta).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))


def test_old_shards_without_checksums_load_and_say_so_once(shard_copy, loader_shards):
    for shard in shard_files(shard_copy):
        strip_checksums(shard)
    ids, loader, messages = eval_ids(shard_copy)
    assert sorted(ids) == sorted(str(s["json"]["id"]) for s in stored_samples(loader_shards).values())
    assert loader.stats["unverified_shards"] == len(shard_files(shard_copy)) and loader.stats["corrupt_samples"] == 0
    assert sum("no checksums" in m for m in messages) == 1


def test_inspect_verify_lists_damage_and_exits_non_zero(shard_copy, loader_shards, tmp_path, capsys):
    assert cli.main(["inspect", str(loader_shards), "--verify", "--out", str(tmp_path / "a.png")]) == 0
    victim = shard_files(shard_copy)[-1]
    key, data_offset, _ = member_offset(victim, ".surface.npy")
    flip(victim, data_offset + 150)
    capsys.readouterr()
    assert cli.main(["inspect", str(shard_copy), "--verify", "--out", str(tmp_path / "b.png")]) == 1
    out = capsys.readouterr().out
    assert f"{victim}: corrupt_sample: sample {key}: member surface.npy fails its checksum" in out


def test_training_on_damaged_data_only_exits_5_with_one_line(shard_copy, tmp_path, capsys):
    only = shard_files(shard_copy)[0]
    for other in shard_files(shard_copy)[1:]:
        other.unlink()
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] == only.name]
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    for part in shard_copy.glob("manifest-j*.json"):
        part.unlink()
    for index in range(len(stored_samples(shard_copy, [only]))):
        flip(only, member_offset(only, ".surface.npy", index)[1] + 150)
    rc = cli.main(["train", "vecset_vae_debug", f"data.path={shard_copy}", f"run.dir={tmp_path / 'run'}",
                   "data.batch_size=1", "data.options={num_surface: 64, num_vol: 16, num_near: 16}",
                   "run.progress=false", "run.max_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 5
    line = [x for x in err if x.startswith("shapeflow train:")]
    assert len(line) == 1 and "Traceback" not in "\n".join(err), err
    assert only.name in line[0] and "fails its checksum" in line[0]
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
