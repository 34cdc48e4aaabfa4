"""Released checkpoints -> vl systems: read a state dict safely, rename its keys, load it loudly; one module per
checkpoint format, every public name importable from here.

- `base`: `read_state_dict` and `load_mapped_state_dict`, the one place a foreign state dict enters a model. Every
  source key either maps onto a parameter of the model (same shape), or is listed by the caller as expected-unused (a
  pooler the model does not have, a tied decoder, heads of tasks vl does not train); any other key is a `ConfigError`,
  as is a shape mismatch, so a checkpoint never loads "half" without saying so. Missing model keys (heads the
  checkpoint lacks) are logged.
- `bert`: BERT model dirs (chosen tensors, the `BertForMaskedLM` head).
- `vilbert`: `map_vilbert_key` renames a `vilbert-multi-task` / `vilbert_beta` checkpoint to `VilbertSystem` keys;
  the seed's alignment head becomes vl's ITM head (`seed_itm_transform`).
- `mm_bert`: `mbert_hybrid_state` / `vlbert_hybrid_state` take MM-BERT's hybrid init from M-BERT and VL-BERT
  checkpoints; `load_hybrid_init` loads both with the key report (an M-BERT dir is a BERT dir: `mm_bert` sits on
  `bert`).
- `vg_bert`: `vg_bert_seed_to_vl` renames VG-BERT's seed checkpoints (its stage-2/3 model or its stage-1 ImageNet
  classifier); `load_vg_bert_seed` loads one with the key report.
"""

from vl.models.checkpoints.base import load_mapped_state_dict, read_state_dict
from vl.models.checkpoints.bert import (
    BERT_MLM_HEAD_KEYS,
    bert_file_tensors,
    bert_weights_file,
    load_bert_mlm_head,
    load_bert_parts,
    load_mlm_head_file,
)
from vl.models.checkpoints.mm_bert import (
    MBERT_PARTS,
    VLBERT_PARTS,
    load_hybrid_init,
    mbert_hybrid_state,
    vlbert_hybrid_state,
)
from vl.models.checkpoints.vg_bert import (
    VG_BERT_SEED_PREFIXES,
    VG_BERT_VG_BERT_STAGE1_PREFIXES,
    load_vg_bert_seed,
    vg_bert_seed_layout,
    vg_bert_seed_to_vl,
)
from vl.models.checkpoints.vilbert import (
    SEED_ITM_PREFIX,
    VILBERT_EXPECTED_UNUSED,
    map_vilbert_key,
    seed_itm_to_vl,
    seed_itm_transform,
)

__all__ = [
    "BERT_MLM_HEAD_KEYS",
    "MBERT_PARTS",
    "SEED_ITM_PREFIX",
    "VG_BERT_SEED_PREFIXES",
    "VG_BERT_VG_BERT_STAGE1_PREFIXES",
    "VILBERT_EXPECTED_UNUSED",
    "VLBERT_PARTS",
    "bert_file_tensors",
    "bert_weights_file",
    "load_bert_mlm_head",
    "load_bert_parts",
    "load_hybrid_init",
    "load_mapped_state_dict",
    "load_mlm_head_file",
    "load_vg_bert_seed",
    "map_vilbert_key",
    "mbert_hybrid_state",
    "read_state_dict",
    "seed_itm_to_vl",
    "seed_itm_transform",
    "vg_bert_seed_layout",
    "vg_bert_seed_to_vl",
    "vlbert_hybrid_state",
]
