"""A val / test split with fewer examples than processes is refused when the stage starts (a rank with none would
never join the others' metric sync: the run would hang at the epoch's end), and nothing changes for one process or
for a split every rank gets a share of."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from vl.data.samplers import UnpaddedDistributedSampler
from vl.errors import ConfigError


@pytest.fixture
def vqa(make_cfg):
    dm = instantiate(make_cfg("experiment=none", "data=vqa", "data.corpus.num_images=40").data)
    dm.prepare_data()
    return dm


@pytest.mark.parametrize("stage, split", [("fit", "val"), ("validate", "val"), ("test", "test")])
def test_a_split_smaller_than_the_world_is_refused_when_the_stage_starts(vqa, stage, split) -> None:
    vqa.setup(stage)
    n = len(vqa.datasets[split])
    assert n >= 2
    vqa.trainer = SimpleNamespace(world_size=n, global_rank=0, current_epoch=0)
    vqa.setup(stage)  # as many processes as examples: each rank scores one
    assert [len(UnpaddedDistributedSampler(vqa.datasets[split], num_replicas=n, rank=r)) for r in (0, n - 1)] == [1, 1]
    vqa.trainer = SimpleNamespace(world_size=n + 1, global_rank=0, current_epoch=0)
    with pytest.raises(ConfigError, match=rf"the {split} split has {n} example\(s\), fewer than this run's {n + 1} "):
        vqa.setup(stage)
    assert len(UnpaddedDistributedSampler(vqa.datasets[split], num_replicas=n + 1, rank=n)) == 0  # what it prevents
    vqa.setup("predict")  # no metrics to sync: not refused
    vqa.trainer = None
    vqa.setup(stage)  # one process
