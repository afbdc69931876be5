"""Data-parallel training on CPU (gloo, 2 processes under torchrun): the same step as one process, one run folder."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from idaa.cli import main
from idaa.data.memory import load_dataset
from idaa.nets import save_vae
from idaa.train.step import forward_backward

CASE = '''
"""One optimisation step of a small method, built identically in every process."""
import sys

import torch

from idaa.adversaries import build_adversary
from idaa.methods import build_method
from idaa.nets import build_backbone, load_vae

N = 16  # the global batch


def build(recipe, vae_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18-cifar", width=4)
    if recipe.startswith("simclr+idaa"):
        method = build_method("simclr", backbone, proj_hidden=32, proj_dim=16)
        adversary = build_adversary("idaa", vae=load_vae(vae_path), eps=0.2)
        if "shared" in recipe:  # the attack's gradient from the clean loss's own backward
            method.attack_graph = "shared"
            method.adversarial_anchor = "detached" if recipe.endswith("detached") else "live"
    else:
        method = build_method("simsiam", backbone, proj_hidden=32, proj_dim=32, pred_hidden=8)
        adversary = None
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 32, 32, generator=generator)
    v2 = x + 0.3 * torch.randn(N, 3, 32, 32, generator=generator)
    return method.train(), adversary, x, v2


if __name__ == "__main__":
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel

    from idaa import distributed as dist
    from idaa.train.step import forward_backward

    torch.set_num_threads(1)
    recipe, vae_path, out = sys.argv[1:4]
    dist.setup("cpu")
    rank, world = dist.rank(), dist.world_size()
    method, adversary, v1, v2 = build(recipe, vae_path)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    model = DistributedDataParallel(method, find_unused_parameters=adversary is None or "shared" in recipe)
    share = slice(rank * N // world, (rank + 1) * N // world)
    losses = forward_backward(model, adversary, v1[share], v2[share])
    optimizer.step()
    loss = losses.total.detach().clone()
    td.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss.item() / world, "world": world,
                    "params": {k: p.detach() for k, p in method.named_parameters()}}, out)
    td.barrier()  # no rank may tear the group down while another still uses it
    dist.teardown()
'''


def torchrun(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.fixture
def digits_vae(tmp_path, tiny_vae):
    digits = load_dataset("digits")
    path = tmp_path / "vae.pt"
    save_vae(tiny_vae, path, {"dataset": "digits", "mean": list(digits.mean), "std": list(digits.std)})
    return str(path)


def load_case(tmp_path):
    path = tmp_path / "ddp_case.py"
    path.write_text(CASE)
    spec = importlib.util.spec_from_file_location("ddp_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def per_rank_bn(method, recipe, half):
    """The one-process reference with each half of the batch through BN on its own, as two ranks see it."""
    name = "embed" if recipe.startswith("simclr") else "_zp"
    original = getattr(method, name)

    def chunked(x, adv=False):
        parts = [original(x[:half], adv=adv), original(x[half:], adv=adv)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(pair) for pair in zip(*parts, strict=True))
        return torch.cat(parts)

    setattr(method, name, chunked)


@pytest.mark.parametrize("recipe", ["simclr+idaa", "simsiam", "simclr+idaa-shared", "simclr+idaa-shared-detached"])
def test_two_ranks_take_the_same_step_as_one_process(recipe, tmp_path, digits_vae):
    script, case = load_case(tmp_path)
    out = tmp_path / "ddp.pt"
    proc = torchrun(str(script), recipe, digits_vae, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["world"] == 2

    method, adversary, v1, v2 = case.build(recipe, digits_vae)
    before = {k: p.detach().clone() for k, p in method.named_parameters()}
    per_rank_bn(method, recipe, case.N // 2)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    losses = forward_backward(method, adversary, v1, v2)
    optimizer.step()

    assert ddp["loss"] == pytest.approx(losses.total.item(), abs=1e-5)
    moved = 0
    for key, p in method.named_parameters():
        torch.testing.assert_close(ddp["params"][key], p.detach(), atol=1e-5, rtol=0, msg=key)
        moved += not torch.equal(before[key], p.detach())
    assert moved > 0
    # a gradient scaled by the world size would have moved the weights twice as far: the check above catches it


def test_two_process_pretrain_writes_one_run_folder_and_resumes_on_one(tmp_path, digits_vae):
    run = tmp_path / "run"
    args = ["-m", "idaa", "pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "128",
            "--epochs", "2", "--knn-k", "10", "--adversary", "idaa", "--vae", digits_vae, "--no-progress",
            "--device", "cpu", "--out", str(run)]
    proc = torchrun(*args, "--max-steps", "5", cwd=str(Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 5] and all(0 <= r["knn_top1"] <= 100 for r in records)
    blob = torch.load(run / "last.ckpt", weights_only=False)
    assert blob["world_size"] == 2 and len(blob["rng_ranks"]) == 2 and blob["position"]["batch"] == 1
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "last.ckpt", "metrics.jsonl",
                                                     "tensorboard", "trackers.json"]  # rank 0 alone wrote them
    # resume the 2-process run in one process
    assert main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


@pytest.mark.parametrize(("extra", "message"), [(["--batch-size", "33"], "must be divisible by the 2 processes"),
                                                 (["--sync-bn"], "--sync-bn needs CUDA")])
def test_distributed_bad_input_stops_every_rank(extra, message, tmp_path):
    proc = torchrun("-m", "idaa", "pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "32",
                    "--limit", "128", "--epochs", "1", "--no-progress", "--device", "cpu", "--out",
                    str(tmp_path / "r"), *extra, cwd=str(Path(__file__).parents[1]))
    assert proc.returncode != 0 and message in proc.stderr
    # each worker prints its one line; the only traceback is torchrun's own report of a failed worker
    assert "src/idaa/" not in proc.stderr and proc.stderr.count("idaa: error: ") == 2
    assert not (tmp_path / "r").exists()
