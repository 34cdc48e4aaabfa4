"""vl against Hugging Face at equal sizes and equal weights: seconds per forward + backward on the same batch.

Rows (each at the tiny size of the CPU defaults and at the published BERT-base size):
  VisualBERT   vl `model=visual_bert`'s encoder, loaded from a saved `transformers.VisualBertModel` dir, against that
               `VisualBertModel`; loss = sum of the text states (both sides identical work).
  BERT MLM     vl `model=bert` (CLIP-BERT's system without the image token) with its MLM head, loaded from a saved
               `BertForMaskedLM` dir, against `BertForMaskedLM(labels=...)`, 15 % of the tokens masked. vl computes
               the vocabulary logits only at the masked positions (`vl.heads.mlm`); the row `BERT MLM, vl with
               every position's logits` computes them everywhere as HF does, to show that this is the cause.
Paired per step: after one warm-up step a side, vl and HF steps alternate (`--steps` pairs at the published size,
`--tiny-steps` at the tiny size; the order flips from pair to pair); a repeat's figure is its median pair ratio vl /
HF; prints min and median over the repeats. Goal: <= 1.05 (vl adds no cost over HF for the same computation).

    python bench/vs_hf.py [--steps 5] [--tiny-steps 30] [--repeats 3] [--threads 1] [--sizes tiny,published]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _table import emit, paired_seconds  # noqa: E402

SIZES = {  # (hidden, layers, heads, intermediate, batch, text tokens, regions)
    "tiny": (64, 2, 4, 256, 32, 20, 10),
    "published": (768, 12, 12, 3072, 8, 32, 36),
}
VISUAL_DIM = 2048
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}


def paired(vl_step, hf_step, steps: int) -> tuple[float, float, float]:
    """(median pair ratio vl / HF, median vl seconds, median HF seconds) over `steps` pairs after one warm-up step a
    side (`paired_seconds`: the two steps of a pair run back to back, so the machine's drift cancels)."""
    vl_step()
    hf_step()
    pairs = paired_seconds(vl_step, hf_step, steps)
    return (
        statistics.median(a / b for a, b in pairs),
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
    )


def batch_for(batch: int, text: int, regions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, text), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, text, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, text, dtype=torch.long),
        "visual_feats": torch.randn(batch, regions, VISUAL_DIM, generator=g),
        "visual_boxes": torch.rand(batch, regions, 4, generator=g),
        "visual_mask": torch.ones(batch, regions, dtype=torch.long),
        "mlm_labels": labels,
        "index": torch.arange(batch),
    }


def visual_bert_pair(size: tuple, tmp: Path):
    from transformers import VisualBertConfig, VisualBertModel

    from vl.models.visual_bert import VisualBertEncoder

    hidden, layers, heads, inter, batch, text, regions = size
    config = VisualBertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        visual_embedding_dim=VISUAL_DIM,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = VisualBertModel(config, add_pooling_layer=False)
    hf.save_pretrained(tmp / "visual_bert")
    vl = VisualBertEncoder(data_info={"visual_dim": VISUAL_DIM}, text_encoder={"pretrained": str(tmp / "visual_bert")})
    b = batch_for(batch, text, regions)

    def hf_step() -> None:
        out = hf(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            visual_embeds=b["visual_feats"],
            visual_attention_mask=b["visual_mask"],
        )
        out.last_hidden_state[:, :text].sum().backward()

    def vl_step() -> None:
        vl(b).text.sum().backward()

    return vl_step, hf_step


def bert_mlm_pair(size: tuple, tmp: Path, *, all_logits: bool):
    from transformers import BertConfig, BertForMaskedLM

    from vl.models.clip_bert import ClipBertSystem

    hidden, layers, heads, inter, batch, text, _ = size
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = BertForMaskedLM(config)
    hf.save_pretrained(tmp / "bert")
    system = ClipBertSystem(
        encoder={
            "_target_": "vl.models.clip_bert.ClipBertEncoder",
            "text_encoder": {"pretrained": str(tmp / "bert"), "dropout": 0.0},
            "use_image": False,
        },
        objectives=["mlm"],
        data_info={},
        optimizer=OPT,
    )
    head = system.objectives["mlm"]
    b = batch_for(batch, text, 0)

    def hf_step() -> None:
        hf(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
            labels=b["mlm_labels"],
        ).loss.backward()

    def vl_step() -> None:
        out = system(b)
        if all_logits:
            logits = head.logits(out.text)
            F.cross_entropy(logits.flatten(0, 1), b["mlm_labels"].flatten(), ignore_index=-100).backward()
        else:
            head(out, b).loss.backward()

    return vl_step, hf_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="steps per side at the published size")
    parser.add_argument("--tiny-steps", type=int, default=30, help="steps per side at the tiny size (~25 ms each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="tiny,published")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(
        f"forward + backward, {torch.get_num_threads()} torch thread(s), median pair ratio of {args.tiny_steps} (tiny) / "
        f"{args.steps} (published) step pairs per repeat"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            steps = args.tiny_steps if size_name == "tiny" else args.steps
            rows = {
                "VisualBERT encoder": lambda size: visual_bert_pair(size, Path(tmp)),
                "BERT MLM": lambda size: bert_mlm_pair(size, Path(tmp), all_logits=False),
                "BERT MLM, vl with every position's logits": lambda size: bert_mlm_pair(
                    size, Path(tmp), all_logits=True
                ),
            }
            for name, make in rows.items():
                vl_step, hf_step = make(size)
                ratios = []
                for _ in range(args.repeats):
                    ratio, a, b = paired(vl_step, hf_step, steps)
                    ratios.append(ratio)
                print(
                    f"  {name} ({size_name}, batch {size[4]}): vl {1000 * a:.1f} ms, HF {1000 * b:.1f} ms; vl / HF "
                    f"min {min(ratios):.3f} median {statistics.median(ratios):.3f}"
                )
                why = ""
                if name == "BERT MLM":
                    why = "vl computes vocabulary logits only at the masked positions (vl.heads.mlm)"
                elif name.startswith("BERT MLM, vl with"):
                    why = "the same work as HF: the gap of the row above is the masked-only logits"
                emit(f"vl / HF: {name} ({size_name})", ratios, goal=1.05, why=why)


if __name__ == "__main__":
    main()
