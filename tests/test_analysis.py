"""Analysis: identity diagnostic, gallery, VAE report, time-to-accuracy and sweeps, on tiny digits runs."""

import json
import math
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_run import run
from PIL import Image

from idaa.analysis.diagnose import identity_distances, summarise
from idaa.analysis.setup import attacked_views, load_attack_setup
from idaa.analysis.time_to_accuracy import read_metrics
from idaa.analysis.vae_report import vae_statistics
from idaa.cli import main
from idaa.errors import IdaaError
from idaa.experiments.sweep import plan_sweep, read_grid
from idaa.nets import VAE, save_vae

TINY_GRID = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "digits-tiny.yaml"
TINY_PRETRAIN = ["--dataset", "digits", "--limit", "128", "--width", "4", "--batch-size", "32", "--epochs", "1",
                 "--knn-k", "20", "--no-progress"]



def png_size(path) -> tuple[int, int]:
    image = Image.open(path)
    image.load()  # decodes every pixel: a truncated file fails here
    return image.size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny digits VAE and a SimCLR+IDAA checkpoint trained with eps 0.3 (so its own budget is visible)."""
    root = tmp_path_factory.mktemp("analysis")
    assert main(["vae", "train", "--dataset", "digits", "--epochs", "1", "--latent-dim", "6", "--hidden", "8",
                 "--batch-size", "64", "--limit", "128", "--out", str(root / "vae"), "--no-progress"]) == 0
    vae = str(root / "vae" / "vae.pt")
    assert main(["pretrain", "--adversary", "idaa", "--vae", vae, "--eps", "0.3", "--out", str(root / "idaa"),
                 *TINY_PRETRAIN]) == 0
    return root, vae


def test_identity_distances_match_a_loop_over_samples():
    gen = torch.Generator().manual_seed(3)
    anchors, positives = torch.randn(23, 5, generator=gen), torch.randn(23, 5, generator=gen)
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    a, p = [unit(row) for row in anchors.tolist()], [unit(row) for row in positives.tolist()]
    for negatives, pool in (("anchors", a), ("positives", p)):
        d_pos, d_neg = identity_distances(anchors, positives, negatives)
        for i in range(23):
            assert d_pos[i].item() == pytest.approx(math.dist(a[i], p[i]), abs=1e-9)
            nearest = min(math.dist(a[i], pool[j]) for j in range(23) if j != i)
            assert d_neg[i].item() == pytest.approx(nearest, abs=1e-9)
        summary = summarise(d_pos, d_neg)
        pos, neg = d_pos.tolist(), d_neg.tolist()
        assert summary["identity_preserved"] == pytest.approx(sum(x < y for x, y in zip(pos, neg, strict=True)) / 23)
        assert summary["median_hardness"] == pytest.approx(statistics.median(pos))
        assert summary["median_nearest_negative"] == pytest.approx(statistics.median(neg))
    # a positive equal to its anchor is preserved; one equal to another sample's anchor is not
    d_pos, d_neg = identity_distances(anchors, anchors.clone())
    assert summarise(d_pos, d_neg)["identity_preserved"] == 1.0
    d_pos, d_neg = identity_distances(anchors, anchors.roll(1, 0))
    assert summarise(d_pos, d_neg)["identity_preserved"] == 0.0
    with pytest.raises(IdaaError):
        identity_distances(anchors[:1], positives[:1])


def test_attack_uses_the_methods_attack_loss_from_the_clean_pass(runs, monkeypatch):
    root, vae = runs
    setup = load_attack_setup(str(root / "idaa" / "last.ckpt"), vae)
    assert setup.eps == {"clae": 0.03, "idaa": 0.3}, "IDAA keeps the run's own eps, CLAE the SPEC default"
    seen = []
    method_class = type(setup.method)
    original = method_class.attack_loss

    def spy(self, state):
        seen.append(state)
        return original(self, state)

    monkeypatch.setattr(method_class, "attack_loss", spy)
    views = attacked_views(setup, setup.data.images[:16])
    assert len(seen) == 1 and torch.allclose(seen[0]["z1"], setup.method.embed(views["anchor"]), atol=1e-5)
    std = torch.tensor(setup.data.std).view(1, -1, 1, 1)
    clae_step = (views["clae"] - views["anchor"]).abs()
    assert torch.allclose(clae_step[clae_step > 0], torch.tensor(0.03), atol=1e-6), "one FGSM step of size eps"
    assert (views["idaa"] - views["anchor"]).abs().mul(std).mean() > 0


def test_diagnose_writes_png_and_json_consistent_with_its_samples(runs, tmp_path, capsys):
    root, vae = runs
    out = tmp_path / "diag"
    code, printed, err = run(["diagnose", str(root / "idaa" / "last.ckpt"), "--vae", vae, "--n", "48",
                              "--batch-size", "16", "--out", str(out)], capsys)
    assert code == 0, err
    assert "| IDAA | 0.3 |" in printed and "| CLAE | 0.03 |" in printed
    assert png_size(out / "diagnose.png") == (1265, 506)
    result = json.loads((out / "diagnose.json").read_text())
    assert result["n"] == 48 and result["eps"] == {"clae": 0.03, "idaa": 0.3}
    for name in ("random", "clae", "idaa"):
        samples = result["samples"][name]
        assert len(samples["d_pos"]) == 48
        recomputed = summarise(samples["d_pos"], samples["d_neg"])
        assert recomputed["identity_preserved"] == pytest.approx(result["summary"][name]["identity_preserved"])
        assert recomputed["median_hardness"] == pytest.approx(result["summary"][name]["median_hardness"], abs=1e-5)
        assert samples["d_neg"] == result["samples"]["random"]["d_neg"], "negatives are the same anchors"
        assert all(0 <= d <= 2 for d in samples["d_pos"]), "distances between unit vectors"


def test_gallery_with_a_checkpoint_and_with_a_random_model(runs, tmp_path, capsys):
    root, vae = runs
    code, printed, _ = run(["gallery", "--vae", vae, "--n", "5", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0 and "randomly initialised" in printed
    width, height = png_size(tmp_path / "g.png")
    assert height == 8 * (32 * 3 + 2) + 2 and width > 5 * (32 * 3 + 2), "8 rows of 5 upscaled images + labels"
    info = json.loads((tmp_path / "g.json").read_text())
    assert info["rows"][4] == "IDAA x'" and info["eps"]["idaa"] == 0.15 and info["mean_abs_change"]["clae"] > 0
    code, _, err = run(["gallery", str(root / "idaa" / "last.ckpt"), "--n", "3"], capsys)
    assert code == 0, err
    assert png_size(root / "idaa" / "gallery.png")[1] == 8 * 98 + 2


def test_vae_train_writes_the_report_with_kl_per_dimension(runs):
    root, _ = runs
    report = json.loads((root / "vae" / "vae_report.json").read_text())
    assert len(report["kl_per_dim"]) == 6 and report["latent_dim"] == 6
    assert sum(report["kl_per_dim"]) == pytest.approx(report["kl_total_nats"], abs=1e-4)
    assert report["active_dims"] == sum(k > report["active_threshold_nats"] for k in report["kl_per_dim"])
    width, height = png_size(root / "vae" / "vae_report.png")
    assert (width, height) == (1320, 825)


def test_vae_statistics_against_a_per_image_loop(tiny_vae):
    views = torch.randn(7, 3, 32, 32)
    stats = vae_statistics(tiny_vae, views, batch_size=3)
    kl = np.zeros(tiny_vae.latent_dim)
    for i, x in enumerate(views):
        mu, logvar = (t[0].double() for t in tiny_vae.encode(x[None]))
        kl += (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).detach().numpy() / len(views)
        recon = tiny_vae.decode(tiny_vae.encode(x[None])[0])
        assert stats["per_image_mse"][i] == pytest.approx(((recon - x) ** 2).mean().item(), rel=1e-5)
    assert np.allclose(stats["kl_per_dim"], kl, atol=1e-5)


def write_metrics(folder: Path, records, config=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_time_to_accuracy_table_and_plot(tmp_path, capsys):
    slow = write_metrics(tmp_path / "a", [{"epoch": 1, "time": 10, "knn_top1": 20}, {"epoch": 2, "time": 20},
                                          {"epoch": 3, "time": 5, "knn_top1": 40},  # resumed: clock restarted
                                          {"epoch": 4, "time": 15, "knn_top1": 55}],
                         {"method": "simclr", "adversary": "none"})
    fast = write_metrics(tmp_path / "b", [{"epoch": 1, "time": 30, "knn_top1": 45}, {"epoch": 2, "time": 60,
                                                                                     "knn_top1": 50}],
                         {"method": "simclr", "adversary": "idaa"})
    assert [r.get("wall_time") for r in read_metrics(slow)] == [10, 20, 25, 35]
    out = tmp_path / "plots" / "tta.png"
    code, printed, err = run(["plot", "time-to-accuracy", str(slow), str(fast), "--target", "42", "--out", str(out)],
                             capsys)
    assert code == 0, err
    assert "| simclr | 55.00 | 35 | 35 |" in printed and "| simclr+idaa | 50.00 | 30 | 60 |" in printed
    assert png_size(out) == (770, 495)
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["seconds_to_target"] for r in result["runs"]] == [35, 30]
    code, printed, _ = run(["plot", "time-to-accuracy", str(slow), str(fast), "--target", "99", "--out", str(out)],
                           capsys)
    assert code == 0 and printed.count("not reached") == 2
    code, printed, _ = run(["plot", "time-to-accuracy", str(slow), str(fast), "--out", str(out)], capsys)
    assert "seconds to 50.00%" in printed, "default target: the lowest final accuracy"


def test_sweep_resumes_an_interrupted_point_and_reuses_finished_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    grid = read_grid(TINY_GRID, str(out))
    points = {p.name: p for p in plan_sweep(grid)}
    assert sorted(points) == ["beta-0.1", "beta-1.0", "eps-0.2"]
    interrupted = points["eps-0.2"]
    assert interrupted.vae is points["beta-0.1"].vae, "eps points share the beta-0.1 VAE (same settings)"
    # a VAE and a run stopped after one step, as a killed sweep leaves them
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in interrupted.vae.settings.items()]
    assert main(["vae", "train", "--out", str(interrupted.vae.run), *flags, "--no-progress"]) == 0
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in interrupted.config.items() if k != "out"}))
    assert main(["pretrain", "--config", str(preset), "--out", str(interrupted.run), "--max-steps", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()

    code, printed, err = run(["sweep", str(TINY_GRID), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert f"VAE {interrupted.vae.run} is trained, reusing it" in printed and "resuming eps-0.2" in printed
    records = read_metrics(interrupted.run)
    assert records[0]["partial"] and records[0]["step"] == 1 and records[-1]["step"] == 4, "continued, not redone"
    table = (out / "sweep.md").read_text()
    assert table.count("| done |") == 3 and "| 1.0 | simclr+idaa |" in table
    for name in ("sweep-beta.png", "sweep-eps.png"):
        assert png_size(out / name) == (605, 440)
    report = json.loads((out / "sweep.json").read_text())
    assert all(isinstance(r["knn_top1"], float) and r["wall_time"] > 0 for r in report["rows"])

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("last.ckpt")}

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished point was run again: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    code, printed, err = run(["sweep", str(TINY_GRID), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert printed.count("is finished, reusing it") == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.ckpt")} == mtimes


def bad_grid(tmp_path: Path, text: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "missing/last.ckpt", "--vae", "x.pt"], "does not exist"),
    (["diagnose", "{ckpt}", "--n", "1"], "--n must be >= 2"),
    (["diagnose", "{ckpt}", "--n", "100000"], "larger than"),
    (["diagnose", "{ckpt}", "--vae", "{cifar_vae}"], "trained on 'cifar10'"),
    (["diagnose", "{ckpt}", "--split", "nope"], "unknown split"),
    (["gallery", "--dataset", "digits"], "needs a VAE"),
    (["gallery", "--vae", "{vae}", "--out", "{tmp}/g.jpg"], "must name a .png"),
    (["gallery", "--vae", "{vae}", "--n", "0", "--out", "{tmp}/g.png"], "--n must be >= 1"),
    (["plot", "time-to-accuracy", "{tmp}/nothing"], "does not exist"),
    (["plot", "time-to-accuracy", "{vae_dir}"], "no records with both"),
    (["sweep", "{tmp}/missing.yaml"], "does not exist"),
    (["sweep", "{grid:sweep: {eps: [0.1]}\nbogus: 1}"], "unknown config key(s) bogus"),
    (["sweep", "{grid:sweep: {gamma: [1]}}"], "cannot sweep 'gamma'"),
    (["sweep", "{grid:sweep: {beta: [0.1, 1]}}"], "add a 'vae:' block"),
    (["sweep", "{grid:sweep: {eps: []}}"], "non-empty list"),
    (["sweep", "{grid:base: {dataset: digits}\nsweep: {batch_size: [0]}}"], "--batch-size must be"),
    (["sweep", "{grid:settings: {adversary: idaa, vae: nowhere.pt}\nsweep: {eps: [0.1]}}"], "does not exist"),
])
def test_bad_inputs_exit_2_with_one_line(argv, message, runs, tmp_path, capsys):
    root, vae = runs
    cifar_vae = tmp_path / "cifar_vae.pt"
    save_vae(VAE(latent_dim=4, hidden=8), cifar_vae, {"dataset": "cifar10"})
    values = {"ckpt": str(root / "idaa" / "last.ckpt"), "vae": vae, "cifar_vae": str(cifar_vae),
              "tmp": str(tmp_path), "vae_dir": str(root / "vae")}
    args = []
    for arg in argv:
        if arg.startswith("{grid:"):
            arg = bad_grid(tmp_path, arg[len("{grid:"):-1])
        args.append(arg.format(**values))
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
