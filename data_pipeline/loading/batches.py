"""Per-task transforms: one raw shard sample (bytes) -> float32 arrays -> a collated batch of tensors.

The options (:class:`VaeOptions`, :class:`DitOptions`) and the batch keys, shapes and dtypes are
documented in one place: docs/loader.md.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

import fpsample
import numpy as np
import torch

from data_pipeline.schema import (
    READABLE_SCHEMA_VERSIONS,
    VIEW_KEYS,
    dequantize_coords,
    dequantize_normals,
    unpack_occupancy,
    view_key,
)
from data_pipeline.typed_config import ConfigError, from_dict

LATENT_KEY = "latent.npy"        # cached VAE latents (later schema versions), float16/32 [T, C]
EMBEDDING_KEY = "embedding.npy"  # stored condition embeddings, float16/32 [..., D]


# ---------------------------------------------------------------------------
# task options (validated: unknown names and wrong types raise ConfigError)
# ---------------------------------------------------------------------------

@dataclass
class SurfaceOptions:
    num_surface: int = 2048                          # N surface points per sample
    surface_sampling: Literal["fps", "random"] = "fps"  # fps: prefix of the stored FPS order
    num_sharp: int = 0                               # M sharp-edge points (0: none)
    resample: Optional[bool] = None   # fresh random subset + random-start FPS at every read (None: vae training)
    num_fps: int = 0                  # resample: leading points FPS-ordered (the query tokens; 0: all N)
    num_sharp_fps: int = 0            # resample: the same for the sharp points (0: all M)

    def __post_init__(self):
        if self.num_surface < 1 or self.num_sharp < 0:
            raise ValueError("num_surface must be >= 1 and num_sharp >= 0")
        if self.num_fps < 0 or self.num_sharp_fps < 0:
            raise ValueError("num_fps and num_sharp_fps must be >= 0")


@dataclass
class VaeOptions(SurfaceOptions):
    num_vol: int = 1024                     # uniform volume queries per sample
    num_near: int = 1024                    # near-surface queries per sample
    num_sharp_near: int = 0                 # queries near sharp edges (from near when a sample has none)
    token_cutoffs: Optional[list[int]] = None  # per-batch latent token count drawn from this list
    occupancy: bool = False                 # add the occupancy grid (voxel VAE)

    def __post_init__(self):
        super().__post_init__()
        if min(self.num_vol, self.num_near, self.num_sharp_near) < 0:
            raise ValueError("query counts must be >= 0")
        if self.token_cutoffs is not None and (not self.token_cutoffs or min(self.token_cutoffs) < 1):
            raise ValueError("token_cutoffs must be a non-empty list of positive ints")


@dataclass
class DitOptions(SurfaceOptions):
    use_latents: bool = False               # read cached latents (latent.npy) instead of surface points
    occupancy: bool = False                 # add the occupancy grid (what a voxel VAE encodes)
    condition: Literal["none", "class", "embedding", "image"] = "none"
    class_names: Optional[list[str]] = None  # condition="class": id = index of json[class_key] here
    class_key: str = "class"                # json field holding the class name (or an int id)
    view: Optional[int] = None              # condition="image": this view index, or None = a random one
    views: Optional[list[int]] = None       # ... drawn from these indices (None: all the sample has)

    def __post_init__(self):
        super().__post_init__()
        if self.view is not None and self.view < 0:
            raise ValueError(f"view must be >= 0, got {self.view}")
        if self.views is not None and (not self.views or min(self.views) < 0):
            raise ValueError("views must be a non-empty list of view indices >= 0")


TASK_OPTIONS = {"vae": VaeOptions, "dit": DitOptions}


def parse_task_options(task: str, options: dict[str, Any]):
    if task not in TASK_OPTIONS:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(TASK_OPTIONS)})")
    try:
        return from_dict(TASK_OPTIONS[task], dict(options), prefix=f"{task} option ")
    except ConfigError as err:
        raise ConfigError(f"make_loader: {err}") from None


# ---------------------------------------------------------------------------
# raw sample -> numpy arrays
# ---------------------------------------------------------------------------

SURFACE_KEYS = ("surface.npy", "surface_normal.npy", "surface_fps.npy")
SHARP_KEYS = ("sharp.npy", "sharp_normal.npy", "sharp_fps.npy")
QUERY_KEYS = ("vol.npy", "vol_sdf.npy", "near.npy", "near_sdf.npy")


class BadSample(ValueError):
    """A sample that cannot be used (missing key, wrong dtype, inconsistent sizes)."""


def required_keys(task: str, opts) -> tuple[str, ...]:
    keys = ["json"]
    if task == "dit" and opts.use_latents:
        keys.append(LATENT_KEY)
    else:
        keys += SURFACE_KEYS
        if opts.num_sharp:
            keys += SHARP_KEYS
    if task == "vae":
        keys += QUERY_KEYS
    if wants_occupancy(task, opts):
        keys.append("occ.npy")
    if task == "dit" and opts.condition == "embedding":
        keys.append(EMBEDDING_KEY)
    return tuple(keys)


def wants_occupancy(task: str, opts) -> bool:
    """The occupancy grid is read when asked for, except next to cached latents (nothing to encode)."""
    return opts.occupancy and not (task == "dit" and opts.use_latents)


def optional_keys(task: str, opts) -> tuple[str, ...]:
    """Keys used when a sample has them (views: a sample has as many as its json lists)."""
    if task == "vae" and opts.num_sharp_near:
        return ("sharp_near.npy", "sharp_near_sdf.npy")
    if task == "dit" and opts.condition == "image":
        return VIEW_KEYS
    return ()


def check_keys(raw: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise BadSample(f"sample {raw.get('__key__')!r} lacks {', '.join(missing)}")


NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), *\}")


def load_npy(raw: dict, key: str) -> np.ndarray:
    """A read-only view on the .npy bytes (no copy, no header eval); np.load for unusual files."""
    data = raw[key]
    if data[:6] == b"\x93NUMPY" and len(data) > 10:
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes
        header_len = int.from_bytes(data[8:start], "little")
        match = NPY_HEADER.match(data[start:start + header_len])
        if match:
            dtype = np.dtype(match.group(1).decode())
            shape = tuple(int(x) for x in match.group(2).split(b",") if x.strip())
            count = int(np.prod(shape))
            body = start + header_len
            if len(data) - body == count * dtype.itemsize:
                return np.frombuffer(data, dtype, count, body).reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadSample(f"sample {raw.get('__key__')!r}: {key} is not a valid .npy ({err})") from err


def load_meta(raw: dict) -> dict:
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise BadSample(f"sample {raw.get('__key__')!r}: json is not valid ({err})") from err
    version = meta.get("schema_version", 1)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise BadSample(f"sample {raw.get('__key__')!r}: schema_version {version}, loader reads "
                        f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    return meta


def expect(arr: np.ndarray, dtype: str, ndim: int, raw: dict, key: str) -> np.ndarray:
    if arr.dtype != np.dtype(dtype) or arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 3):
        raise BadSample(f"sample {raw.get('__key__')!r}: {key} has dtype {arr.dtype} shape {arr.shape}, "
                        f"schema v1 wants {dtype} with {ndim} dims")
    return arr


# ---------------------------------------------------------------------------
# point selection
# ---------------------------------------------------------------------------

def pick_indices(total: int, count: int, order: np.ndarray | None, rng: np.random.Generator,
                 prefix_stored: bool = False) -> np.ndarray | range:
    """``count`` indices into ``total`` points: the prefix of ``order`` (FPS) if given, else random.

    ``prefix_stored``: the points are stored FPS order first (``order`` is ``arange(K)``), so the
    prefix is ``range(count)``, a slice instead of a cache-missing gather.
    An FPS order shorter than ``count`` is continued with random other points;
    fewer than ``count`` points in all are drawn with replacement.
    """
    if order is not None and len(order) >= count:
        return range(count) if prefix_stored else order[:count]
    head = np.asarray(order if order is not None else [], dtype=np.int64)
    unused = np.ones(total, dtype=bool)
    unused[head] = False
    rest = np.flatnonzero(unused)
    need = count - len(head)
    tail = rng.choice(rest, need, replace=len(rest) < need) if len(rest) else rng.choice(total, need)
    return np.concatenate([head, tail]).astype(np.int64)


def fresh_fps_indices(points: np.ndarray, count: int, num_fps: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows drawn at random from all stored ``points`` [T, 3], the first ``num_fps`` (0: all)
    reordered by farthest-point sampling from a random start (Hunyuan3D-2.1 redraws both every step).
    FPS runs on the quantised coordinates: a uniform affine map does not change FPS choices."""
    idx = rng.choice(len(points), count, replace=False)
    k = min(num_fps or count, count)
    if k < 2:
        return idx
    h = min(5, count.bit_length() - 1)  # kd-tree height (5: fpsample's speed/accuracy choice); 2**h <= count
    order = fpsample.bucket_fps_kdline_sampling(rows(points, idx).astype(np.float32), k, h=h,
                                                start_idx=int(rng.integers(count)))
    order = order[np.sort(np.unique(order, return_index=True)[1])]  # FPS repeats rows once points coincide
    rest = np.ones(count, dtype=bool)
    rest[order] = False
    return np.concatenate([idx[order], idx[rest]])


def rows(array: np.ndarray, idx: np.ndarray | range) -> np.ndarray:
    """``array[idx]`` for row indices; np.take is several times faster than fancy indexing here,
    and a contiguous ``range`` is a slice (no gather at all)."""
    if isinstance(idx, range):
        return array[idx.start:idx.stop]
    return np.take(array, idx, axis=0)


def fps_prefix_stored(raw: dict, meta: dict, key: str, order: np.ndarray) -> bool:
    """True when json says the points are stored FPS order first (preprocess-2 and later); then
    ``order`` (the ``key`` array) must be ``0..K-1``: checked, a mismatch would give non-FPS subsets."""
    if meta.get("fps_prefix_stored") is not True:
        return False
    if not np.array_equal(order, np.arange(len(order), dtype=order.dtype)):
        raise BadSample(f"sample {raw.get('__key__')!r}: json says fps_prefix_stored but {key} "
                        f"is not 0..{len(order) - 1}")
    return True


def surface_arrays(raw: dict, meta: dict, opts: SurfaceOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    points = expect(load_npy(raw, "surface.npy"), "uint16", 2, raw, "surface.npy")
    normals = expect(load_npy(raw, "surface_normal.npy"), "int8", 2, raw, "surface_normal.npy")
    if len(points) == 0 or len(normals) != len(points):
        raise BadSample(f"sample {raw.get('__key__')!r}: {len(points)} surface points, {len(normals)} normals")
    use_fps = opts.surface_sampling == "fps"
    fps = expect(load_npy(raw, "surface_fps.npy"), "int32", 1, raw, "surface_fps.npy") if use_fps else None
    n, m = opts.num_surface, opts.num_sharp
    if opts.resample and len(points) >= n:  # idx[n:] stand in for missing sharp points
        idx = np.concatenate([fresh_fps_indices(points, n, opts.num_fps, rng), rng.integers(len(points), size=m)])
    else:
        prefix = use_fps and fps_prefix_stored(raw, meta, "surface_fps.npy", fps)
        idx = pick_indices(len(points), n + m, fps, rng, prefix)
    out = {"surface": dequantize_coords(rows(points, idx[:n])),
           "surface_normal": dequantize_normals(rows(normals, idx[:n]))}
    if m:
        out.update(sharp_arrays(raw, meta, opts, rng, fill=(points, normals, idx[n:])))
    return out


def sharp_arrays(raw: dict, meta: dict, opts: SurfaceOptions, rng: np.random.Generator,
                 fill: tuple[np.ndarray, np.ndarray, np.ndarray | range]) -> dict[str, np.ndarray]:
    """M sharp points; a sample with fewer than M is topped up with surface points (sharp_valid False).

    ``fill``: (surface points, surface normals, indices of further surface points to use).
    """
    points = expect(load_npy(raw, "sharp.npy"), "uint16", 2, raw, "sharp.npy")
    normals = expect(load_npy(raw, "sharp_normal.npy"), "int8", 2, raw, "sharp_normal.npy")
    m = opts.num_sharp
    have = min(len(points), m)
    if have and opts.resample:
        idx = fresh_fps_indices(points, have, opts.num_sharp_fps, rng)
        points, normals = rows(points, idx), rows(normals, idx)
    elif have:
        use_fps = opts.surface_sampling == "fps"
        fps = load_npy(raw, "sharp_fps.npy") if use_fps else None
        prefix = use_fps and fps_prefix_stored(raw, meta, "sharp_fps.npy", fps)
        idx = pick_indices(len(points), have, fps, rng, prefix)
        points, normals = rows(points, idx), rows(normals, idx)
    else:
        points, normals = points[:0], normals[:0]
    extra = fill[2][: m - have]  # gathered only when needed: most shapes have enough sharp points
    points = np.concatenate([points, rows(fill[0], extra)])
    normals = np.concatenate([normals, rows(fill[1], extra)])
    return {"sharp": dequantize_coords(points), "sharp_normal": dequantize_normals(normals),
            "sharp_valid": np.arange(m) < have}


def query_subset(raw: dict, key: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    points = expect(load_npy(raw, f"{key}.npy"), "uint16", 2, raw, f"{key}.npy")
    sdf = expect(load_npy(raw, f"{key}_sdf.npy"), "float16", 1, raw, f"{key}_sdf.npy")
    if len(points) != len(sdf) or (count and len(points) == 0):
        raise BadSample(f"sample {raw.get('__key__')!r}: {key} has {len(points)} points, {len(sdf)} SDF values")
    idx = rng.choice(len(points), count, replace=len(points) < count) if count else np.zeros(0, np.int64)
    return dequantize_coords(rows(points, idx)), np.take(sdf, idx).astype(np.float32)


def query_arrays(raw: dict, opts: VaeOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    parts = [query_subset(raw, "vol", opts.num_vol, rng), query_subset(raw, "near", opts.num_near, rng)]
    if opts.num_sharp_near:
        has_sharp_near = "sharp_near.npy" in raw and "sharp_near_sdf.npy" in raw
        parts.append(query_subset(raw, "sharp_near" if has_sharp_near else "near", opts.num_sharp_near, rng))
    return {"query": np.concatenate([p for p, _ in parts]), "sdf": np.concatenate([s for _, s in parts])}


def occupancy_array(raw: dict, meta: dict) -> np.ndarray:
    packed = expect(load_npy(raw, "occ.npy"), "uint8", 1, raw, "occ.npy")
    res = occupancy_resolution(meta, len(packed))
    if res is None:
        raise BadSample(f"sample {raw.get('__key__')!r}: cannot tell the occupancy resolution "
                        f"({len(packed)} packed bytes, no resolution in json)")
    return unpack_occupancy(packed, res).astype(np.float32)[None]  # [1, R, R, R]


def occupancy_resolution(meta: dict, packed_len: int) -> int | None:
    for key in ("occ_resolution", "occupancy_resolution"):
        if isinstance(meta.get(key), int):
            return meta[key]
    for section in ("counts", "occupancy"):
        value = meta.get(section)
        if isinstance(value, dict):
            for key in ("occ_resolution", "resolution", "occ"):
                if isinstance(value.get(key), int):
                    return value[key]
    guess = round((packed_len * 8) ** (1 / 3))
    return guess if (guess ** 3 + 7) // 8 == packed_len else None


def condition_arrays(raw: dict, meta: dict, opts: DitOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if opts.condition == "class":
        return {"class_id": np.int64(class_id(raw, meta, opts))}
    if opts.condition == "embedding":
        return {"condition": load_npy(raw, EMBEDDING_KEY).astype(np.float32)}
    if opts.condition == "image":
        return view_arrays(raw, meta, opts, rng)
    return {}


def view_arrays(raw: dict, meta: dict, opts: DitOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One condition view: ``opts.view``, or one drawn with ``rng`` (seeded per sample and epoch, so a
    resumed run draws the same) from ``opts.views`` or all the sample's views."""
    cameras = meta.get("views") or []
    if not cameras:
        raise BadSample(f"sample {raw.get('__key__')!r} has no condition views (schema_version "
                        f"{meta.get('schema_version', 1)}, or preprocessed with views=0): re-run "
                        f"shapeflow preprocess with views > 0 for condition.kind=image")
    if opts.view is not None:
        index = opts.view
    else:
        allowed = [i for i in (opts.views if opts.views is not None else range(len(cameras))) if i < len(cameras)]
        if not allowed:
            raise BadSample(f"sample {raw.get('__key__')!r}: none of views {opts.views} among its {len(cameras)}")
        index = int(allowed[rng.integers(len(allowed))])
    key = view_key(index)
    if index >= len(cameras) or key not in raw:
        raise BadSample(f"sample {raw.get('__key__')!r} lacks {key} ({len(cameras)} views in its json)")
    return {"view": decode_view(raw, key), "view_index": np.int64(index),
            "view_intrinsics": np.asarray(cameras[index]["intrinsics"], np.float32),
            "view_world_to_camera": np.asarray(cameras[index]["world_to_camera"], np.float32)}


def decode_view(raw: dict, key: str) -> np.ndarray:
    """PNG bytes -> uint8 [S, S, 4] RGBA (alpha = coverage)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(raw[key])) as image:
            return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise BadSample(f"sample {raw.get('__key__')!r}: {key} is not a readable image ({err})") from err


def class_id(raw: dict, meta: dict, opts: DitOptions) -> int:
    value = meta.get(opts.class_key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and opts.class_names is not None:
        if value not in opts.class_names:
            raise BadSample(f"sample {raw.get('__key__')!r}: class {value!r} is not in class_names")
        return opts.class_names.index(value)
    raise BadSample(f"sample {raw.get('__key__')!r}: condition='class' needs json[{opts.class_key!r}] "
                    f"(an int, or a name listed in class_names), got {value!r}")


# ---------------------------------------------------------------------------
# sample and batch
# ---------------------------------------------------------------------------

def sample_arrays(raw: dict, task: str, opts, rng: np.random.Generator) -> dict[str, Any]:
    """Decode one raw sample into float32 arrays for ``task`` (raises BadSample)."""
    check_keys(raw, required_keys(task, opts))
    meta = load_meta(raw)
    out: dict[str, Any] = {"id": str(meta.get("id", raw["__key__"]))}
    if task == "dit" and opts.use_latents:
        out["latent"] = load_npy(raw, LATENT_KEY).astype(np.float32)
    else:
        out.update(surface_arrays(raw, meta, opts, rng))
    if task == "vae":
        out.update(query_arrays(raw, opts, rng))
    else:
        out.update(condition_arrays(raw, meta, opts, rng))
    if wants_occupancy(task, opts):
        out["occ"] = occupancy_array(raw, meta)
    out["center"] = np.asarray(meta.get("center", (0.0, 0.0, 0.0)), dtype=np.float32)
    out["scale"] = np.float32(meta.get("scale", 1.0))
    return out


def collate(samples: list[dict[str, Any]], valid: list[bool]) -> dict[str, Any]:
    """Stack per-sample arrays into tensors; ``valid`` marks real (not padding) samples."""
    batch: dict[str, Any] = {"id": [s["id"] for s in samples]}
    for key in samples[0]:
        if key == "id":
            continue
        try:
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
        except ValueError as err:
            shapes = sorted({np.shape(s[key]) for s in samples})
            raise BadSample(f"cannot batch {key!r}: shapes differ across samples {shapes} "
                            f"(ids {batch['id']})") from err
    batch["valid"] = torch.tensor(valid, dtype=torch.bool)
    return batch


def draw_token_count(opts, rng: np.random.Generator) -> torch.Tensor | None:
    if getattr(opts, "token_cutoffs", None) is None:
        return None
    return torch.tensor(int(rng.choice(opts.token_cutoffs)), dtype=torch.int64)
