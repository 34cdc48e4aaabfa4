"""Task heads and objectives, one module per family, shared by every architecture (see `vl.heads.base`).

Importing this package registers every head in `HEADS`.
"""

from vl.batch import IGNORE_INDEX, EncoderOutput
from vl.heads.base import HEADS, HeadContext, Objective, ObjectiveResult, build_heads, check_compatible
from vl.heads.choice import MultipleChoice, VCRMultipleChoice
from vl.heads.grounding import RegionGrounding
from vl.heads.itm import ImageTextMatching, itm_head_from_seed, itm_labels_from_seed
from vl.heads.mlm import MaskedLanguageModeling
from vl.heads.regions import MaskedRegionClassification, MaskedRegionFeatureRegression
from vl.heads.vqa import VQAClassification, simple_classifier

__all__ = [
    "HEADS",
    "IGNORE_INDEX",
    "EncoderOutput",
    "HeadContext",
    "Objective",
    "ObjectiveResult",
    "build_heads",
    "check_compatible",
    "ImageTextMatching",
    "MaskedLanguageModeling",
    "MaskedRegionClassification",
    "MaskedRegionFeatureRegression",
    "MultipleChoice",
    "RegionGrounding",
    "VCRMultipleChoice",
    "VQAClassification",
    "itm_head_from_seed",
    "itm_labels_from_seed",
    "simple_classifier",
]
