"""What is in a shard directory, and does it read back (the library behind ``shapeflow inspect``).

Prints per-shard sample counts (checked against the manifest), every stored key
with its dtypes, row counts and value ranges (coordinates dequantised to the
normalised space), the preprocessing failures summary (failures.jsonl), and
writes a preview PNG of a few samples' query points (near-surface ones and the volume
queries inside the shape) coloured by SDF. With ``verify`` every member of every sample is
checked against the checksum its json records, and each damaged sample is listed (shard, sample,
member). Exit code 1 when a shard cannot be read, disagrees with the manifest or holds damage.
"""
from __future__ import annotations

import collections
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.loading.loader import Plan
from data_pipeline.loading.shard_order import resolve_source
from data_pipeline.loading.shard_reader import shard_samples
from data_pipeline.schema import ARRAY_KEYS, dequantize_coords

COORD_KEYS = {k for k, (dtype, _) in ARRAY_KEYS.items() if dtype == "uint16"}
PREVIEW_POINTS = 4000   # query points drawn per preview panel


@dataclass
class KeyStats:
    present: int = 0
    dtypes: set = field(default_factory=set)
    rows: list = field(default_factory=lambda: [np.inf, -np.inf])
    values: list = field(default_factory=lambda: [np.inf, -np.inf])

    def add(self, key: str, value: np.ndarray) -> None:
        self.present += 1
        self.dtypes.add(str(value.dtype))
        self.rows = [min(self.rows[0], len(value)), max(self.rows[1], len(value))] if value.ndim else self.rows
        if value.size:
            shown = dequantize_coords(value) if key in COORD_KEYS else value
            self.values = [min(self.values[0], float(shown.min())), max(self.values[1], float(shown.max()))]


@dataclass
class Summary:
    shards: list = field(default_factory=list)    # (url, samples read, manifest count, [damage lines])
    unverified: list = field(default_factory=list)   # shards without checksums (written before preprocess-5)
    keys: dict = field(default_factory=lambda: collections.defaultdict(KeyStats))
    samples: int = 0
    preview: list = field(default_factory=list)   # (id, points [P,3], sdf [P])
    quality: list = field(default_factory=list)   # (source, json "quality" record) of every sample that has one


def decode_value(key: str, data: bytes):
    if key.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if key == "json":
        return json.loads(data)
    return None


def preview_points(raw: dict, rng: np.random.Generator):
    """Near-surface queries plus the volume queries inside the shape (far outside ones hide the shape)."""
    points, sdf = [], []
    for key in ("near", "vol"):
        if f"{key}.npy" in raw and f"{key}_sdf.npy" in raw:
            xyz = dequantize_coords(decode_value(f"{key}.npy", raw[f"{key}.npy"]))
            values = decode_value(f"{key}_sdf.npy", raw[f"{key}_sdf.npy"]).astype(np.float32)
            keep = values < 0 if key == "vol" else slice(None)
            points.append(xyz[keep])
            sdf.append(values[keep])
    if not points or not sum(len(p) for p in points):
        return None
    points, sdf = np.concatenate(points), np.concatenate(sdf)
    keep = rng.choice(len(points), min(PREVIEW_POINTS, len(points)), replace=False)
    return points[keep], sdf[keep]


def sample_title(raw: dict) -> str:
    try:
        meta = json.loads(raw["json"])
    except (KeyError, ValueError):
        return str(raw["__key__"])
    return Path(str(meta.get("source", raw["__key__"]))).name


def sample_quality(raw: dict) -> dict | None:
    try:
        return json.loads(raw["json"]).get("quality")
    except (KeyError, ValueError):
        return None


def preview_title(raw: dict) -> str:
    """Source name, and the watertight method and p95 deviation in voxels where recorded."""
    title, record = sample_title(raw), sample_quality(raw)
    if record:
        title += f"\n{record['method']}, p95 {record['wt_to_input']['p95'] / record['voxel']:.1f} vox"
    return title


def quality_summary(summary: Summary, worst: int = 10) -> list[str]:
    """The quality records (preprocess json ``quality``), worst p95 watertight -> input first."""
    if not summary.quality:
        return ["quality: no sample has a quality record (written before preprocess-3)"]
    rows = sorted(summary.quality, key=lambda item: -item[1]["wt_to_input"]["p95"] / item[1]["voxel"])
    methods = collections.Counter(record["method"] for _, record in rows)
    lines = [f"quality: {len(rows)} samples ({', '.join(f'{n} {m}' for m, n in methods.most_common())}); worst first:",
             (f"  {'source':<32} {'method':<8} {'p95 vox':>7} {'max vox':>7} {'far area':>8} {'in->wt p95':>10} "
              f"{'area ratio':>10}")]
    for source, q in rows[:worst]:
        voxel = q["voxel"]
        lines.append(f"  {source[:32]:<32} {q['method']:<8} {q['wt_to_input']['p95'] / voxel:>7.2f} "
                     f"{q['wt_to_input']['max'] / voxel:>7.2f} {q['far_area']:>8.1%} "
                     f"{q['input_to_wt']['p95'] / voxel:>10.2f} {q['area_ratio']:>10.2f}")
    return lines


def scan(source: str, num_preview: int, verify: bool = False) -> Summary:
    shards = resolve_source(source)
    plan = Plan(shards, task="inspect", options=None, batch_size=1, mode="eval", seed=0, rank=0, world_size=1,
                workers=1, shuffle_buffer=0, cache_dir=None, cache_size=-1, verify=verify)  # keys=(): every member
    summary, rng = Summary(), np.random.default_rng(0)
    for shard in shards:
        events: list = []
        count = 0
        for raw in shard_samples(shard.url, plan, events, shard.num_samples):
            count += 1
            for key, data in raw.items():
                if key.startswith("__"):
                    continue
                value = decode_value(key, data)
                if isinstance(value, np.ndarray):
                    summary.keys[key].add(key, value)
                else:
                    summary.keys[key].present += 1
            if (record := sample_quality(raw)) is not None:
                summary.quality.append((sample_title(raw), record))
            if len(summary.preview) < num_preview and (pts := preview_points(raw, rng)) is not None:
                summary.preview.append((preview_title(raw), *pts))
        summary.unverified += [shard.url for kind, _, _ in events if kind == "no_checksums"]
        damage = [f"{kind}: {detail}" for kind, _, detail in events if kind != "no_checksums"]
        summary.shards.append((shard.url, count, shard.num_samples, damage))
        summary.samples += count
    return summary


def failures_summary(source: str) -> list[str]:
    path = Path(source) / "failures.jsonl"
    if not path.is_file():
        return ["failures.jsonl: none found"]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    reasons = collections.Counter(str(r.get("reason", r.get("error", "?"))).split(":")[0] for r in records)
    lines = [f"failures.jsonl: {len(records)} rejected inputs"]
    lines += [f"  {n:4d} x {reason}" for reason, n in reasons.most_common(10)]
    return lines


def write_preview(summary: Summary, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(summary.preview))
    fig = plt.figure(figsize=(4.5 * count, 4.5))
    for i, (title, points, sdf) in enumerate(summary.preview):
        ax = fig.add_subplot(1, count, i + 1, projection="3d")
        limit = 0.05  # colour saturates beyond: the interesting part is near the surface
        art = ax.scatter(*points.T, c=np.clip(sdf, -limit, limit), cmap="coolwarm", s=1, vmin=-limit, vmax=limit)
        ax.set_title("\n".join(line[:32] for line in title.splitlines()), fontsize=9)
        ax.set_xlim(-1.05, 1.05), ax.set_ylim(-1.05, 1.05), ax.set_zlim(-1.05, 1.05)
        fig.colorbar(art, ax=ax, shrink=0.6, label="SDF (blue inside)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def report(summary: Summary) -> tuple[list[str], list[str]]:
    lines = [f"{'shard':<40} {'samples':>8} {'manifest':>9}  status"]
    problems = []
    for url, count, expected, damage in summary.shards:
        status = "ok"
        if damage:
            status = f"DAMAGED ({len(damage)} problem(s)), {count} good samples"
        elif expected is not None and expected != count:
            status = f"MISMATCH: manifest says {expected}"
        problems += [f"{url}: {line}" for line in damage] or ([f"{url}: {status}"] if status != "ok" else [])
        lines.append(f"{Path(url).name:<40} {count:>8} {expected if expected is not None else '-':>9}  {status}")
    lines.append(f"{len(summary.shards)} shards, {summary.samples} good samples")
    if summary.unverified:
        lines.append(f"no checksums in {len(summary.unverified)} shard(s) (written before preprocess-5): "
                     "their payloads were not verified")
    lines.append(f"{'key':<22} {'present':>9} {'dtype':<18} {'rows':>15}  value range (coords dequantised)")
    for key in sorted(summary.keys):
        st = summary.keys[key]
        rows = f"{int(st.rows[0])}..{int(st.rows[1])}" if np.isfinite(st.rows[0]) else "-"
        values = f"[{st.values[0]:.4g}, {st.values[1]:.4g}]" if np.isfinite(st.values[0]) else "-"
        lines.append(f"{key:<22} {st.present:>4}/{summary.samples:<4} {','.join(sorted(st.dtypes)) or '-':<18} "
                     f"{rows:>15}  {values}")
    return lines, problems
