"""The configuration is read once, where a command starts: below the entries no function takes the Hydra config
(a parameter named cfg / config / *_cfg, or annotated DictConfig); each takes the typed settings
(sweep/pipeline/settings.py) or the values it needs. The test parses every module of sweep/ and hydra_plugins/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sweep

ROOT = Path(sweep.__file__).parent.parent
# (module, function): where a command starts and the composed config comes in
ENTRIES = {
    ("sweep.__main__", "sweep_job"),  # the Hydra app of one job
    ("sweep.pipeline.config", "hydra_command"),  # the Hydra app of `sweep score` and `sweep imatrix`
    ("sweep.pipeline.config", "app"),
    ("sweep.pipeline.job", "run_job"),  # one job of a sweep
    ("sweep.pipeline.settings", "score_settings"),  # the settings, from the config: read once
    ("sweep.pipeline.settings", "job_settings"),
    ("sweep.pipeline.settings", "metrics_settings"),
    ("sweep.pipeline.settings", "_get"),
    ("sweep.commands.score_model", "run_score"),  # `sweep score`
    ("sweep.imatrix.compute", "run_imatrix"),  # `sweep imatrix`
    ("sweep.report.callbacks", "on_multirun_end"),  # Hydra's callback at the end of a multirun
    ("hydra_plugins.sweep_sweeper.grid_sweeper", "setup"),  # Hydra's sweeper API
}
# Hydra's launcher section (hydra.launcher): what the launcher was given, read by the launcher's side
ALLOWED_NAMES = {"launcher_cfg"}


def takes_the_config(arg: ast.arg) -> bool:
    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
    named = arg.arg in ("cfg", "config") or (arg.arg.endswith("_cfg") and arg.arg not in ALLOWED_NAMES)
    return named or "DictConfig" in annotation


def offenders(root: Path, packages=("sweep", "hydra_plugins")) -> list[str]:
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue
                name = getattr(node, "name", "<lambda>")
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                for arg in params:
                    if takes_the_config(arg) and (module, name) not in ENTRIES:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {name}({arg.arg})")
    return found


def test_below_the_entries_no_function_takes_the_config():
    assert offenders(ROOT) == [], "take the typed settings (sweep/pipeline/settings.py) or the values needed"


@pytest.mark.parametrize("planted", [
    "def plan_for(cfg, info):\n    return cfg.run.prefix_stages\n",
    "from omegaconf import DictConfig\n\n\ndef stages(settings: DictConfig) -> int:\n    return 1\n",
    "class Planner:\n    def plan(self, *, metrics_cfg=None):\n        return metrics_cfg\n",
])
def test_the_check_fails_on_a_planted_one(tmp_path, planted):
    (tmp_path / "sweep" / "prefix").mkdir(parents=True)
    (tmp_path / "sweep" / "prefix" / "planted.py").write_text(planted)
    (tmp_path / "sweep" / "pipeline").mkdir()
    (tmp_path / "sweep" / "pipeline" / "job.py").write_text("def run_job(cfg):\n    return cfg\n")  # an entry
    (tmp_path / "hydra_plugins").mkdir()
    found = offenders(tmp_path)
    assert len(found) == 1 and found[0].startswith("sweep/prefix/planted.py:"), found
