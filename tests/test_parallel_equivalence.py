"""Every parallel layout against the single-process run of the same model, data and seed (gloo, CPU).

Each torchrun launch runs several layout cases (start-up dominates the cost on 2 cores); the worker
(tests/dist/equivalence_worker.py) measures, per rank, the loss, the gradient of every parameter the rank
holds, the global gradient norm, and the parameters after one AdamW step, against the reference; and the
loss, gradients and norm of the same step with its rows placed by cost (``data.balance: rows``). Cases with
``data.packing`` feed packed rows (positions restarting per document, document-causal masks) through every
pipeline stage, with the varlen attention kernel against the reference's dense mask.

Tolerances:
- loss and gradient norm: 1e-6 relative (fp32 sums in a different order; observed <= 5e-7);
- gradients: max |diff| / max |reference| per parameter <= 2e-6 (observed <= 7e-7; a wrong reduction, a
  missing all-reduce or a wrong scale shows as O(1) relative error);
- parameters after one AdamW step (lr 1e-3, eps 1e-6): 1e-5 absolute. The first Adam step is
  lr * g / (|g| + eps), which amplifies gradient noise by up to lr / eps = 1e3, so 1e-8 noise can move a
  weight by 1e-5; a wrong gradient moves it by O(lr) = 1e-3, 100x the tolerance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "equivalence_worker.py"

SPLIT2 = {"parallel.layer_split": [2, 2]}
DENSE_REF = {"ref_overrides": {"model.attention": "sdpa_mask"}}
CASES = {
    2: [
        {"name": "tp2", "overrides": {"parallel.tp": 2}},
        {"name": "tp2_sp", "overrides": {"parallel.tp": 2, "parallel.sequence_parallel": True}},
        {"name": "tp2_sp_full_ac", "overrides": {"parallel.tp": 2, "parallel.sequence_parallel": True,
                                                 "parallel.activation_checkpointing": "full"}},
        {"name": "pp2_1f1b", "overrides": {"parallel.pp": 2, **SPLIT2}},
        {"name": "pp2_1f1b_text_only", "images": False, "overrides": {"parallel.pp": 2, **SPLIT2}},
        {"name": "pp2_vpp2_interleaved", "overrides": {"parallel.pp": 2, "parallel.vpp": 2,
                                                       "parallel.schedule": "interleaved_1f1b",
                                                       "parallel.layer_split": "uniform"}},
        *[{"name": f"pp2_vpp2_{sched}", "overrides": {"parallel.pp": 2, "parallel.vpp": 2, "parallel.schedule": sched,
                                                      "parallel.layer_split": "uniform"}}
          for sched in ("zero_bubble", "zbv", "dualpipev")],
        {"name": "pp2_gpipe_uneven_split", "overrides": {"parallel.pp": 2, "parallel.schedule": "gpipe",
                                                         "parallel.layer_split": [1, 3]}},
        {"name": "pp2_stage1_frozen_rank", "overrides": {"parallel.pp": 2, "train.stage": 1, **SPLIT2}},
        # packed rows: the varlen kernel (no S x S mask) in the layout, the dense mask in the reference
        {"name": "pp2_packed_rows", "overrides": {"parallel.pp": 2, "data.packing": True, **SPLIT2,
                                                  "model.attention": "varlen"}, **DENSE_REF},
        {"name": "tp2_sp_packed_rows", "overrides": {"parallel.tp": 2, "parallel.sequence_parallel": True,
                                                     "data.packing": True, "model.attention": "varlen"},
         **DENSE_REF},
        # the first stage's images split across TP ranks (the default) against the paper's recomputation
        {"name": "tp2_vision_replicate", "overrides": {"parallel.tp": 2, "parallel.vision_split": "replicate"}},
        {"name": "tp2_stage1", "overrides": {"parallel.tp": 2, "train.stage": 1}},
        {"name": "tp2_stage3_fewer_images_than_ranks", "images": 1, "overrides": {
            "parallel.tp": 2, "train.stage": 3, "train.micro_batch_size": 1, "train.global_batch_size": 4}},
        {"name": "fsdp2", "overrides": {"parallel.dp": 2}},
        {"name": "fsdp2_stage3", "overrides": {"parallel.dp": 2, "train.stage": 3}},
        # frozen towers' outputs reused per image (train.frozen_tower_cache_mb): FSDP units gathered alike on
        # every rank whether its images hit or not; stage 3 caches SAM only (SigLIP learns), stage 2 both
        *[{"name": f"fsdp2_stage{stage}_tower_cache", "tower_cache": towers,
           "overrides": {"parallel.dp": 2, "train.stage": stage, "train.frozen_tower_cache_mb": 64}}
          for stage, towers in ((3, ["sam"]), (2, ["sam", "siglip"]))],
        {"name": "tp2_stage2_tower_cache", "tower_cache": ["sam", "siglip"],
         "overrides": {"parallel.tp": 2, "train.stage": 2, "train.frozen_tower_cache_mb": 64}},
    ],
    4: [
        {"name": "dp2_pp2_stage3_auto_split", "overrides": {"parallel.dp": 2, "parallel.pp": 2,
                                                             "parallel.layer_split": "auto", "train.stage": 3}},
        {"name": "tp2_pp2_vpp2_sp_packed", "overrides": {"parallel.tp": 2, "parallel.pp": 2, "parallel.vpp": 2,
                                                         "parallel.schedule": "interleaved_1f1b",
                                                         "parallel.sequence_parallel": True, "data.packing": True,
                                                         "parallel.layer_split": [0, 2, 1, 1],
                                                         "model.attention": "varlen"}, **DENSE_REF},
        # HSDP (parallel.dp_shard): FSDP2 over a 2-D (replicate, shard) mesh, gradients reduce-scattered within
        # a shard group and all-reduced across the replicas
        {"name": "hsdp_dp4_shard2", "overrides": {"parallel.dp": 4, "parallel.dp_shard": 2}},
        {"name": "hsdp_dp4_shard1_stage3", "overrides": {"parallel.dp": 4, "parallel.dp_shard": 1,
                                                          "train.stage": 3}},
        {"name": "hsdp_dp2_shard1_tp2_sp", "overrides": {"parallel.dp": 2, "parallel.dp_shard": 1, "parallel.tp": 2,
                                                          "parallel.sequence_parallel": True}},
        {"name": "hsdp_dp2_shard1_pp2", "overrides": {"parallel.dp": 2, "parallel.dp_shard": 1, "parallel.pp": 2,
                                                       **SPLIT2}},
    ],
    8: [
        {"name": "dp2_tp2_pp2_sp_1f1b", "overrides": {"parallel.dp": 2, "parallel.tp": 2, "parallel.pp": 2,
                                                      "parallel.sequence_parallel": True,
                                                      "parallel.layer_split": [1, 3]}},
        {"name": "dp2_tp2_pp2_stage3_sp", "overrides": {"parallel.dp": 2, "parallel.tp": 2, "parallel.pp": 2,
                                                       "parallel.sequence_parallel": True, "train.stage": 3,
                                                       **SPLIT2}},
        {"name": "dp2_tp2_pp2_stage1_selective_ac", "overrides": {
            "parallel.dp": 2, "parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True,
            "parallel.activation_checkpointing": "selective", "train.stage": 1, **SPLIT2}},
    ],
}


def _launch(world: int, tmp: Path) -> list[dict]:
    cases = tmp / "cases.json"
    cases.write_text(json.dumps(CASES[world]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(WORKER), str(tmp), str(cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", sorted(CASES))
def test_layouts_match_single_process(world, tmp_path):
    ranks = _launch(world, tmp_path)
    for case in CASES[world]:
        name = case["name"]
        per_rank = [r[name] for r in ranks]
        owned = set().union(*(r["owned"] for r in per_rank))
        for r, res in enumerate(per_rank):
            where = f"{name} rank {r} (dp, tp, pp, vpp) = {res['layout']} split {res['split']}"
            assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-6), where
            assert res["grad_norm"] == pytest.approx(res["ref_grad_norm"], rel=1e-6), where
            # frozen parameters get no gradient; every trainable one this rank holds gets one
            assert res["grads"] == res["ref_grads_owned"], where
            assert res["grad_rel_max"] <= 2e-6, f"{where}: worst gradient {res['worst_grad']}"
            assert res["param_abs_max"] <= 1e-5, where
            # the same rows placed by cost on other ranks and microbatches: the same global mean
            assert res["balanced_loss"] == pytest.approx(res["ref_loss"], rel=1e-6), where
            assert res["balanced_grad_norm"] == pytest.approx(res["ref_grad_norm"], rel=1e-6), where
            assert res["balanced_grads"] == res["grads"], where
            assert res["balanced_grad_rel_max"] <= 2e-6, f"{where}: balanced placement"
        if "tower_cache" in case:  # the frozen towers only, and the second pass hit
            assert all(r["tower_cache_towers"] == case["tower_cache"] for r in per_rank if r["has_first"]), name
            assert sum(r["tower_cache_hits"] for r in per_rank) > 0, name
        if case.get("images", True) is True:  # random 0-2 images per row: the placement moved rows
            assert per_rank[0]["balanced_moved"], name
        assert len(owned) > 0
        first = [res for res in per_rank if res["has_first"]]
        # each TP rank encodes only a share of the images (without a pipeline, whose first step also runs a
        # shape-inference forward): with replicate, every rank would see all of them
        if first[0]["split_images"] and case.get("images", True) is True and first[0]["layout"][2] == 1:
            assert all(res["images_encoded"] < first[0]["ref_images_encoded"] for res in first), name
        # the pipeline ranks together hold the whole model, nothing twice within a stage's ranks
        assert owned == set(per_rank[0]["all_params"]), name
        dp, shard = per_rank[0]["layout"][0], case["overrides"].get("parallel.dp_shard", 0)
        if shard and shard < dp:  # HSDP: FSDP2 on the 2-D mesh, replicated over the first dim, sharded on the second
            for res in per_rank:
                mesh = res["fsdp_mesh"]
                assert mesh["names"][:2] == ["dp_replicate", "dp_shard"], (name, mesh)
                assert mesh["shape"][:2] == [dp // shard, shard], (name, mesh)
                assert mesh["placements"][:2] == ["replicate", "shard0"], (name, mesh)
        elif dp > 1:  # plain FSDP2 over all dp ranks
            assert all(res["fsdp_mesh"]["names"][0] == "dp" for res in per_rank), (name, per_rank[0]["fsdp_mesh"])
