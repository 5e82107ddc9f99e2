"""torchrun data-parallel evaluation on CPU (gloo): the same top-1 as one process, exactly."""
import json
import os
import socket
import subprocess
import sys

import pytest

from test_cli import FAST, MODEL, SEARCH, checkpoint  # noqa: F401  (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 8 calibration images = 2 collection batches of 4: one per rank (data-parallel collection);
# 4 images = 1 batch, fewer than ranks: every rank collects all of it (and must not sum it twice)
@pytest.mark.parametrize("num_calib,collection_ranks", [(8, 2), (4, 1)])
def test_torchrun_two_processes_give_the_single_process_top1(num_calib, collection_ranks, sample_dir, checkpoint,  # noqa: F811
                                                            tmp_path):
    # more evaluation images than one batch per rank: 3 batches of 2 over 2 ranks (uneven shards)
    img = str(sample_dir / "images")
    args = ["quantize", MODEL, "--method", "ptq4vit", "--checkpoint", str(checkpoint), "--calib-data", img,
            "--eval-data", img, "--eval-list", str(sample_dir / "splits" / "eval.txt"), *FAST, *SEARCH,
            "--threads", "1", "--batch-size", "3", "--num-calib", str(num_calib)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "vitquant.cli", *args, "--json", str(tmp_path / "one.json")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                            "-m", "vitquant.cli", *args, "--json", str(tmp_path / "two.json")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    # each rank evaluated its shard of batches: [0:3] + [6:8] on rank 0, [3:6] on rank 1
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "eval_images_per_rank": [5, 3],
                                  "calibration_collection_ranks": collection_ranks}
    assert "distributed" not in one
    # every rank searched on the same gathered data: the same scales as one process, bit for bit
    # (the per-layer distances the search reached are recorded in the JSON)
    assert two["layers"] == {k: v | {"seconds": two["layers"][k]["seconds"]} for k, v in one["layers"].items()}
    assert two["num_eval"] == one["num_eval"] == 8
    for key in ("fp32_top1", "fp32_top5", "quant_top1", "quant_top5", "top1_agreement"):
        assert two[key] == one[key], key
    # one rank wrote the result, nothing else appeared
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["one.json", "two.json"]
