"""The kNN monitor shared over 2 gloo processes (each embeds a part of the bank and queries) = one process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from idaa.data.shards import pack_shards

CASE = '''
"""The monitor's accuracy on digits (in memory) and on shards, in every process of the group."""
import sys

import torch


def accuracies(shards):
    from idaa.data.memory import load_dataset
    from idaa.data.shards import ShardSource
    from idaa.methods import build_method
    from idaa.nets import build_backbone
    from idaa.train.config import PretrainConfig
    from idaa.train.monitor import KNNMonitor

    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("resnet18-cifar", width=4), proj_hidden=16, proj_dim=8)
    method.train()
    with torch.no_grad():  # move the BN statistics off their defaults, as training would
        method.embed_for_eval(torch.randn(64, 3, 32, 32))
    cfg = PretrainConfig(knn_k=10)
    train, test = load_dataset("digits").take(301, seed=0), load_dataset("digits", split="test").take(97, seed=0)
    digits = KNNMonitor(train, test, cfg, torch.device("cpu"))(method)
    bank, queries = ShardSource(shards, "train", image_size=32), ShardSource(shards, "test", image_size=32)
    streamed = KNNMonitor(bank, queries, cfg, torch.device("cpu"), workers=1)(method)
    return digits, streamed


if __name__ == "__main__":
    from idaa import distributed as dist

    torch.set_num_threads(1)
    shards, out = sys.argv[1:3]
    dist.setup("cpu")
    result = accuracies(shards)
    everyone = dist.gather_objects(result)
    if dist.rank() == 0:
        torch.save({"world": dist.world_size(), "results": everyone}, out)
    dist.barrier()
    dist.teardown()
'''


def make_shards(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 9), ("test", 4)):
        for c in range(3):
            for i in range(count):
                base = np.full((40, 36, 3), 60 * c, np.uint8)
                pixels = np.clip(base + rng.integers(0, 80, base.shape), 0, 255).astype(np.uint8)
                path = tmp_path / "folder" / split / f"c{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    pack_shards("folder", tmp_path / "folder", tmp_path / "shards", shard_size=2)
    return tmp_path / "shards"


def test_sharded_knn_monitor_matches_one_process(tmp_path):
    shards = make_shards(tmp_path)
    script, out = tmp_path / "monitor_case.py", tmp_path / "ddp.pt"
    script.write_text(CASE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(shards), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["world"] == 2 and ddp["results"][0] == ddp["results"][1]  # every rank gets the same number

    sys.path.insert(0, str(tmp_path))
    try:
        import monitor_case
    finally:
        sys.path.remove(str(tmp_path))
    one = monitor_case.accuracies(str(shards))  # no process group: one process does all of it
    digits, streamed = ddp["results"][0]
    assert digits == pytest.approx(one[0], abs=1e-9) and streamed == pytest.approx(one[1], abs=1e-9)
    assert 0 < digits < 100 and 0 < streamed <= 100
