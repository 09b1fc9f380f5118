"""The layering rules (tools/check_structure.py) hold for the repository, and the checker catches
each kind of violation in a small tree written here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.check_structure import check, imports_of

REPO = Path(__file__).resolve().parents[1]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for pkg in ("common", "data_pipeline", "models", "trainer", "trainer/engines"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_repository_has_no_cycles_layer_breaches_or_stray_engine_imports():
    assert check(REPO) == []


def test_a_module_level_cycle_is_reported_with_its_path(tmp_path):
    root = write_tree(tmp_path, {"trainer/a.py": "from trainer import b\n",
                                 "trainer/b.py": "import trainer.c\n",
                                 "trainer/c.py": "from trainer.a import thing\n"})
    assert check(root) == ["import cycle (module-level imports): trainer.a -> trainer.b -> trainer.c -> trainer.a"]


def test_a_function_level_import_breaks_no_cycle_but_still_obeys_the_layers(tmp_path):
    root = write_tree(tmp_path, {"trainer/a.py": "from trainer import b\n",
                                 "trainer/b.py": "def f():\n    from trainer import a\n",
                                 "models/net.py": "def f():\n    from trainer.a import x\n"})
    assert check(root) == ["models/net.py:2: imports trainer.a: models/ must not import trainer/ "
                           "(layers, docs/design.md)"]


def test_models_and_data_pipeline_do_not_import_each_other_relative_imports_resolved(tmp_path):
    root = write_tree(tmp_path, {"data_pipeline/x.py": "import models\n",
                                 "models/y.py": "from ..data_pipeline import x\nfrom common import ok\n"})
    problems = check(root)
    assert any(p.startswith("data_pipeline/x.py:1: imports models:") for p in problems)
    assert any(p.startswith("models/y.py:1: imports data_pipeline") for p in problems)
    assert not any("common" in p for p in problems)


def test_deepspeed_fsdp_and_accelerate_only_under_trainer_engines(tmp_path):
    root = write_tree(tmp_path, {"trainer/loop.py": "import deepspeed\n"
                                                    "from torch.distributed.fsdp import fully_shard\n"
                                                    "import torch.distributed as dist\n",
                                 "trainer/engines/ds.py": "import deepspeed\nimport accelerate\n",
                                 "data_pipeline/l.py": "def f():\n    from accelerate import Accelerator\n"})
    lines = {p.split(": imports")[0] for p in check(root)}
    assert lines == {"trainer/loop.py:1", "trainer/loop.py:2", "data_pipeline/l.py:2"}


def test_type_checking_blocks_do_not_count_as_module_level(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nimport b\n")
    got = {(i.target, i.module_level) for i in imports_of(path, "trainer.m")}
    assert ("a", False) in got and ("b", True) in got


def test_ruff_lint_is_clean():
    """The linter (ruff, configured in pyproject.toml: pycodestyle, pyflakes, import order) runs with the
    tests, so the README's test command and CI fail on a lint error."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
