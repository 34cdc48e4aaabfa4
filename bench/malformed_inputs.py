"""Malformed inputs vs clean errors: feeds `vl` bad checkpoints, planted pickles, damaged / non-finite feature files
and out-of-range counts through the public entry points (`train`, `evaluate`, `python -m vl.tools.probes`, the data
modules and feature readers) and prints one table row per input with what happened:

    clean        a one-line vl error (ConfigError / DataError) naming the file or key
    TRACEBACK    any other exception (what a user would see as a traceback)
    ACCEPTED     no error at all (trained / evaluated on bad input)
    RAN CODE     a planted pickle executed (its marker file exists)

    python bench/malformed_inputs.py [--only SUBSTRING]

Only public entry points are used, so the same script measures an older checkout (copy it into that tree's bench/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAST = [
    "experiment=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
]


class Planted:
    """Unpickling calls `open(marker, "w")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    import numpy as np
    import torch

    from tests.conftest import compose_cfg, save_run_config
    from vl.data.scenes import SceneSettings, ensure_corpus
    from vl.errors import VLError
    from vl.pipeline import evaluate, train

    work = Path(tempfile.mkdtemp(prefix="vl-malformed-"))
    data_dir = work / "data"
    counter = iter(range(10**6))

    def cfg(*overrides: str, config_name: str = "train"):
        out = work / f"run{next(counter)}"
        return compose_cfg(
            list(overrides), output_dir=out, data_dir=data_dir, config_name=config_name, tiny=config_name == "train"
        )

    def trained(*overrides: str) -> Path:
        c = cfg(*FAST, *overrides)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train(c)
        save_run_config(c)
        return Path(c.paths.output_dir)

    vb = trained("data=vqa")
    cb = trained("model=clip_bert_tiny", "data=vlp")
    good = vb / "checkpoints" / "last.ckpt"
    raw = good.read_bytes()
    marker = work / "MARKER"
    files = work / "files"
    files.mkdir()

    def put(name: str, blob: bytes) -> Path:
        path = files / name
        path.write_bytes(blob)
        return path

    def planted_ckpt(dst: Path) -> Path:
        ck = torch.load(good, weights_only=True)
        ck["planted"] = Planted(marker)
        torch.save(ck, dst)
        return dst

    mid = len(raw) // 3
    ckpts: dict[str, Path] = {
        "missing": files / "missing.ckpt",
        "empty": put("empty.ckpt", b""),
        "truncated (half)": put("half.ckpt", raw[: len(raw) // 2]),
        "kill-damaged (first 4 KiB)": put("head.ckpt", raw[:4096]),
        "same-size damage (4 KiB zeroed)": put("zeroed.ckpt", raw[:mid] + bytes(4096) + raw[mid + 4096 :]),
        "text file": put("text.ckpt", b"hello\n"),
        "JSON file": put("json.ckpt", b'{"a": 1}\n'),
        "directory": files,
        "plain state dict": files / "sd.ckpt",
        "another architecture (CLIP-BERT)": cb / "checkpoints" / "last.ckpt",
        "planted pickle": planted_ckpt(files / "planted.ckpt"),
    }
    torch.save(torch.load(good, weights_only=True)["state_dict"], ckpts["plain state dict"])
    weights_only = files / "weights_only.ckpt"
    ck = torch.load(good, weights_only=True)
    torch.save({"state_dict": ck["state_dict"], "hyper_parameters": ck["hyper_parameters"]}, weights_only)

    cases: list[tuple[str, Callable[[], object], list[str]]] = []  # (name, action, strings the error must name)
    for what, path in ckpts.items():
        cases.append(
            (f"train ckpt_path: {what}", lambda p=path: train(cfg(*FAST, "data=vqa", f"ckpt_path={p}")), [str(path)])
        )
    cases.append(
        (
            "train ckpt_path: weights only",
            lambda: train(cfg(*FAST, "data=vqa", f"ckpt_path={weights_only}")),
            [str(weights_only)],
        )
    )
    cases.append(
        (
            "train ckpt_path: other sizes",
            lambda: train(cfg(*FAST, "data=vqa", f"ckpt_path={good}", "model.encoder.text_encoder.hidden_size=64")),
            [str(good)],
        )
    )
    # evaluate: a checkpoint carries its own run record and is evaluated as what it holds, so another architecture's
    # checkpoint dropped into this run's dir is refused only without one (written before vl stored it)
    legacy = torch.load(ckpts["another architecture (CLIP-BERT)"], weights_only=True)
    del legacy["vl_run"]
    ckpts["another architecture (CLIP-BERT)"] = files / "legacy_clip_bert.ckpt"
    torch.save(legacy, ckpts["another architecture (CLIP-BERT)"])
    for what, path in ckpts.items():  # evaluate: the file inside the run's checkpoints dir

        def run_eval(p=path):
            ckpt_dir = vb / "checkpoints"
            target = ckpt_dir if p.is_dir() else ckpt_dir / (f"bad-{p.name}" if p.exists() else "absent.ckpt")
            copied = p.is_file() and p.parent != ckpt_dir
            if copied:
                shutil.copy(p, target)
            try:
                return evaluate(cfg(f"ckpt_path={target}", config_name="evaluate"))
            finally:
                if copied:
                    target.unlink()

        cases.append((f"evaluate ckpt_path: {what}", run_eval, ["ckpt_path"]))
    for task in ("memory_colors", "zero_shot_retrieval"):

        def run_task(task=task):
            target = vb / "checkpoints" / "planted_task.ckpt"
            planted_ckpt(target)
            try:
                return evaluate(cfg(f"ckpt_path={target}", f"task={task}", config_name="evaluate"))
            finally:
                target.unlink()

        cases.append((f"evaluate task={task}: planted pickle", run_task, ["ckpt_path"]))
    for what in ("missing", "truncated (half)", "text file", "planted pickle"):
        p = ckpts[what]
        cases.append(
            (f"model.init_from: {what}", lambda p=p: train(cfg(*FAST, "data=vqa", f"model.init_from={p}")), [str(p)])
        )
    ds_planted = files / "ds" / "mp_rank_00_model_states.pt"
    ds_planted.parent.mkdir()
    torch.save({"module": {"bert.x": torch.zeros(1)}, "planted": Planted(marker)}, ds_planted)
    st_bad = put("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    for what, p in {
        "missing": files / "none.pt",
        "truncated (half)": ckpts["truncated (half)"],
        "text file": ckpts["text file"],
        "planted pickle": ds_planted,
        "damaged safetensors": st_bad,
    }.items():
        cases.append(
            (
                f"model.state_dict_path: {what}",
                lambda p=p: train(cfg(*FAST, "model=clip_bert_tiny", "data=vlp", f"model.state_dict_path={p}")),
                [str(p)],
            )
        )

    def probes(spec: str):
        from vl.tools.probes import main as probes_main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = probes_main(["--task", "memory_colors", "--models", f"x={spec}", "--out", str(work / "probes")])
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        if rc == 2 and len(lines) == 1:
            raise _Clean(lines[0])
        return rc

    lx = files / "lxmert"
    lx.mkdir()
    from vl.models.text_only import tiny_lxmert_config

    tiny_lxmert_config().to_json_file(lx / "config.json")
    shutil.copy(ds_planted, lx / ds_planted.name)

    def probes_ckpt():
        target = vb / "checkpoints" / "planted_probe.ckpt"
        planted_ckpt(target)
        try:
            return probes(str(target))
        finally:
            target.unlink()

    cases.append(("python -m vl.tools.probes: planted vl checkpoint", probes_ckpt, ["planted_probe.ckpt"]))
    cases.append(
        (
            "python -m vl.tools.probes: planted DeepSpeed state",
            lambda: probes(f"lxmert:{lx}"),
            ["mp_rank_00_model_states.pt"],
        )
    )

    corpus = ensure_corpus(data_dir, SceneSettings(num_images=150), "all")

    def data_case(data: str, rel: str, blob: bytes):
        def run():
            from hydra.utils import instantiate

            copy = work / f"corpus{next(counter)}"
            shutil.copytree(corpus, copy)
            (copy / rel).write_bytes(blob)
            c = cfg("experiment=none", f"data={data}", f"data.root={copy}")
            dm = instantiate(c.data)
            dm.prepare_data()
            dm.setup("fit")
            next(iter(dm.train_dataloader()))

        return run

    evil = pickle.dumps([Planted(marker)], protocol=2)
    for data, rel in (
        ("vqa", "vqa/cache/train_target.pkl"),
        ("vqa", "vqa/cache/trainval_ans2label.pkl"),
        ("refcoco", "refcoco+/refs(unc).p"),
        ("retrieval", "retrieval/hard_negative.pkl"),
    ):
        cases.append((f"data={data}: planted {rel}", data_case(data, rel, evil), [Path(rel).name]))

    def lmdb_planted():
        import lmdb

        from vl.data.features.region_lmdb import RegionFeatureReader

        copy = work / f"lmdb{next(counter)}"
        shutil.copytree(corpus / "regions.lmdb", copy)
        reader = RegionFeatureReader(copy)
        image_id = reader.ids()[0]
        reader.close()
        env = lmdb.open(str(copy), subdir=True, lock=False)
        with env.begin(write=True) as txn:
            txn.put(image_id.encode(), pickle.dumps({"image_id": Planted(marker)}))
        env.close()
        return RegionFeatureReader(copy)[image_id]

    cases.append(("regions.lmdb: planted record", lmdb_planted, ["lmdb"]))

    def non_finite(fmt: str):
        def run():
            from vl.data.features import region_hdf5, region_lmdb
            from vl.data.features.clip_hdf5 import ClipFeatureReader, write_clip_hdf5

            rec = {
                "image_id": "7",
                "image_h": 10,
                "image_w": 10,
                "boxes": np.array([[0, 0, 5, 5]], np.float32),
                "features": np.array([[1.0, np.nan]], np.float32),
            }
            path = work / f"nonfinite{next(counter)}.{fmt}"
            if fmt == "lmdb":
                region_lmdb.write_region_lmdb(path, [rec])
                return region_lmdb.RegionFeatureReader(path)["7"]
            if fmt == "hdf5":
                region_hdf5.write_region_hdf5(path, [rec])
                return region_hdf5.HDF5RegionReader(path)["7"]
            write_clip_hdf5(path, ["7"], np.array([[np.inf, 1.0]], np.float32))
            return ClipFeatureReader(path)["7"]

        return run

    for fmt in ("lmdb", "hdf5", "clip.hdf5"):
        cases.append((f"non-finite features in {fmt}", non_finite(fmt), ["nonfinite"]))
    for override in (
        "data.batch_size=-64",
        "data.batch_size=0",
        "data.batch_size_per_device=0",
        "trainer.max_epochs=0",
        "trainer.max_steps=0",
        "trainer.max_steps=-5",
        "trainer.limit_train_batches=-1",
        "trainer.val_check_interval=0",
    ):
        cases.append(
            (f"config {override}", lambda o=override: train(cfg(*FAST, "data=vqa", o)), [override.split("=")[0]])
        )
    cases.append(
        (
            "config pretrain.data.batch_size=-32",
            lambda: train(
                cfg(
                    "pretrain.trainer.max_epochs=1",
                    "trainer.max_epochs=1",
                    "+pretrain.trainer.limit_train_batches=2",
                    "trainer.limit_train_batches=2",
                    "pretrain.data.batch_size=-32",
                )
            ),
            ["pretrain.data.batch_size"],
        )
    )

    rows = []
    for name, action, names in cases:
        if args.only not in name:
            continue
        if marker.exists():
            marker.unlink()
        status, detail = "ACCEPTED", ""
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                action()
        except (_Clean, VLError) as e:
            text = str(e)
            ok = "\n" not in text and any(n in text for n in names)
            status, detail = ("clean" if ok else "unclear"), text.splitlines()[0] if text else ""
        except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
            status, detail = "TRACEBACK", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if marker.exists():
            status = "RAN CODE"
        rows.append((name, status, detail))
        print(f"| {name} | {status} | {detail[:150].replace('|', '/')} |", flush=True)
    clean = sum(1 for _, s, _ in rows if s == "clean")
    ran = sum(1 for _, s, _ in rows if s == "RAN CODE")
    print(f"\n{clean} of {len(rows)} malformed inputs give a clean one-line error; {ran} ran planted code")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if clean == len(rows) else 1


class _Clean(Exception):
    """A CLI that printed exactly one `error:` line and exited 2."""


if __name__ == "__main__":
    sys.exit(main())
