"""The shipped accelerate and DeepSpeed configs stay loadable by the libraries that read them.

Each accelerate YAML goes through accelerate's own config loader and `accelerate launch`
argument processing (what `accelerate launch --config_file X` does before it starts
processes); each DeepSpeed JSON through accelerate's DeepSpeed plugin (which fills the "auto"
values) and DeepSpeed's own config validation.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
# The values the Accelerator (i.e. the training config) supplies for the JSONs' "auto" fields.
AUTO_VALUES = {
    "train_micro_batch_size_per_gpu": 2,
    "train_batch_size": 2,  # micro batch x accumulation x world size (1 here)
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
}

import accelerate.commands.launch as launch  # noqa: E402  (a hard dependency: missing it fails the run)
from accelerate.commands.config.config_args import load_config_from_file  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DistributedType, patch_environment  # noqa: E402
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env  # noqa: E402


def test_every_expected_config_is_shipped():
    names = {p.name for p in ACCELERATE_CONFIGS}
    for expected in ("single_gpu", "multi_gpu_ddp", "zero2", "zero3", "fsdp2",
                     "multinode_ddp", "multinode_zero3", "multinode_fsdp2"):
        assert f"{expected}.yaml" in names
    assert {p.name for p in DEEPSPEED_CONFIGS} >= {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"}


def _launch_args(config: Path, monkeypatch):
    """What `accelerate launch --config_file CONFIG -m trainer.commands train x.yaml` resolves, run from the repo root."""
    monkeypatch.chdir(ROOT)
    parser = launch.launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "-m", "trainer.commands", "train", "x.yaml"])
    args, defaults, mp_from_config = launch._validate_launch_command(args)
    return parser, args, defaults, mp_from_config


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid(config, monkeypatch):
    cfg = load_config_from_file(str(config))  # unknown top-level keys raise here
    parser, args, defaults, mp_from_config = _launch_args(config, monkeypatch)
    known = {action.dest for action in parser._actions}
    # Nested sections are not checked by the loader: each key must be a launch option.
    for key in cfg.deepspeed_config:
        assert key in known, f"{config.name}: unknown deepspeed_config key {key}"
    for key in cfg.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, f"{config.name}: unknown fsdp_config key {key}"
    # Precision lives in the training config (and the DeepSpeed JSON): never in these files.
    assert cfg.mixed_precision is None, f"{config.name} sets mixed_precision"

    multinode = config.name.startswith("multinode_")
    assert (cfg.num_machines > 1) == multinode
    if multinode:
        assert cfg.rdzv_backend == "c10d" and not cfg.same_network

    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert args.use_deepspeed
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), f"{config.name}: {ds_file} missing"
        assert cfg.deepspeed_config.get("deepspeed_multinode_launcher") == "standard"
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        # The plugin the training processes build from this environment; it raises when the
        # YAML repeats settings that belong in the JSON (notes.md).
        accelerate_env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
        with patch_environment(**accelerate_env):
            plugin = DeepSpeedPlugin()
        assert plugin.deepspeed_config["zero_optimization"]["stage"] in (1, 2, 3)
    elif cfg.distributed_type == DistributedType.FSDP:
        env = prepare_multi_gpu_env(args)
        assert env["FSDP_VERSION"] == "2"
        assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    elif cfg.distributed_type == DistributedType.MULTI_GPU:
        assert args.multi_gpu
    else:
        assert cfg.distributed_type == DistributedType.NO and cfg.num_processes == 1


@pytest.mark.parametrize("config", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_is_valid(config):
    raw = json.loads(config.read_text())
    stage = raw["zero_optimization"]["stage"]
    assert f"zero{stage}" in config.stem
    if stage == 3:
        # needed for accelerator.get_state_dict / export of a ZeRO-3 model (notes.md)
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in config.stem:
        assert raw["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    # accelerate fills every "auto" from the Accelerator; none may be left that it cannot fill
    plugin = DeepSpeedPlugin(hf_ds_config=str(config))
    plugin.set_mixed_precision("bf16")
    plugin.deepspeed_config_process(must_match=False, **AUTO_VALUES)
    filled = plugin.deepspeed_config
    assert "auto" not in json.dumps(filled), f"{config.name}: unfilled auto values {filled}"
    assert filled["bf16"]["enabled"] is True

    import deepspeed.runtime.config as deepspeed_config
    parsed = deepspeed_config.DeepSpeedConfig(filled)  # pydantic: unknown zero keys raise
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == AUTO_VALUES["gradient_clipping"]


# ---------------------------------------------------------------------------
# launcher scripts (what they would run; real runs are in test_slurm.py and the trainer tests)
# ---------------------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402

LAUNCHERS = ROOT / "launchers"


def _workstation(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(["bash", str(LAUNCHERS / "workstation.sh"), "--dry-run", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_workstation_script_commands():
    single = _workstation("configs/vecset_vae_debug.yaml", "run.max_steps=2")
    assert single.returncode == 0, single.stderr
    assert "1 process(es) on CPU" in single.stderr
    assert "-m trainer.commands train configs/vecset_vae_debug.yaml run.max_steps=2" in single.stderr
    assert "torch.distributed.run" not in single.stderr

    ddp = _workstation("-n", "2", "configs/vecset_vae_debug.yaml")
    assert ddp.returncode == 0, ddp.stderr
    assert "torch.distributed.run --nproc-per-node 2 --max-restarts 0 --standalone" in ddp.stderr
    assert "OMP_NUM_THREADS=" in ddp.stderr

    zero3 = _workstation("-n", "2", "-a", "zero3", "configs/vecset_dit_debug.yaml")
    assert zero3.returncode == 0, zero3.stderr
    assert "accelerate.commands.launch --config_file configs/accelerate/zero3.yaml --num_processes 2" in zero3.stderr

    missing = _workstation("-a", "no_such_config", "configs/vecset_vae_debug.yaml")
    assert missing.returncode == 2 and "no_such_config" in missing.stderr


@pytest.mark.parametrize("script", ["slurm/train.sbatch", "slurm/preprocess.sbatch", "workstation.sh"])
def test_launcher_scripts_parse_and_refuse_outside_slurm(script):
    path = LAUNCHERS / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if script.endswith(".sbatch"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        proc = subprocess.run(["bash", str(path), "configs/vecset_vae_debug.yaml", "x"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=30)
        assert proc.returncode == 2 and "sbatch" in proc.stderr
