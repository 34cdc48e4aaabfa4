"""End to end: fit, test, evaluate, resume, DDP, sweeps, run-dir contents."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, TINY_MODEL, save_run_config
from vl.errors import ConfigError
from vl.pipeline import build_datamodule, evaluate, train

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# data=custom needs data.root (your files): tests/data/test_custom.py
DATAS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "custom")
FAST = (
    "experiment=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
)


def read_metric(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


#: published-size encoders (BERT-base on CPU): VisualBERT's VQA pair stays in the default tier (15 s), the rest of
#: their rows (up to a minute each on 2 cores; ViLBERT's VQA pair 31 s) runs in the slow tier
PUBLISHED_SIZE = ("visual_bert", "vilbert")
GRID = [
    pytest.param(
        data,
        model,
        marks=[pytest.mark.slow] if model in PUBLISHED_SIZE and (data, model) != ("vqa", "visual_bert") else [],
    )
    for data in DATAS
    for model in MODELS
]


@pytest.mark.parametrize(("data", "model"), GRID)
def test_fast_dev_run_every_model_and_data(model: str, data: str, make_cfg) -> None:
    mm_data = data.startswith("multi30k") or data in ("wmt_text", "aux_text")
    if model.startswith("mm_bert") or mm_data:  # MM-BERT pairs only with its own data
        if model != "mm_bert_tiny" or not mm_data:
            pytest.skip(
                "MM-BERT: model=mm_bert_tiny x data=multi30k* only (mm_bert is the same code at BERT-base size)"
            )
    if model.startswith("vg_bert") or data.startswith("vg_bert"):
        pytest.skip(
            "VG-BERT pairs only with its own corpora; its model x data runs are tests/test_vg_bert_learning.py and "
            "tests/models/test_vg_bert.py (this grid's generic expectations do not cover it yet)"
        )
    small = ("data.batch_size=2", "data.batch_size_per_device=2") if model == "vilbert" else ()
    if model.startswith("clip_vil") or data.startswith("clip_vil"):  # tiny backbone and BERT, small images
        from tests.test_model_modes import _SMALL_CLIP_VIL

        small += tuple(
            o
            for o in _SMALL_CLIP_VIL
            if (o.startswith("data.") and data.startswith("clip_vil"))
            or (o.startswith("model.") and model.startswith("clip_vil"))
        )
    cfg = make_cfg("experiment=none", f"model={model}", f"data={data}", "debug=fdr", *small)
    info = build_datamodule(cfg).info
    objectives = set(cfg.data.objectives)
    region_model = cfg.model.encoder._target_.endswith(("SingleStreamEncoder", "VisualBertEncoder", "VilbertEncoder"))
    pixel_model = cfg.model.encoder._target_.endswith("ClipVilEncoder")
    sees_image = region_model or pixel_model or (cfg.model.encoder.get("use_image", True) and "clip_dim" in info)
    incompatible = None  # an incompatible pair fails with a clear error before any compute
    if pixel_model and not info.get("pixels"):
        incompatible = "reads images"
    elif region_model and "visual_dim" not in info:
        incompatible = "reads region features"
    elif not region_model and objectives & {"refer", "mrc", "mrfr"}:
        incompatible = "has no region states"
    elif not sees_image and objectives & {"itm", "retrieval"}:
        incompatible = "sees no image"
    if incompatible:
        with pytest.raises(ConfigError, match=incompatible):
            train(cfg)
        return
    metrics, _ = train(cfg)
    assert metrics == {} or all(v == v for v in metrics.values())


def test_overfit_one_batch_drives_loss_down(make_cfg) -> None:
    cfg = make_cfg(
        "experiment=none",
        "data=vqa",
        "trainer.overfit_batches=1",
        "trainer.max_epochs=50",
        "trainer.log_every_n_steps=1",
        "model.optimizer.lr=3e-3",
        "model.scheduler=null",
        "model.encoder.text_encoder.dropout=0.0",
        "callbacks=none",
        "test=false",
    )
    train(cfg)
    losses = read_metric(Path(cfg.paths.output_dir), "train/loss")
    assert losses[-1] < 0.3 * losses[0], losses


def test_default_experiment_writes_a_complete_run_dir(make_cfg) -> None:
    cfg = make_cfg("pretrain.trainer.max_epochs=1", "trainer.max_epochs=1")
    metrics, value = train(cfg)
    run = Path(cfg.paths.output_dir)
    for rel in (
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "pretrain/checkpoints/best.ckpt",
        "csv/metrics.csv",
        "curves.png",
        "pretrain/curves.png",
        "results.md",
        "vqa_predictions.json",
    ):
        assert (run / rel).is_file(), rel
    assert {"test/vqa_acc", "pretrain:test/itm_acc", "pretrain:test/mlm_acc"} <= set(metrics)
    assert value == metrics["val/vqa_acc"]
    preds = json.loads((run / "vqa_predictions.json").read_text())
    assert preds and set(preds[0]) == {"question_id", "answer"}
    assert "test/vqa_acc" in (run / "results.md").read_text()


def test_evaluate_reproduces_training_test_metrics(make_cfg) -> None:
    cfg = make_cfg(*FAST[:1], "data=vqa", "trainer.max_epochs=2")
    metrics, _ = train(cfg)
    save_run_config(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    eval_cfg = make_cfg(f"ckpt_path={ckpt}", name="eval", config_name="evaluate", tiny=False)
    with warnings.catch_warnings(record=True) as seen:  # scoring a checkpoint is no resume: no notes about one
        warnings.simplefilter("always")
        again = evaluate(eval_cfg)
    notes = [
        str(w.message) for w in seen if "dirpath has changed" in str(w.message) or "callbacks used to" in str(w.message)
    ]
    assert not notes
    assert again["test/vqa_acc"] == pytest.approx(metrics["test/vqa_acc"], abs=1e-6)
    assert again["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert (Path(eval_cfg.paths.output_dir) / "vqa_predictions.json").is_file()


def test_resume_from_last_matches_uninterrupted_run(make_cfg) -> None:
    common = (
        "experiment=none",
        "data=vqa",
        "trainer.deterministic=true",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "test=false",
        "trainer.log_every_n_steps=1",
    )
    straight = make_cfg(*common, "trainer.max_epochs=4", name="straight")
    metrics_straight, _ = train(straight)
    first = make_cfg(
        *common,
        "trainer.max_epochs=4",
        "+callbacks.stop._target_=tests.conftest.StopAtEpoch",
        "+callbacks.stop.epochs=2",
        name="first",
    )
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg(*common, "trainer.max_epochs=4", f"ckpt_path={last}", name="resumed")
    metrics_resumed, _ = train(resumed)
    assert read_metric(Path(resumed.paths.output_dir), "train/loss")  # it trained epochs 3-4
    assert metrics_resumed["train/loss"] == pytest.approx(metrics_straight["train/loss"], rel=1e-5)
    assert metrics_resumed["val/loss"] == pytest.approx(metrics_straight["val/loss"], rel=1e-5)
    # `resume=<run dir>`: the run's stored config (no overrides repeated; here one changed), continued in place
    in_place = make_cfg(f"resume={first.paths.output_dir}", "+callbacks.stop.epochs=4", name="ignored")
    metrics_in_place, _ = train(in_place)
    run = Path(first.paths.output_dir)
    assert metrics_in_place["val/loss"] == pytest.approx(metrics_straight["val/loss"], rel=1e-5)
    assert len(read_metric(run, "train/loss")) == len(read_metric(Path(straight.paths.output_dir), "train/loss"))
    assert not (Path(in_place.paths.output_dir) / "checkpoints").exists()
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.ckpt_path.endswith("last.ckpt") and saved.trainer.limit_train_batches == 4
    with pytest.raises(ConfigError, match="picks another config group"):
        train(make_cfg(f"resume={first.paths.output_dir}", "model=vilbert_tiny", name="ignored2"))


def test_refuses_to_overwrite_an_earlier_run(make_cfg) -> None:
    cfg = make_cfg(*FAST, "data=vqa")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    again = make_cfg(*FAST, "data=vqa")  # same output dir
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(again)
    assert ckpt.read_bytes() == before


@pytest.mark.slow  # a DDP spawn / a subprocess sweep
def test_ddp_cpu_two_processes_fit(make_cfg) -> None:
    cfg = make_cfg(*FAST, "data=vqa", "hardware=ddp_cpu", "data.batch_size=32", "data.batch_size_per_device=16")
    metrics, _ = train(cfg)
    assert "test/vqa_acc" in metrics
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_global_batch_derives_accumulation(make_cfg, caplog) -> None:
    cfg = make_cfg(*FAST, "data=vqa", "data.batch_size=64", "data.batch_size_per_device=16", "test=false")
    with caplog.at_level("INFO"):
        train(cfg)
    assert "64 = 16 per device x 1 devices x 4 accumulation" in caplog.text


def test_val_every_n_steps_counts_optimizer_steps(make_cfg) -> None:
    """`trainer.val_every_n_steps=2` with accumulation 2 (global batch 16 = 8 per device x 2): validation after optimizer
    steps 2 and 4 (micro-batches 4 and 8), not after every 2 micro-batches as Lightning's `val_check_interval=2`."""

    def validated_at(interval: str) -> list[int]:
        cfg = make_cfg(
            "experiment=none",
            "data=vqa",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            interval,
            "data.batch_size=16",
            "data.batch_size_per_device=8",
            "test=false",
            name=interval.split("=")[0],
        )
        train(cfg)
        with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
            # Lightning logs a validation under the optimizer step count before it (global_step - 1)
            return [int(r["step"]) + 1 for r in csv.DictReader(f) if r.get("val/loss")]

    assert validated_at("trainer.val_every_n_steps=2") == [2, 4]
    assert validated_at("trainer.val_check_interval=2") == [1, 2, 3, 4]  # Lightning's: every 2 micro-batches
    both = make_cfg("experiment=none", "data=vqa", "trainer.val_every_n_steps=2", "trainer.val_check_interval=3")
    with pytest.raises(ConfigError, match="val_every_n_steps"):
        train(both)


def _cli(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "WANDB_MODE": "disabled"},
    )


def test_cli_help_lists_groups(tmp_path: Path) -> None:
    out = _cli(str(ROOT / "train.py"), "--help", cwd=tmp_path, timeout=60)
    assert out.returncode == 0
    for group in ("model:", "data:", "hardware:", "experiment:", "logger:"):
        assert group in out.stdout


@pytest.mark.slow  # a DDP spawn / a subprocess sweep
def test_cli_multirun_makes_one_dir_per_job(tmp_path: Path, data_dir: Path) -> None:
    args = [
        str(ROOT / "train.py"),
        "-m",
        *FAST,
        "data=vqa",
        *TINY_MODEL,
        "~callbacks.rich_progress_bar",
        "model.optimizer.lr=1e-4,3e-4",
        f"paths.data_dir={data_dir}",
        "data.corpus.num_images=150",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()
        assert (tmp_path / "sweep" / job / ".hydra" / "config.yaml").is_file()
    # the sweep report (Hydra callback at the end of the multirun): one row per lr, best first by val/vqa_acc_best
    with open(tmp_path / "sweep" / "multirun.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = [
        json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["metrics"]["val/vqa_acc_best"]
        for job in ("0", "1")
    ]
    assert sorted(float(r["model.optimizer.lr"]) for r in rows) == [1e-4, 3e-4]
    assert [float(r["val/vqa_acc_best"]) for r in rows] == pytest.approx(sorted(best, reverse=True))
    assert (tmp_path / "sweep" / "multirun.md").is_file() and (tmp_path / "sweep" / "multirun.png").is_file()


@pytest.mark.slow
def test_cli_sweep_over_seeds_reports_mean_and_sd(tmp_path: Path, data_dir: Path) -> None:
    args = [
        str(ROOT / "train.py"),
        "-m",
        *FAST,
        "data=vqa",
        *TINY_MODEL,
        "~callbacks.rich_progress_bar",
        "test=false",
        "model.optimizer.lr=1e-4,1e-3",
        "seed=1,2",
        f"paths.data_dir={data_dir}",
        "data.corpus.num_images=150",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "sweep" / "multirun.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["seeds"] == "2" for r in rows) and "seed" not in rows[0]
    by_lr: dict[str, list[float]] = {}
    for job in range(4):
        run = tmp_path / "sweep" / str(job)
        lr = next(o for o in (run / ".hydra" / "overrides.yaml").read_text().split() if o.startswith("model.optim"))
        by_lr.setdefault(lr.split("=")[1], []).append(
            json.loads((run / "metrics.json").read_text())["metrics"]["val/loss"]
        )
    for row in rows:
        values = by_lr[row["model.optimizer.lr"]]
        assert values[0] != values[1]  # the seeds differ
        assert float(row["val/loss"]) == pytest.approx(sum(values) / 2)
        assert float(row["val/loss_sd"]) == pytest.approx(abs(values[0] - values[1]) / 2**0.5)


def test_cli_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    out = _cli(str(ROOT / "train.py"), "model=vilbrt", cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    # the first line says what is wrong (then Hydra lists the options); no traceback
    assert "Could not find 'model/vilbrt'" in out.stderr.splitlines()[0], out.stderr
    assert "Traceback" not in out.stderr
    out = _cli(str(ROOT / "train.py"), "data.root=/nonexistent/corpus", "experiment=none", cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == ["error: /nonexistent/corpus: data.root does not exist or is not a directory"], out.stderr
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.mark.slow  # a DDP spawn / a subprocess sweep
def test_ddp_cpu_evaluation_matches_one_process(make_cfg) -> None:
    """2 spawned processes score every test question exactly once: the metric equals the 1-process one."""
    cfg = make_cfg(*FAST[:1], "data=vqa", "trainer.max_epochs=1", "trainer.limit_train_batches=3")
    train(cfg)
    save_run_config(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    one = evaluate(make_cfg(f"ckpt_path={ckpt}", name="eval1", config_name="evaluate", tiny=False))
    two = evaluate(make_cfg(f"ckpt_path={ckpt}", "hardware=ddp_cpu", name="eval2", config_name="evaluate", tiny=False))
    assert two["test/vqa_acc"] == pytest.approx(one["test/vqa_acc"], abs=1e-6)
    assert two["test/loss"] == pytest.approx(one["test/loss"], abs=1e-6)
    preds1 = json.loads((Path(cfg.paths.output_dir).parent / "eval1" / "vqa_predictions.json").read_text())
    preds2 = json.loads((Path(cfg.paths.output_dir).parent / "eval2" / "vqa_predictions.json").read_text())
    assert preds1 == preds2 and len({p["question_id"] for p in preds2}) == len(preds2)


@pytest.mark.slow
def test_compare_experiment_holds_the_recipe_fixed_and_tables_architectures(tmp_path: Path, data_dir: Path) -> None:
    args = [
        str(ROOT / "train.py"),
        "-m",
        "experiment=compare",
        "model=visual_bert_tiny,vilbert_tiny",
        "seed=1,2",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "~callbacks.rich_progress_bar",
        f"paths.data_dir={data_dir}",
        "data.corpus.num_images=150",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "sweep" / "multirun.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model"] for r in rows) == ["vilbert_tiny", "visual_bert_tiny"]
    assert all(r["seeds"] == "2" and r["test/vqa_acc"] and r["test/vqa_acc_sd"] for r in rows)
    fixed = set()
    losses: dict[str, list[float]] = {}
    for job in range(4):
        cfg = OmegaConf.load(tmp_path / "sweep" / str(job) / ".hydra" / "config.yaml")
        fixed.add((cfg.model.optimizer.lr, cfg.model.scheduler._target_, cfg.data.batch_size, cfg.trainer.max_epochs))
        metrics = json.loads((tmp_path / "sweep" / str(job) / "metrics.json").read_text())["metrics"]
        losses.setdefault(cfg.model.encoder._target_, []).append(metrics["val/loss"])
    assert len(fixed) == 1  # the same optimiser recipe and budget for every architecture
    assert all(a != b for a, b in losses.values())  # the seeds differ


def test_lightnings_leafspec_deprecation_is_silenced_and_only_it() -> None:
    """Lightning 2.6 asks torch's deprecated LeafSpec check on every batch transfer: with `vl.pipeline` imported the
    FutureWarning is gone (it is printed without it), and another FutureWarning still shows."""
    probe = (
        "import sys, warnings\n"
        "if sys.argv[1] == 'vl':\n"
        "    import vl.pipeline\n"
        "from lightning.pytorch.utilities._pytree import _tree_flatten\n"
        "_tree_flatten({'a': 1})\n"
        "warnings.warn('another future change', FutureWarning)\n"
    )
    runs = {
        which: subprocess.run(
            [sys.executable, "-c", probe, which], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
        ).stderr
        for which in ("lightning", "vl")
    }
    assert "LeafSpec" in runs["lightning"]  # the warning exists, so its absence below means something
    assert "LeafSpec" not in runs["vl"]
    assert "another future change" in runs["vl"]


def test_the_test_stage_does_not_warn_about_the_fits_callbacks(make_cfg) -> None:
    """The test stage's fresh Trainer loads best.ckpt without the fit's callbacks by design: Lightning's warning about
    them (printed in every run before) is not shown; the fit's own warnings are untouched (`TESTER_CALLBACKS_NOTE`)."""
    import warnings

    from vl.pipeline import TESTER_CALLBACKS_NOTE

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, _ = train(make_cfg(*FAST, "data=vqa"))
    assert "test/vqa_acc" in metrics
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if m.startswith(TESTER_CALLBACKS_NOTE.replace("\\", ""))], shown
    assert TESTER_CALLBACKS_NOTE.startswith("Be aware that when using `ckpt_path`")
