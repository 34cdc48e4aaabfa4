"""`python -m vl.tools.probes --task memory_colors --data FILE --models NAME=SPEC ... --out DIR`: compare several masked-LM
scorers on one probe in one table and plot. SPEC: "minilm", "random", a `vl` .ckpt, a HF dir (bert / lxmert /
visual_bert by its config.json), "lxmert:DIR" / "visual_bert:DIR" / "bert:DIR", or a released CLIP-BERT / BERT-baseline
state dict (`mp_rank_00_model_states.pt`): "clip_bert:FILE[@BERT_CONFIG_DIR]" / "bert:FILE[@BERT_CONFIG_DIR]"."""

from __future__ import annotations

import argparse
import logging
import sys

from vl.errors import VLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vl.tools.probes", description=__doc__)
    parser.add_argument("--task", required=True, choices=["memory_colors", "visual_property_norms"])
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=SPEC")
    parser.add_argument("--out", required=True, help="output dir for the CSV / markdown / PNG report")
    parser.add_argument("--data", help="memory_colors: the Memory Colors JSONL")
    parser.add_argument("--queries", help="visual_property_norms: the query dir (template_*_pf_*.jsonl) or a JSONL")
    parser.add_argument("--labels", help="visual_property_norms: labels.txt")
    parser.add_argument("--clip-model", help="local CLIP dir: adds the '-explicit' variant of image-taking models")
    parser.add_argument("--no-random", action="store_true", help="skip the random baseline")
    parser.add_argument(
        "--average",
        choices=["query", "concept"],
        default="query",
        help="visual_property_norms: MAP over all queries of a (pf, template) as the seed (default) or per concept first",
    )
    parser.add_argument(
        "--lxmert-dropout",
        choices=["seed", "off"],
        default="seed",
        help="text-only LXMERT: as the seed's notebooks (Visual Property Norms with dropout on in the cross-modality "
        "layers, seeded by --seed; Memory Colors in eval mode; default) or eval mode for both",
    )
    parser.add_argument(
        "--sd-ddof",
        type=int,
        choices=[0, 1],
        default=None,
        help="the sd over templates: 1 = pandas .std() (the seed's Memory Colors table), 0 = np.std (its figures, "
        "the only published Visual Property Norms numbers); default: the task's published one",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from vl.eval.probes import run_probes
    from vl.eval.probes.scorers import build_scorer

    try:
        scorers = {}
        for item in args.models:
            name, sep, spec = item.partition("=")
            if not sep:
                name, spec = item, item
            scorers[name] = build_scorer(spec, name=name, device=args.device)
        results, _ = run_probes(
            args.task,
            scorers,
            out_dir=args.out,
            data=args.data,
            queries=args.queries,
            labels=args.labels,
            clip_model=args.clip_model,
            random_baseline=not args.no_random,
            seed=args.seed,
            device=args.device,
            average=args.average,
            lxmert_dropout=args.lxmert_dropout,
            sd_ddof=args.sd_ddof,
        )
    except VLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((__import__("pathlib").Path(args.out) / f"{args.task}_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
