"""Model FLOPs utilisation of a training step (forward, backward, optimiser) at a model's own size.

Builds `model=<name>` on the VQA task of the embedded corpus, tiles one real batch to `--batch` examples, and times
`--steps` steady-state steps after `--warmup` (synchronised on CUDA). FLOPs per step are the estimate the training
callback logs (`vl.callbacks.Throughput`): 6 · N · positions, N = trainable non-embedding parameters, positions = real
text tokens + real visual positions. The peak is Lightning's table for the device and dtype, or `--peak` (FLOP/s).
`bench/gpu.sh` runs it for the published sizes in bf16 on a GPU; on CPU it runs at the tiny size as a smoke test:

    python bench/mfu.py --model visual_bert --device cuda --precision bf16 --batch 64
    python bench/mfu.py --model visual_bert_tiny --device cpu --precision 32 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="visual_bert_tiny")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=["bf16", "32"], default=None, help="default: bf16 on cuda, else 32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: Lightning's table)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "32")
    if args.device == "cpu" and "--steps" not in sys.argv:  # `make bench` on a CPU machine: a smoke run
        args.steps, args.warmup, args.batch = 3, 1, min(args.batch, 16)
    from hydra import compose, initialize_config_dir
    from lightning.fabric.utilities.throughput import get_available_flops

    import vl.build  # noqa: F401  (schemas)
    from vl.callbacks import non_embedding_parameters, positions
    from vl.pipeline import build_datamodule, build_model

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="vl-mfu-")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=[
                "experiment=none",
                "data=vqa",
                f"model={args.model}",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={data_dir}/out",
                "data.corpus.num_images=120",
                f"data.max_regions={args.regions}",
            ],
        )
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    one = next(iter(dm.train_dataloader()))
    n0 = one["input_ids"].shape[0]
    reps = -(-args.batch // n0)

    def tile(v):
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n0:
            return v.repeat(reps, *([1] * (v.ndim - 1)))[: args.batch].to(args.device)
        return v

    device = torch.device(args.device)
    batch = {k: tile(v) for k, v in one.items()}
    # every position real, at the published task's lengths (VQA: ~20 question tokens; 36 regions)
    b, t = batch["input_ids"].shape
    if t < args.text_len:
        extra = args.text_len - t
        vocab = int(cfg.model.encoder.get("text_encoder", {}).get("vocab_size", 30522) or 30522)
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.randint(1000, vocab, (b, extra), device=device)], 1)
        batch["token_type_ids"] = torch.cat(
            [batch["token_type_ids"], batch["token_type_ids"][:, -1:].expand(b, extra)], 1
        )
        batch["attention_mask"] = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(b, extra)], 1)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    if "visual_mask" in batch:
        r = batch["visual_mask"].shape[1]
        if r < args.regions:
            extra = args.regions - r
            feats = batch["visual_feats"]
            batch["visual_feats"] = torch.cat([feats, torch.rand(b, extra, feats.shape[2], device=device)], 1)
            corner = torch.rand(b, extra, 2, device=device) * 0.5
            batch["visual_boxes"] = torch.cat([batch["visual_boxes"], torch.cat([corner, corner + 0.4], -1)], 1)
            batch["visual_mask"] = torch.cat(
                [batch["visual_mask"], torch.ones_like(batch["visual_mask"][:, :1]).expand(b, extra)], 1
            )
        batch["visual_mask"] = torch.ones_like(batch["visual_mask"])
    model = build_model(cfg, dm).to(device)
    model.scheduler_cfg = None
    optimizer = model.configure_optimizers()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = model.shared_step(batch, "train")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    params = non_embedding_parameters(model)
    flops = 6 * params * positions(batch)
    peak = args.peak or get_available_flops(device, dtype)
    mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (no peak for this device: --peak)"
    print(
        f"| {args.model} | {args.device} {args.precision} | batch {args.batch} | {params / 1e6:.1f} M non-emb params | "
        f"{positions(batch) / args.batch:.0f} positions/example | {seconds * 1e3:.1f} ms/step | "
        f"{flops / seconds / 1e12:.2f} TFLOP/s | MFU {mfu} |"
    )


if __name__ == "__main__":
    main()
