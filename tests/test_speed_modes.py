"""The faster attack modes (clean graph, fraction of the batch) and `idaa bench step`."""

import json

import pytest
import torch

from idaa.adversaries import build_adversary
from idaa.cli import main
from idaa.errors import IdaaError
from idaa.methods import build_method
from idaa.nets import build_backbone
from idaa.train.config import resolve_config
from idaa.train.step import apply_speedups, compute_losses, to_memory_format


def fresh(name="simclr", width=4):
    options = {"proj_hidden": 32, "proj_dim": 16} if name == "simclr" else {"proj_hidden": 32, "proj_dim": 32,
                                                                               "pred_hidden": 8}
    torch.manual_seed(0)
    return build_method(name, build_backbone("resnet18-cifar", width=width), **options).train()


@pytest.mark.parametrize("name", ["simclr", "simsiam"])
@pytest.mark.parametrize("adversary", ["idaa", "clae"])
def test_clean_graph_attack_equals_the_separate_one_while_both_bns_agree(name, adversary, tiny_vae):
    # At initialisation the main and adversarial BN have the same affine parameters and both normalise with
    # batch statistics, so at delta = 0 the clean graph computes exactly the attack's forward.
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    adv = build_adversary(adversary, vae=tiny_vae, eps=0.2)
    outputs = []
    for graph in ("separate", "clean"):
        method = fresh(name)
        method.attack_graph = graph
        losses = compute_losses(method, adv, v1, v2)
        outputs.append(losses.x_adv)
        losses.total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in method.parameters())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    assert not torch.equal(outputs[0], v1), "the attack moved the view"


def test_clean_graph_costs_one_backbone_forward_less(tiny_vae):
    counts = {}
    for graph in ("separate", "clean"):
        method = fresh()
        method.attack_graph = graph
        calls = []
        method.backbone.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        compute_losses(method, build_adversary("idaa", vae=tiny_vae, eps=0.1), *torch.randn(2, 8, 3, 32, 32))
        counts[graph] = len(calls)
    assert counts == {"separate": 4, "clean": 3}


def test_attack_fraction_attacks_the_first_rows_only(tiny_vae):
    method = fresh()
    method.attack_fraction = 0.25
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    losses = compute_losses(method, build_adversary("idaa", vae=tiny_vae, eps=0.1), v1, v2)
    assert losses.x_adv.shape[0] == 2 and torch.isfinite(losses.total)
    losses.total.backward()
    assert all(p.grad is not None for n, p in method.named_parameters() if ".adv." in n)


@pytest.mark.parametrize(("channels_last", "compiled"), [(True, False), (False, True)])
def test_channels_last_and_compile_leave_the_step_unchanged(channels_last, compiled, tiny_vae, monkeypatch):
    monkeypatch.setenv("IDAA_COMPILE_BACKEND", "aot_eager")  # the graph capture without a C++ toolchain
    torch._dynamo.reset()
    v1, v2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    adv = build_adversary("idaa", vae=tiny_vae, eps=0.2)
    results = []
    # width 8: torch 2.13's CPU channels-last backward at width 4 (4-channel convolutions) crashes the process
    # now and then on some AVX2 machines (AMD EPYC), a oneDNN fault outside this package
    for speed in (False, True):
        method = fresh(width=8)
        if speed:
            apply_speedups(method, channels_last, compiled)
            assert list(method.state_dict()) == list(fresh(width=8).state_dict()), "parameter names must not change"
        losses = compute_losses(method, adv, to_memory_format(v1, channels_last and speed),
                                to_memory_format(v2, channels_last and speed))
        losses.total.backward()
        results.append((losses.total.detach(), losses.x_adv.detach(),
                        {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)
    assert results[1][2].keys() == results[0][2].keys()
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, atol=1e-4, rtol=1e-3, msg=name)
    if channels_last:
        conv = method.backbone.stem[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "both BN branches were compiled"
        torch._dynamo.reset()


def test_pretrain_runs_with_channels_last_and_compile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDAA_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "digits", "--width", "8", "--batch-size", "32", "--limit", "96", "--epochs", "1",
            "--adversary", "clae", "--channels-last", "--compile", "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and 0 <= record["knn_top1"] <= 100
    saved = torch.load(out / "last.ckpt", weights_only=False)
    assert saved["config"]["compile"] and saved["config"]["channels_last"]
    assert not any("_orig_mod" in k for k in saved["method"]), "checkpoints keep plain parameter names"
    torch._dynamo.reset()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"attack_graph": "clean", "adversary": "idaa", "attack_steps": 3}, "FGSM"),
    ({"attack_graph": "clean", "adversary": "random-view"}, "FGSM"),
    ({"attack_graph": "fast"}, "--attack-graph"),
    ({"attack_fraction": 0.0}, "--attack-fraction"),
    ({"attack_fraction": 1.5}, "--attack-fraction"),
])
def test_bad_speed_options(overrides, message):
    with pytest.raises(IdaaError, match=message):
        resolve_config(None, {"out": "x", **overrides})


def test_bench_step_prints_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "step", "--width", "4", "--batch-size", "8", "--latent-dim", "16", "--rounds", "2", "--warmup",
            "1", "--modes", "none,idaa,idaa-clean,idaa-clean-frac0.25", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| idaa-clean |" in text and "x none" in text and "two SimCLR views" in text
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["none"]["time_ratio"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows.values())
    # activation memory: the adversarial branch needs more than the plain step, attacking a quarter needs less
    assert rows["idaa"]["memory_mb"] > rows["none"]["memory_mb"]
    assert rows["idaa-clean-frac0.25"]["memory_mb"] < rows["idaa-clean"]["memory_mb"]
    assert main(["bench", "step", "--modes", "none,warp"]) == 2


def test_bench_shared_modes_and_their_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    modes = "none,idaa-clean,idaa-shared,idaa-shared-frac0.25,idaa-shared-detached,idaa-shared-detached-vaebf16"
    argv = ["bench", "step", "--width", "4", "--batch-size", "8", "--latent-dim", "16", "--rounds", "1", "--warmup",
            "0", "--modes", modes, "--json", str(out)]
    assert main(argv) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(modes.split(","))
    # the live anchor keeps v1's graph for the second backward, as the clean-graph mode does; the detached one
    # frees it after the first, so the step holds no more than SimCLR's own activations
    assert rows["idaa-shared"]["memory_mb"] <= rows["idaa-clean"]["memory_mb"] * 1.01
    assert rows["idaa-shared-detached"]["memory_mb"] < rows["idaa-shared"]["memory_mb"]
    assert "| idaa-shared-detached-vaebf16 |" in capsys.readouterr().out


def test_bench_breakdown_lists_each_component(tmp_path, capsys):
    out = tmp_path / "breakdown.json"
    argv = ["bench", "step", "--breakdown", "--width", "4", "--batch-size", "8", "--latent-dim", "16", "--rounds",
            "1", "--warmup", "0", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    for part in ("backbone backward, clean view", "attack gradient alone (clean-graph mode)", "VAE VJP, fp32",
                 "VAE second decode, bf16", "two SimCLR views"):
        assert result["ms"][part] > 0 and f"| {part} |" in text
    estimates = result["estimates"]
    assert estimates["idaa-shared-detached, VAE fp32"] > estimates["simclr (none)"]
    assert "| idaa-shared-detached, VAE bf16 |" in text
