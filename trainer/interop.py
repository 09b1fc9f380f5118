"""Released models <-> shapeflow networks: the weight converters behind `shapeflow import` and
`shapeflow export --format`.

Sources (facts read from the anchors' code, see docs/finetune.md):

- ``hunyuan3d-2.1-vae``: Hunyuan3D-2.1's ShapeVAE. Release folder: ``config.yaml`` whose ``params``
  are the ShapeVAE keyword arguments, and ``model.fp16.ckpt`` / ``model.fp16.safetensors`` (or the
  same without ``.fp16``), a flat state dict.
- ``partpacker-vae``: PartPacker's VAE (``pretrained/vae.pt``, ``{"model": state}`` or flat) with
  its config name (``part_woenc``).
- ``partpacker-dit``: PartPacker's flow DiT (``pretrained/flow.pt``: the ``dit.`` keys of its Model,
  VAE and DINOv2 excluded) with its config name (``big_parts_strict_pvae``).

Every name of shapeflow's side lives in the mapping tables below (one entry per tensor group), so
a renamed or fused layer in models/ changes only those names. A group moves rows: the source
tensors are cut into parts (q / k / v, mean / logvar), the parts are joined again on the other side;
Hunyuan3D's fused projections interleave the parts per head, everybody else stacks them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import models

SOURCES = ("hunyuan3d-2.1-vae", "partpacker-vae", "partpacker-dit")
META_KEY = "interop"   # checkpoint meta entry: {"source", "anchor_config", "latent_scale_factor"}


# ---------------------------------------------------------------------------
# Row groups
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One tensor group on one side: (key prefix, number of parts) pairs; ``per_head``: the parts of
    a fused tensor are interleaved per head ([h0: q k v][h1: q k v]...) instead of stacked."""
    keys: tuple[tuple[str, int], ...]
    per_head: bool = False


@dataclass(frozen=True)
class Group:
    ours: Side
    theirs: Side


def one(key: str) -> Side:
    return Side(((key, 1),))


def split_parts(t: Tensor, parts: int, heads: int, per_head: bool) -> list[Tensor]:
    """[parts*W, ...] -> parts x [W, ...]."""
    if parts == 1:
        return [t]
    if not per_head:
        return list(t.chunk(parts))
    w = t.shape[0] // parts
    grouped = t.reshape(heads, parts, w // heads, *t.shape[1:])
    return [grouped[:, i].reshape(w, *t.shape[1:]) for i in range(parts)]


def join_parts(parts: list[Tensor], heads: int, per_head: bool) -> Tensor:
    """Inverse of split_parts."""
    if len(parts) == 1:
        return parts[0]
    if not per_head:
        return torch.cat(parts)
    w = parts[0].shape[0]
    stacked = torch.stack([p.reshape(heads, w // heads, *p.shape[1:]) for p in parts], dim=1)
    return stacked.reshape(len(parts) * w, *parts[0].shape[1:])


def move_group(src: dict[str, Tensor], src_side: Side, dst_side: Side, heads: int) -> dict[str, Tensor]:
    """The tensors of one group, from ``src`` (keys of src_side) to dst_side's keys; a suffix
    (weight, bias) moves only when the source has it for every key (qkv_bias=False has none)."""
    out: dict[str, Tensor] = {}
    for suffix in ("weight", "bias"):
        names = [f"{k}.{suffix}" for k, _ in src_side.keys]
        if not all(n in src for n in names):
            continue
        parts = [p for n, (_, count) in zip(names, src_side.keys)
                 for p in split_parts(src[n], count, heads, src_side.per_head)]
        if len(parts) != sum(c for _, c in dst_side.keys):
            raise ValueError(f"cannot map {names} onto {[k for k, _ in dst_side.keys]}: part counts differ")
        for key, count in dst_side.keys:
            out[f"{key}.{suffix}"] = join_parts(parts[:count], heads, dst_side.per_head)
            parts = parts[count:]
    return out


def convert(src: dict[str, Tensor], groups: list[Group], heads: int, to_ours: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for g in groups:
        a, b = (g.theirs, g.ours) if to_ours else (g.ours, g.theirs)
        out.update(move_group(src, a, b, heads))
    return out


# ---------------------------------------------------------------------------
# shapeflow's names (the only place they appear)
# ---------------------------------------------------------------------------

def our_attn_in(prefix: str) -> tuple[tuple[str, int], ...]:
    """Input projections of models.layers.Attention: self-attention (modules named ``attn``) has one
    fused ``to_qkv`` (q, k, v row blocks); cross-attention has ``to_q`` then ``to_kv`` (k, v)."""
    if prefix.endswith(".attn"):
        return ((f"{prefix}.to_qkv", 3),)
    return ((f"{prefix}.to_q", 1), (f"{prefix}.to_kv", 2))


def attention_groups(ours: str, q_in: Side, out: str, q_norm: str, k_norm: str) -> list[Group]:
    return [Group(Side(our_attn_in(ours)), q_in), Group(one(f"{ours}.proj"), one(out)),
            Group(one(f"{ours}.q_norm"), one(q_norm)), Group(one(f"{ours}.k_norm"), one(k_norm))]


def mlp_groups(ours: str, fc1: str, fc2: str) -> list[Group]:
    return [Group(one(f"{ours}.mlp.fc1"), one(fc1)), Group(one(f"{ours}.mlp.fc2"), one(fc2))]


def pairs(*names: tuple[str, str]) -> list[Group]:
    return [Group(one(a), one(b)) for a, b in names]


# ---------------------------------------------------------------------------
# Hunyuan3D-2.1 ShapeVAE
# ---------------------------------------------------------------------------

def hy_cross_block(ours: str, theirs: str) -> list[Group]:
    return (pairs((f"{ours}.norm_q", f"{theirs}.ln_1"), (f"{ours}.norm_contexts.0", f"{theirs}.ln_2"),
                  (f"{ours}.norm2", f"{theirs}.ln_3"))
            + attention_groups(f"{ours}.attns.0", Side(((f"{theirs}.attn.c_q", 1), (f"{theirs}.attn.c_kv", 2)), True),
                               f"{theirs}.attn.c_proj", f"{theirs}.attn.attention.q_norm",
                               f"{theirs}.attn.attention.k_norm")
            + mlp_groups(ours, f"{theirs}.mlp.c_fc", f"{theirs}.mlp.c_proj"))


def hy_self_block(ours: str, theirs: str) -> list[Group]:
    return (pairs((f"{ours}.norm1", f"{theirs}.ln_1"), (f"{ours}.norm2", f"{theirs}.ln_2"))
            + attention_groups(f"{ours}.attn", Side(((f"{theirs}.attn.c_qkv", 3),), True), f"{theirs}.attn.c_proj",
                               f"{theirs}.attn.attention.q_norm", f"{theirs}.attn.attention.k_norm")
            + mlp_groups(ours, f"{theirs}.mlp.c_fc", f"{theirs}.mlp.c_proj"))


def hy_vae_groups(cfg: models.VecSetVAEConfig) -> list[Group]:
    groups = hy_cross_block("encoder.cross.blocks.0", "encoder.cross_attn")
    for i in range(cfg.encoder_layers):
        groups += hy_self_block(f"encoder.layers.blocks.{i}", f"encoder.self_attn.resblocks.{i}")
    groups += pairs(("encoder.norm_out", "encoder.ln_post"), ("encoder.to_moments", "pre_kl"),
                    ("decoder.proj_in", "post_kl"), ("query_head.proj", "geo_decoder.query_proj"),
                    ("query_head.norm_out", "geo_decoder.ln_post"), ("query_head.out", "geo_decoder.output_proj"))
    for i in range(cfg.decoder_layers):
        groups += hy_self_block(f"decoder.layers.blocks.{i}", f"transformer.resblocks.{i}")
    return groups + hy_cross_block("query_head.cross.blocks.0", "geo_decoder.cross_attn_decoder")


def hy_vae_config(params: dict[str, Any]) -> tuple[models.VecSetVAEConfig, float]:
    """(our config, latent scale factor) for ShapeVAE keyword arguments; raises on a layout that
    has no exact shapeflow equivalent."""
    p = {"num_encoder_layers": 8, "pc_size": 5120, "pc_sharpedge_size": 5120, "point_feats": 3, "num_freqs": 8,
         "include_pi": True, "qkv_bias": True, "qk_norm": False, "scale_factor": 1.0, "use_ln_post": True,
         "geo_decoder_downsample_ratio": 1, "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_ln_post": True, **params}
    unsupported = {"geo_decoder_downsample_ratio": 1, "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_ln_post": True,
                   "use_ln_post": True}
    for key, value in unsupported.items():
        if p[key] != value:
            raise ValueError(f"hunyuan3d-2.1-vae: params.{key}={p[key]} is not supported (only {value})")
    if p["point_feats"] not in (0, 3, 4):
        raise ValueError(f"hunyuan3d-2.1-vae: params.point_feats={p['point_feats']}: expected 0, 3 (normals) "
                         "or 4 (normals + sharp-edge label)")
    total, sharp_share = p["num_latents"], p["pc_sharpedge_size"] / (p["pc_size"] + p["pc_sharpedge_size"])
    num_sharp = int(round(total * sharp_share))
    cfg = models.config_for(
        "vecset_vae/large", width=p["width"], heads=p["heads"], latent_channels=p["embed_dim"],
        num_latents=total - num_sharp, num_sharp_latents=num_sharp, sharp_mode="concat",
        encoder_layers=p["num_encoder_layers"], decoder_layers=p["num_decoder_layers"], fourier_freqs=p["num_freqs"],
        use_normals=p["point_feats"] >= 3, qk_norm="layernorm" if p["qk_norm"] else "none", mlp_ratio=4.0,
        fourier_include_pi=bool(p["include_pi"]), sharp_flag=p["point_feats"] == 4, qkv_bias=bool(p["qkv_bias"]),
        gelu="exact", norm_eps=1e-6, norm_affine=True)
    return cfg, float(p["scale_factor"])


def hy_input_to_ours(state: dict[str, Tensor], cfg: models.VecSetVAEConfig) -> dict[str, Tensor]:
    """input_proj over [fourier, normals, sharp label] -> our proj [fourier, normals] + flag rows."""
    w, b = state["encoder.input_proj.weight"], state["encoder.input_proj.bias"]
    out = {"encoder.embed.proj.weight": w[:, :-1] if cfg.sharp_flag else w, "encoder.embed.proj.bias": b}
    if cfg.sharp_flag:   # label 0 adds nothing, label 1 adds the label column
        out["encoder.embed.sharp_flag.weight"] = torch.stack([torch.zeros_like(b), w[:, -1]])
    return out


def hy_input_to_theirs(state: dict[str, Tensor], cfg: models.VecSetVAEConfig) -> dict[str, Tensor]:
    """Fold the flag rows back: bias + flag[0], label column flag[1] - flag[0] (exact for labels 0/1)."""
    w, b = state["encoder.embed.proj.weight"], state["encoder.embed.proj.bias"]
    if cfg.sharp_flag:
        flag = state["encoder.embed.sharp_flag.weight"]
        w, b = torch.cat([w, (flag[1] - flag[0])[:, None]], dim=1), b + flag[0]
    elif cfg.num_sharp_latents:
        raise ValueError("hunyuan3d-2.1-vae export: sharp points need sharp_flag (point_feats=4)")
    return {"encoder.input_proj.weight": w, "encoder.input_proj.bias": b}


# ---------------------------------------------------------------------------
# PartPacker VAE and DiT
# ---------------------------------------------------------------------------

PP_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # vae/configs/schema.py defaults + vae/configs/part_woenc.py
    "part_woenc": {"use_salient_point": True, "latent_size": 4096, "salient_attn_mode": "dual", "num_enc_layers": 0,
                   "num_dec_layers": 24, "hidden_dim": 1024, "num_heads": 16, "dec_hidden_dim": 1024,
                   "dec_num_heads": 16, "query_hidden_dim": 1024, "query_num_heads": 16, "qknorm": True,
                   "qknorm_type": "LayerNorm", "fourier_version": "v3", "point_fourier_dim": 48, "latent_dim": 64,
                   "use_flash_query": False, "use_ae": False},
}
PP_DIT_CONFIGS: dict[str, dict[str, Any]] = {
    # flow/configs/schema.py defaults + flow/configs/big_parts_strict_pvae.py (DINOv2-giant: 1536 channels)
    "big_parts_strict_pvae": {"hidden_dim": 1536, "num_heads": 16, "num_layers": 24, "qknorm": True,
                              "qknorm_type": "RMSNorm", "use_pos_embed": False, "use_parts": True,
                              "part_embed_mode": "part2_only", "use_num_parts_cond": False, "latent_dim": 64,
                              "flow_shift": 3.0, "logitnorm_mean": 1.0, "logitnorm_std": 1.0},
}


def anchor_options(table: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any], source: str) -> dict:
    if name not in table:
        raise ValueError(f"{source}: unknown config name {name!r} (known: {', '.join(table)})")
    unknown = set(overrides) - set(table[name])
    if unknown:
        raise ValueError(f"{source}: unknown config keys {sorted(unknown)} (valid: {', '.join(sorted(table[name]))})")
    return {**table[name], **overrides}


def require_equal(p: dict[str, Any], source: str, **expected: Any) -> None:
    for key, value in expected.items():
        if p[key] != value:
            raise ValueError(f"{source}: {key}={p[key]!r} is not supported (only {value!r})")


def pp_vae_config(p: dict[str, Any]) -> models.VecSetVAEConfig:
    require_equal(p, "partpacker-vae", use_flash_query=False, use_ae=False, fourier_version="v3",
                  use_salient_point=True, dec_hidden_dim=p["hidden_dim"], query_hidden_dim=p["hidden_dim"],
                  dec_num_heads=p["num_heads"], query_num_heads=p["num_heads"])
    modes = {"dual": "dual_blocks", "single": "concat"}
    if p["salient_attn_mode"] not in modes:
        raise ValueError(f"partpacker-vae: salient_attn_mode={p['salient_attn_mode']!r} is not supported "
                         f"(supported: {', '.join(modes)})")
    if p["point_fourier_dim"] % 6:
        raise ValueError(f"partpacker-vae: point_fourier_dim={p['point_fourier_dim']} is not divisible by 6")
    half = p["latent_size"] // 2   # fps_indices + fps_indices_dorases, 2048 + 2048 in the release
    return models.config_for(
        "vecset_vae/large", width=p["hidden_dim"], heads=p["num_heads"], latent_channels=p["latent_dim"],
        num_latents=half, num_sharp_latents=p["latent_size"] - half, sharp_mode=modes[p["salient_attn_mode"]],
        encoder_layers=p["num_enc_layers"], decoder_layers=p["num_dec_layers"],
        fourier_freqs=p["point_fourier_dim"] // 6, use_normals=False,
        qk_norm={"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[p["qknorm_type"]] if p["qknorm"] else "none",
        mlp_ratio=4.0, fourier_include_pi=False, sharp_flag=False, qk_norm_scope="width", qkv_bias=True,
        gelu="exact", norm_eps=1e-6, norm_affine=False)


def pp_block(ours: str, theirs: str, cross: bool) -> list[Group]:
    if cross:
        q_in = Side(((f"{theirs}.q_proj", 1), (f"{theirs}.k_proj", 1), (f"{theirs}.v_proj", 1)))
    else:
        q_in = Side(((f"{theirs}.qkv_proj", 3),))
    return attention_groups(ours, q_in, f"{theirs}.out_proj", f"{theirs}.q_norm", f"{theirs}.k_norm")


def pp_attention_block(ours: str, theirs: str, cross: bool) -> list[Group]:
    """vae/modules/transformer.AttentionBlock (its norms are non-affine: no tensors)."""
    attn = f"{ours}.attns.0" if cross else f"{ours}.attn"
    return pp_block(attn, f"{theirs}.attn", cross) + mlp_groups(ours, f"{theirs}.ff.net.0", f"{theirs}.ff.net.2")


def pp_vae_groups(cfg: models.VecSetVAEConfig) -> list[Group]:
    if cfg.sharp_mode == "dual_blocks":
        groups = (pp_attention_block("encoder.cross.blocks.0.blocks.0", "perceiver", True)
                  + pp_attention_block("encoder.cross.blocks.0.blocks.1", "perceiver_dorases", True))
    else:
        groups = pp_attention_block("encoder.cross.blocks.0", "perceiver", True)
    for i in range(cfg.encoder_layers):
        groups += pp_attention_block(f"encoder.layers.blocks.{i}", f"encoder.{i}", False)
    groups.append(Group(Side((("encoder.to_moments", 2),)), Side((("proj_down_mean", 1), ("proj_down_std", 1)))))
    groups += pairs(("encoder.norm_out", "norm_down"), ("decoder.proj_in", "proj_up"),
                    ("query_head.norm_out", "norm_out"))
    for i in range(cfg.decoder_layers):
        groups += pp_attention_block(f"decoder.layers.blocks.{i}", f"decoder.{i}", False)
    return groups + pp_attention_block("query_head.cross.blocks.0", "attn_query", True)


def fourier_permutation(freqs: int) -> Tensor:
    """Column j of our Fourier features [x y z, sin(c, f), cos(c, f)] is column perm[j] of PartPacker's
    [for c in x y z: sin(c, f0..), cos(c, f0..)] + [x y z]."""
    ours_x = [6 * freqs + c for c in range(3)]
    ours_sin = [c * 2 * freqs + f for c in range(3) for f in range(freqs)]
    ours_cos = [c * 2 * freqs + freqs + f for c in range(3) for f in range(freqs)]
    return torch.tensor(ours_x + ours_sin + ours_cos)


PP_POINT_PROJ = (("encoder.embed.proj", "proj_input"), ("query_head.proj", "proj_query"))
PP_OUTPUT = ("query_head.out", "proj_out")   # PartPacker: TSDF positive inside; ours: negative inside


def pp_vae_special(state: dict[str, Tensor], cfg: models.VecSetVAEConfig, to_ours: bool) -> dict[str, Tensor]:
    perm = fourier_permutation(cfg.fourier_freqs)
    inverse = torch.argsort(perm)
    out: dict[str, Tensor] = {}
    for ours, theirs in PP_POINT_PROJ:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        out[f"{dst}.weight"] = state[f"{src}.weight"][:, perm if to_ours else inverse]
        out[f"{dst}.bias"] = state[f"{src}.bias"]
    src, dst = (PP_OUTPUT[1], PP_OUTPUT[0]) if to_ours else PP_OUTPUT
    out[f"{dst}.weight"], out[f"{dst}.bias"] = -state[f"{src}.weight"], -state[f"{src}.bias"]
    return out


def pp_dit_config(p: dict[str, Any]) -> models.DiTConfig:
    require_equal(p, "partpacker-dit", use_pos_embed=False, use_num_parts_cond=False)
    if p["use_parts"] and p["part_embed_mode"] != "part2_only":
        raise ValueError(f"partpacker-dit: part_embed_mode={p['part_embed_mode']!r} is not supported (only part2_only)")
    return models.config_for(
        "vecset_dit/large", in_channels=p["latent_dim"], width=p["hidden_dim"], depth=p["num_layers"],
        heads=p["num_heads"], mlp_ratio=4.0,
        qk_norm={"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[p["qknorm_type"]] if p["qknorm"] else "none",
        condition="tokens", condition_dim=p["hidden_dim"], null_condition="zero", time_scale=1000.0,
        qk_norm_scope="width", gelu="exact", norm_affine=False, final_adaln=False, part_embed=bool(p["use_parts"]),
        context_norm=False)


def pp_dit_groups(cfg: models.DiTConfig) -> list[Group]:
    groups = pairs(("proj_in", "dit.proj_in"), ("trunk.t_embedder.mlp.0", "dit.timestep_embed.mlp.0"),
                   ("trunk.t_embedder.mlp.2", "dit.timestep_embed.mlp.2"), ("trunk.final.linear", "dit.proj_out"))
    for i in range(cfg.depth):
        ours, theirs = f"trunk.blocks.blocks.{i}", f"dit.layers.{i}"
        groups += (pp_block(f"{ours}.attn", f"{theirs}.attn1", False)
                   + pp_block(f"{ours}.cross_attn", f"{theirs}.attn2", True)
                   + mlp_groups(ours, f"{theirs}.ff.net.0", f"{theirs}.ff.net.2")
                   + pairs((f"{ours}.adaLN.1", f"{theirs}.adaln_linear")))
    return groups


def pp_dit_special(state: dict[str, Tensor], cfg: models.DiTConfig, to_ours: bool) -> dict[str, Tensor]:
    if not cfg.part_embed:
        return {}
    if to_ours:
        return {"part_embed": state["dit.part_embed"].reshape(-1)}
    return {"dit.part_embed": state["part_embed"].reshape(1, -1)}   # [1, W] in PartPacker


# ---------------------------------------------------------------------------
# One table of sources
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Converter:
    groups: Callable[[Any], list[Group]]
    special: Callable[[dict[str, Tensor], Any, bool], dict[str, Tensor]]
    model_name: str          # the models preset family the config builds
    task: str                # vae | dit


def hy_special(state: dict[str, Tensor], cfg: models.VecSetVAEConfig, to_ours: bool) -> dict[str, Tensor]:
    return hy_input_to_ours(state, cfg) if to_ours else hy_input_to_theirs(state, cfg)


CONVERTERS = {
    "hunyuan3d-2.1-vae": Converter(hy_vae_groups, hy_special, "vecset_vae/large", "vae"),
    "partpacker-vae": Converter(pp_vae_groups, pp_vae_special, "vecset_vae/large", "vae"),
    "partpacker-dit": Converter(pp_dit_groups, pp_dit_special, "vecset_dit/large", "dit"),
}


def to_ours(source: str, state: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """The anchor's state dict -> ours (fp32); raises naming missing or leftover keys."""
    conv = CONVERTERS[source]
    state = {k: v.float() for k, v in state.items()}
    out = convert(state, conv.groups(cfg), cfg.heads, to_ours=True)
    out.update(conv.special(state, cfg, True))
    with torch.device("meta"):   # shapes only, nothing allocated
        expected = models.build_from_config(dataclasses.replace(cfg)).state_dict()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"{source}: the checkpoint lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         " (wrong config for this file?)")
    used = set(to_theirs(source, out, cfg))
    leftover = sorted(set(state) - used)
    if leftover:
        raise ValueError(f"{source}: tensors not used by this config: {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    for key, value in expected.items():
        if out[key].shape != value.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(out[key].shape)}, the config needs {tuple(value.shape)}")
    return out


def to_theirs(source: str, state: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """Our state dict -> the anchor's key names and layout."""
    conv = CONVERTERS[source]
    out = convert(state, conv.groups(cfg), cfg.heads, to_ours=False)
    out.update(conv.special(state, cfg, False))
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------
# Release files
# ---------------------------------------------------------------------------

def load_tensors(path: Path) -> dict[str, Tensor]:
    """A flat state dict from .safetensors, or a torch file holding one (optionally under "model"
    or "state_dict")."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


HY_WEIGHT_NAMES = ("model.fp16.safetensors", "model.fp16.ckpt", "model.safetensors", "model.ckpt")


def read_hunyuan_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.yaml's params, weights) of a Hunyuan3D-2.1 VAE release folder."""
    import yaml

    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: expected the release folder (config.yaml + model[.fp16].ckpt)")
    config = folder / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing (the release folder holds config.yaml with `params`)")
    params = (yaml.safe_load(config.read_text()) or {}).get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{config}: no `params` mapping (the ShapeVAE keyword arguments)")
    weights = next((folder / n for n in HY_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: none of {', '.join(HY_WEIGHT_NAMES)}")
    return params, load_tensors(weights)


def read_source(source: str, src: Path, config_name: str = "",
                options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Tensor], dict[str, Any], float]:
    """(our model config, our state dict, the anchor's config, latent scale factor) of a release."""
    options = options or {}
    if source == "hunyuan3d-2.1-vae":
        params, theirs = read_hunyuan_folder(src)
        params = {**params, **options}
        cfg, scale = hy_vae_config(params)
        anchor = params
    elif source in ("partpacker-vae", "partpacker-dit"):
        if not src.is_file():
            raise FileNotFoundError(f"{src}: expected PartPacker's checkpoint file (pretrained/vae.pt or flow.pt)")
        vae = source == "partpacker-vae"
        table = PP_VAE_CONFIGS if vae else PP_DIT_CONFIGS
        anchor = anchor_options(table, config_name or next(iter(table)), options, source)
        anchor["config_name"] = config_name or next(iter(table))
        cfg = pp_vae_config(anchor) if vae else pp_dit_config(anchor)
        theirs, scale = load_tensors(src), 1.0   # PartPacker feeds the VAE's mode() unscaled
    else:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    return cfg, to_ours(source, theirs, cfg), anchor, scale


def write_anchor(source: str, state: dict[str, Tensor], cfg, anchor: dict[str, Any] | None, out: Path,
                 dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write ``state`` (ours) in the anchor's release layout under ``out``; returns the files."""
    import yaml

    theirs = {k: v.to(dtype) for k, v in to_theirs(source, state, cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    if source == "hunyuan3d-2.1-vae":
        from safetensors.torch import save_file
        params = {k: v for k, v in (anchor or hy_vae_params(cfg)).items()}
        variant = ".fp16" if dtype == torch.float16 else ""
        files = [out / "config.yaml", out / f"model{variant}.ckpt", out / f"model{variant}.safetensors"]
        files[0].write_text(yaml.safe_dump({"target": "hy3dshape.models.autoencoders.ShapeVAE", "params": params}))
        torch.save(theirs, files[1])
        save_file(theirs, str(files[2]))
        return files
    name = "vae.pt" if source == "partpacker-vae" else "flow.pt"
    torch.save({"model": theirs}, out / name)
    return [out / name]


def hy_vae_params(cfg: models.VecSetVAEConfig) -> dict[str, Any]:
    """ShapeVAE keyword arguments for a shapeflow VAE that was not imported from Hunyuan3D."""
    total = cfg.num_latents + cfg.num_sharp_latents
    return {"num_latents": total, "embed_dim": cfg.latent_channels, "width": cfg.width, "heads": cfg.heads,
            "num_encoder_layers": cfg.encoder_layers, "num_decoder_layers": cfg.decoder_layers,
            "num_freqs": cfg.fourier_freqs, "include_pi": cfg.fourier_include_pi, "qkv_bias": cfg.qkv_bias,
            "qk_norm": cfg.qk_norm == "layernorm", "point_feats": (3 if cfg.use_normals else 0) + int(cfg.sharp_flag),
            "pc_size": cfg.num_latents * 20, "pc_sharpedge_size": cfg.num_sharp_latents * 20}


def check_exportable(source: str, cfg) -> None:
    """Raise unless ``cfg`` is the layout the anchor's code builds (what its import produces)."""
    expected = {"hunyuan3d-2.1-vae": lambda: hy_vae_config(hy_vae_params(cfg))[0]}.get(source)
    if expected is not None:
        want = expected()
    elif source == "partpacker-vae":
        want = pp_vae_config({**PP_VAE_CONFIGS["part_woenc"], **pp_vae_options(cfg)})
    else:
        want = pp_dit_config({**PP_DIT_CONFIGS["big_parts_strict_pvae"], **pp_dit_options(cfg)})
    ignore = {"checkpoint_every", "num_latents", "num_sharp_latents"}
    diff = [f.name for f in dataclasses.fields(cfg) if f.name not in ignore
            and getattr(cfg, f.name) != getattr(want, f.name)]
    if type(cfg) is not type(want) or diff:
        raise ValueError(f"--format {source}: this model's layout differs from the anchor's in {diff or type(cfg).__name__}"
                         " (only models imported from that format, or built with the same options, export to it)")


def pp_vae_options(cfg: models.VecSetVAEConfig) -> dict[str, Any]:
    return {"hidden_dim": cfg.width, "num_heads": cfg.heads, "dec_hidden_dim": cfg.width, "dec_num_heads": cfg.heads,
            "query_hidden_dim": cfg.width, "query_num_heads": cfg.heads, "latent_dim": cfg.latent_channels,
            "num_enc_layers": cfg.encoder_layers, "num_dec_layers": cfg.decoder_layers,
            "point_fourier_dim": 6 * cfg.fourier_freqs, "latent_size": cfg.num_latents + cfg.num_sharp_latents,
            "salient_attn_mode": "dual" if cfg.sharp_mode == "dual_blocks" else "single",
            "qknorm": cfg.qk_norm != "none", "qknorm_type": "RMSNorm" if cfg.qk_norm == "rmsnorm" else "LayerNorm"}


def pp_dit_options(cfg: models.DiTConfig) -> dict[str, Any]:
    return {"hidden_dim": cfg.width, "num_heads": cfg.heads, "num_layers": cfg.depth, "latent_dim": cfg.in_channels,
            "use_parts": cfg.part_embed, "qknorm": cfg.qk_norm != "none",
            "qknorm_type": "RMSNorm" if cfg.qk_norm == "rmsnorm" else "LayerNorm"}


def meta_of(source: str, anchor_config: dict[str, Any], scale_factor: float | None) -> dict[str, Any]:
    """The checkpoint-meta entry an imported file carries."""
    return {META_KEY: {"source": source, "anchor_config": anchor_config, "latent_scale_factor": scale_factor}}
