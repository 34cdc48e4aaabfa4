"""The plug-in contract: a sixth architecture, a corpus in its own format and a head, written as files outside `vl`
and `conf` (tests/plugins/toy.py + tests/plugins/conf/), train end to end and learn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.toy import write_toy_corpus
from vl.errors import ConfigError
from vl.pipeline import train

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_CONF = Path(__file__).resolve().parent / "conf"
SIZES = {"train": 640, "val": 96, "test": 160}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), sizes=SIZES)


def test_toy_system_learns_in_process(make_cfg, toy_root) -> None:
    cfg = make_cfg(f"hydra.searchpath=[file://{PLUGIN_CONF}]", "experiment=toy", f"data.root={toy_root}", tiny=False)
    assert cfg.model.encoder._target_ == "tests.plugins.toy.ToyDualEncoder"
    metrics, _ = train(cfg)
    chance = metrics["test/toy_acc_chance"]
    assert 0.1 < chance < 0.3  # 8 colours in batches of 16
    assert metrics["test/toy_acc"] > chance + 0.4, metrics


def test_toy_head_on_a_text_only_encoder_fails_at_build_time(make_cfg, toy_root) -> None:
    cfg = make_cfg(
        f"hydra.searchpath=[file://{PLUGIN_CONF}]",
        "experiment=toy",
        f"data.root={toy_root}",
        "model=bert",
        "model.encoder.text_encoder.hidden_size=32",
        "model.encoder.text_encoder.num_heads=2",
        "model.encoder.text_encoder.num_layers=1",
        "model.encoder.text_encoder.intermediate_size=64",
        tiny=False,
    )
    with pytest.raises(ConfigError, match="'toy_contrastive' matches text against images, but ClipBertEncoder sees no"):
        train(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+model.encoder.hiden_size=8",
            "model.encoder.hiden_size: not an argument of tests.plugins.toy.ToyDualEncoder "
            "(did you mean 'hidden_size'?)",
        ),
        (
            "+data.batch_sise=8",
            "data.batch_sise: not an argument of tests.plugins.toy.ToyColoursDataModule (did you mean 'batch_size'?)",
        ),
    ],
)
def test_a_typo_in_a_plugin_config_is_one_line_before_any_data(make_cfg, tmp_path, override, message) -> None:
    """A plugin has no registered schema; its config keys are still checked against its constructors' signatures,
    before the corpus is read (data.root does not even exist here)."""
    cfg = make_cfg(
        f"hydra.searchpath=[file://{PLUGIN_CONF}]",
        "experiment=toy",
        f"data.root={tmp_path / 'absent'}",
        override,
        tiny=False,
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_toy_system_trains_from_the_cli(tmp_path, toy_root) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config-dir",
            str(PLUGIN_CONF),
            "experiment=toy",
            f"data.root={toy_root}",
            f"hydra.run.dir={run}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (run / "results.md").read_text()
    value = {k: float(v) for k, v in re.findall(r"\|\s*(test/toy_acc\w*)\s*\|\s*([0-9.]+)", table)}
    assert value["test/toy_acc"] > value["test/toy_acc_chance"] + 0.4, table
