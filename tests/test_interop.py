"""Parity with the anchors' own code (fixtures from tools/make_anchor_fixtures.py, no anchor code
needed here) and import -> export -> import identity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from trainer import interop

ANCHORS = Path(__file__).parent / "data" / "anchors"
TOL = 1e-4


def fixture(name: str):
    folder = ANCHORS / name
    io = load_file(str(folder / "io.safetensors"))
    inputs = {k[3:]: v for k, v in io.items() if k.startswith("in.")}
    reference = {k[4:]: v for k, v in io.items() if k.startswith("out.")}
    if name == "hunyuan3d-2.1-vae":
        src, config, options = folder, "", {}
    else:
        opts = json.loads((folder / "options.json").read_text())
        src, config, options = folder / ("vae.pt" if name == "partpacker-vae" else "flow.pt"), opts["config"], opts["options"]
    cfg, state, anchor, scale = interop.read_source(name, src, config, options)
    net = models.build_from_config(cfg)
    net.load_state_dict(state)
    return net.eval(), inputs, reference, (cfg, state, anchor, scale)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@torch.no_grad()
def test_hunyuan_vae_parity():
    net, x, ref, (_, _, _, scale) = fixture("hunyuan3d-2.1-vae")
    assert scale == pytest.approx(1.0039506158752403)
    hidden = net.decode(x["latents"])
    assert close(hidden, ref["hidden"]) < TOL
    assert close(net.query(hidden, x["xyz"]), ref["sdf"]) < TOL
    post = net.encode(x["points"], x["normals"], x["sharp_points"], x["sharp_normals"],
                      query_index=x["query_index"], sharp_query_index=x["sharp_query_index"])
    mean, logvar = ref["moments"].chunk(2, dim=-1)
    assert close(post.mean, mean) < TOL and close(post.logvar, logvar.clamp(-30, 20)) < TOL


@torch.no_grad()
def test_partpacker_vae_parity():
    net, x, ref, _ = fixture("partpacker-vae")
    hidden = net.decode(x["latents"])
    assert close(hidden, ref["hidden"]) < TOL
    # PartPacker's TSDF is positive inside, shapeflow's SDF negative inside: the import flips the sign
    assert close(net.query(hidden, x["xyz"]), -ref["sdf"]) < TOL
    post = net.encode(x["points"], None, x["sharp_points"], None,
                      query_index=x["query_index"], sharp_query_index=x["sharp_query_index"])
    assert close(post.mean, ref["mean"]) < TOL and close(post.logvar, ref["logvar"]) < TOL


@torch.no_grad()
def test_partpacker_dit_parity():
    net, x, ref, _ = fixture("partpacker-dit")
    assert close(net(x["x"], x["t"], x["cond"]), ref["velocity"]) < TOL
    # the unconditional branch of PartPacker's CFG is a zero condition
    assert torch.equal(net.null_condition(2, 5), torch.zeros(2, 5, 32))


@pytest.mark.parametrize("name", ["hunyuan3d-2.1-vae", "partpacker-vae", "partpacker-dit"])
def test_import_export_import_identity(name, tmp_path):
    _, _, _, (cfg, state, anchor, _) = fixture(name)
    files = interop.write_anchor(name, state, cfg, anchor, tmp_path)
    src = tmp_path if name == "hunyuan3d-2.1-vae" else files[0]
    options = {k: v for k, v in anchor.items() if k != "config_name"}
    again = interop.read_source(name, src, anchor.get("config_name", ""),
                                {} if name == "hunyuan3d-2.1-vae" else options)[1]
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_hunyuan_flag_folds_back_exactly():
    """A fine-tuned flag row 0 (no Hunyuan3D tensor of its own) is folded into the input bias on export."""
    _, _, _, (cfg, state, _, _) = fixture("hunyuan3d-2.1-vae")
    state = dict(state)
    state["encoder.embed.sharp_flag.weight"] = state["encoder.embed.sharp_flag.weight"] + 0.5
    theirs = interop.to_theirs("hunyuan3d-2.1-vae", state, cfg)
    back = interop.to_ours("hunyuan3d-2.1-vae", theirs, cfg)
    net_a, net_b = models.build_from_config(cfg), models.build_from_config(cfg)
    net_a.load_state_dict(state), net_b.load_state_dict(back)
    pts, nrm = torch.rand(1, 20, 3), torch.randn(1, 20, 3)
    with torch.no_grad():
        a = net_a.encode(pts, nrm, pts[:, :8], nrm[:, :8], num_latents=4, num_sharp_latents=2).mean
        b = net_b.encode(pts, nrm, pts[:, :8], nrm[:, :8], num_latents=4, num_sharp_latents=2).mean
    assert close(a, b) < 1e-5


def test_wrong_config_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_dim|lacks|shape"):
        interop.read_source("partpacker-vae", ANCHORS / "partpacker-vae" / "vae.pt", "part_woenc",
                            {**json.loads((ANCHORS / "partpacker-vae" / "options.json").read_text())["options"],
                             "num_dec_layers": 3})
    with pytest.raises(ValueError, match="unknown config keys"):
        interop.read_source("partpacker-dit", ANCHORS / "partpacker-dit" / "flow.pt", "big_parts_strict_pvae",
                            {"hidden_size": 3})
