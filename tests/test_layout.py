"""Layout checks run before any process group starts: one line naming the problem."""
from __future__ import annotations

import pytest
from conftest import TINY

from vlpretrain.config import ConfigError, load_config
from vlpretrain.parallel.mesh import Layout, resolve_layout
from vlpretrain.parallel.pipeline import stage_specs, stages_of_rank


def _cfg(*overrides: str):
    return load_config(TINY / "stage2.yaml", ["train.global_batch_size=16", "train.micro_batch_size=2",
                                              *overrides])


def test_dp_auto_and_explicit():
    # derived once: dp, microbatches per pipeline (16 / (2 x dp)), the split, the schedule's placement
    assert resolve_layout(_cfg("parallel.tp=2", "parallel.pp=2", "parallel.layer_split=uniform"), 8) == \
        Layout(dp=2, tp=2, pp=2, vpp=1, schedule="1f1b", n_microbatches=4, split=(2, 2))
    assert resolve_layout(_cfg(), 1) == Layout(1, 1, 1, 1, "1f1b", 8, (4,))
    lay = resolve_layout(_cfg("parallel.pp=2", "parallel.vpp=2", "parallel.schedule=zbv"), 2)
    assert lay.stages_of_rank(0) == [0, 3] and sum(lay.split) == 4 and lay.n_microbatches == 8
    assert resolve_layout(_cfg("parallel.dp=4"), 4).dp == 4


def test_dp_shard_hsdp_layout():
    # 0 (the default): FSDP over all dp ranks; d < dp: shard groups of d, dp / d replicas (HSDP)
    plain = resolve_layout(_cfg("parallel.dp=4"), 4)
    assert (plain.dp_shard, plain.dp_replicate) == (4, 1)
    hsdp = resolve_layout(_cfg("parallel.dp_shard=2", "parallel.tp=2"), 8)  # dp: auto = 4
    assert (hsdp.dp, hsdp.dp_shard, hsdp.dp_replicate) == (4, 2, 2)
    assert resolve_layout(_cfg("parallel.dp=4", "parallel.dp_shard=1"), 4).dp_replicate == 4


@pytest.mark.parametrize("overrides, world, key, message", [
    (["parallel.tp=2"], 3, "parallel.tp", "world size 3 is not divisible by tp x pp = 2"),
    (["parallel.pp=2"], 3, "parallel.pp", "world size 3 is not divisible by tp x pp = 2"),
    (["parallel.dp=2"], 4, "parallel.dp", "dp x tp x pp = 2 x 1 x 1 = 2 but the world size is 4"),
    (["parallel.dp=auto", "train.global_batch_size=6", "train.micro_batch_size=2"], 2, "train.global_batch_size",
     "6 is not divisible by micro_batch_size x dp = 2 x 2"),
    (["parallel.pp=2", "train.global_batch_size=2", "train.micro_batch_size=2"], 2, "train.global_batch_size",
     "1 microbatches per step"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b", "parallel.layer_split=uniform",
      "train.global_batch_size=6"], 2, "train.global_batch_size", "multiple of pp=2"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=127"], 2, "train.seq_len",
     "divisible by tp=2"),
    (["parallel.dp_shard=3"], 4, "parallel.dp_shard", "3 does not divide dp=4"),  # dp: auto, from the world
])
def test_bad_layouts_fail_with_one_line(overrides, world, key, message):
    # like every config error: one line, "config error: <the key to change>: ..."
    with pytest.raises(ConfigError) as e:
        resolve_layout(_cfg(*overrides), world)
    text = str(e.value)
    assert text.startswith(f"config error: {key}: ") and message in text and "\n" not in text


@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=3"], "parallel.tp"),  # does not divide the 4 heads
    (["model.ffn_dim=342", "parallel.tp=4"], "parallel.tp"),  # divides heads, not the FFN
    (["parallel.pp=4", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"], "parallel.vpp"),  # 8 > 6 parts
    (["parallel.pp=9"], "parallel.pp"),  # 9 > 6 parts: the key the user set, not vpp (which is 1)
    (["parallel.pp=0"], "parallel.pp"),
    (["parallel.vpp=0"], "parallel.vpp"),
    (["parallel.dp=0"], "parallel.dp"),
    (["parallel.dp=4", "parallel.dp_shard=3"], "parallel.dp_shard"),  # does not divide dp
    (["parallel.dp=2", "parallel.dp_shard=4"], "parallel.dp_shard"),  # a shard group larger than dp
    (["parallel.dp_shard=-1"], "parallel.dp_shard"),
    (["parallel.pp=2", "parallel.layer_split=[1,2]"], "parallel.layer_split"),  # sums to 3, not 4
    (["parallel.pp=2", "parallel.layer_split=[1,1,2]"], "parallel.layer_split"),  # 3 entries for 2 stages
    (["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=1f1b"], "parallel.schedule"),
    (["parallel.pp=2", "parallel.schedule=interleaved_1f1b"], "parallel.schedule"),
    (["parallel.pp=2", "parallel.vpp=3", "parallel.schedule=zbv"], "parallel.schedule"),
    (["parallel.vpp=2"], "parallel.vpp"),
])
def test_bad_layouts_in_the_config(overrides, key):
    with pytest.raises(ConfigError, match=f"^config error: {key}"):
        _cfg(*overrides)


def test_stage_specs_and_rank_assignment():
    specs = stage_specs([0, 2, 1, 1])
    assert specs[0].has_embed and specs[0].layers == () and not specs[0].has_head
    assert specs[1].layers == (0, 1) and specs[3].layers == (3,) and specs[3].has_head
    with pytest.raises(ValueError, match="holds no part"):
        stage_specs([2, 0, 2])
    assert stages_of_rank(1, 2, 2, "interleaved_1f1b") == [1, 3]
    assert stages_of_rank(0, 2, 2, "zbv") == [0, 3] and stages_of_rank(1, 2, 2, "zbv") == [1, 2]
