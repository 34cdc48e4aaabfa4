"""Machine translation by an MLM head, greedily (MM-BERT's MT task, `data=multi30k_mt`): the decoding loop
`MMBertSystem.test_step` runs over a batch of source sentences; the hypotheses' strings are
`vl.data.multi30k_text.detokenize`'s, BLEU is `vl.data.multi30k_text.seed_bleu`."""

from __future__ import annotations

from typing import Any

import torch

from vl.data.multi30k_text import detokenize as detokenize_ids


@torch.no_grad()
def greedy_translate(
    model: Any,
    collator: Any,
    examples: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_steps: int = 49,
    seq_len: int | None = 150,
    detokenize: str = "seed",
) -> list[str]:
    """Greedy autoregressive EN -> DE, batched over sentences: ``[CLS] EN [SEP] DE so far [MASK] [SEP]``, the MLM
    head's arg-max at [MASK] is written and a new [MASK] appended; a sentence stops at [STOP] or after
    ``max_steps`` (49 = the seed's ``while ... curr_len <= 48`` loop, ``curr_len`` from 0). ``seq_len``: the joint text + boxes limit, applied once, to the first step's rows, as the seed's
    generation (its dataset truncates with SEQ_LEN 150, then the generated tokens are appended): a row keeps the
    boxes it kept there, and its text is never cut again (re-truncating each step with the training limit, 64,
    dropped the [MASK] itself once the text outgrew half of it; the source keeps the tokens the collator's
    `max_text_len` gave it at the first step: the collator's ``mt_truncation`` is "source" while decoding, so a long
    source is shortened and the [MASK] stays). ``detokenize``: how each sentence's generated ids (up to, not
    including, [STOP]) become its string (`vl.data.multi30k_text.detokenize`: "seed", the seed's join of the token strings,
    or "hf", the tokenizer's ``decode``)."""
    stop = tokenizer.convert_tokens_to_ids("[STOP]")
    mask = tokenizer.mask_token_id
    head = model.objectives["mlm"]
    generated: list[list[int]] = [[] for _ in examples]
    done = [False] * len(examples)
    kept_regions: dict[int, int] = {}  # row -> regions kept by the first step's truncation
    training_seq_len, max_text_len = collator.seq_len, collator.max_text_len
    truncation = getattr(collator, "mt_truncation", None)
    if truncation is not None:  # the rows' [MASK] must stay: a long source is shortened instead
        collator.mt_truncation = "source"
    try:
        for step in range(max_steps):
            live = [i for i, d in enumerate(done) if not d]
            if not live:
                break
            rows = []
            for i in live:
                row = {"text": examples[i]["text"], "text_b_ids": [*generated[i], mask], "index": i}
                if examples[i].get("visual") is not None:
                    row["visual"] = examples[i]["visual"]
                rows.append(row)
            collator.seq_len = seq_len if step == 0 else None
            collator.max_text_len = max_text_len + step  # the source keeps the tokens it had at the first step
            batch = collator(rows)
            if "visual_mask" in batch:
                if step == 0:
                    kept_regions.update(zip(live, batch["visual_mask"].sum(1).tolist()))
                else:  # the first step's boxes; the whole-image box still averages every region
                    batch["image_mean_mask"] = batch["visual_mask"].bool().clone()
                    for j, i in enumerate(live):
                        batch["visual_mask"][j, int(kept_regions[i]) :] = 0
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = model(batch)
            position = batch["attention_mask"].sum(1) - 2  # the [MASK] before the last [SEP]
            states = out.text[torch.arange(len(live), device=position.device), position]
            predicted = head.logits(states).argmax(-1).tolist()
            for i, token in zip(live, predicted):
                if token == stop:
                    done[i] = True
                else:
                    generated[i].append(int(token))
    finally:
        collator.seq_len, collator.max_text_len = training_seq_len, max_text_len
        if truncation is not None:
            collator.mt_truncation = truncation
    return [detokenize_ids(tokenizer, g, detokenize) for g in generated]
