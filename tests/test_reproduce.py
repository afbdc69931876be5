"""`idaa reproduce`: a tiny protocol on digits end to end, resume, matched-time resolution, verdicts, bad input."""

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from cli_run import run

from idaa.analysis.time_to_accuracy import read_metrics
from idaa.cli import main
from idaa.errors import IdaaError
from idaa.experiments import reproduce
from idaa.experiments.cli_args import whole_grid
from idaa.experiments.measure import RunResult, compare, read_run, time_fractions
from idaa.experiments.protocol import read_protocol
from idaa.experiments.report import END, START, collect, readme_section, report_markdown, write_readme_section
from idaa.experiments.reproduce import _resolve_stage, plan, read_resolved
from idaa.fileio import file_digest

ROOT = Path(__file__).resolve().parents[1]
BASE = """base:
  method: simclr
  dataset: digits
  limit: 128
  backbone: resnet18-cifar
  width: 4
  epochs: 2
  batch_size: 64
  lr: 0.001
  knn_every: 1
  knn_k: 20
"""
GRID = BASE + """seeds: [0, 1]
variants:
  none: {}
  random-view: {adversary: random-view}
compare:
  - [random-view, none]
linear:
  variants: [none]
  limit: 128
"""



def protocol_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "protocol.yaml"
    path.write_text(text)
    return str(path)


def final(run: Path) -> dict:
    return read_metrics(run)[-1]


def in_process(command: list[str], name: str, what: str) -> None:
    """The child `python -m idaa ...` run inside the test process (a child pays ~7 s of imports here)."""
    assert command[:3] == [sys.executable, "-m", "idaa"]
    assert main(command[3:]) == 0, f"{name} failed"


def test_reproduce_reports_the_grid_and_redoes_only_the_unfinished_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid, out = protocol_file(tmp_path, GRID), tmp_path / "report"
    argv = ["reproduce", grid, "--out", str(out), "--no-progress"]
    with monkeypatch.context() as patch:  # the first pass trains in-process; the resume below is a real child
        patch.setattr(reproduce, "run_child", in_process)
        code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert printed.count("reproduce: training") == 4
    for name in ("report.md", "results.csv", "accuracy-vs-time.png", "time-to-accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("none", "0", "done"), ("random-view", "0", "done"), ("none", "1", "done"), ("random-view", "1", "done")]
    knn = {}
    for row in rows:  # every number comes from the run's own files
        record = final(Path(row["run"]))
        assert float(row["knn_top1"]) == record["knn_top1"] and float(row["train_time_s"]) == record["train_time"]
        assert 0 < record["train_time"] < record["time"] and record["monitor_time"] > 0
        knn.setdefault(row["variant"], []).append(record["knn_top1"])
    a, b = knn["random-view"], knn["none"]
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(statistics.variance(a) / 2 + statistics.variance(b) / 2)
    verdict = ("real: random-view better" if diff > 0 else "real: none better") if abs(diff) > 2 * se \
        else "within noise"
    report = (out / "report.md").read_text()
    assert f"| {diff:+.2f} | {2 * se:.2f} | {verdict} |" in report
    linear = [json.loads((out / "runs" / f"none-s{s}" / "eval.json").read_text())["linear_top1"] for s in (0, 1)]
    assert f"| none | 2 | {statistics.fmean(linear):.2f} ± {statistics.stdev(linear):.2f} |" in report
    assert f"idaa pretrain --config {out}/presets/random-view-s1.yaml --out {out}/runs/random-view-s1" in report
    assert f"idaa reproduce {grid} --out {out}" in report and "`--adversary random-view`" in report

    # a reproduce killed during random-view-s1 leaves it interrupted after a step
    interrupted = out / "runs" / "random-view-s1"
    assert main(["pretrain", "--config", str(out / "presets" / "random-view-s1.yaml"), "--out", str(interrupted),
                 "--overwrite", "--max-steps", "1", "--no-progress"]) == 0
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("last.ckpt") if p.parent != interrupted}
    assert len(kept) == 3
    capsys.readouterr()
    readme, docs = tmp_path / "summary.md", tmp_path / "docs"
    code, printed, err = run([*argv, "--readme-section", str(readme), "--publish", str(docs)], capsys)
    assert code == 0, err
    for name in ("none-s0", "none-s1", "random-view-s0", "random-view-s1"):  # every finished run is recorded
        for file in ("config.yaml", "metrics.jsonl"):
            assert (docs / "runs" / name / file).read_bytes() == (out / "runs" / name / file).read_bytes()
        assert (docs / "runs" / name / "eval.json").is_file() == name.startswith("none"), "probes of probed runs"
    assert not list(docs.rglob("*.ckpt"))
    summary = readme.read_text()
    assert summary.startswith(START) and summary.endswith(END + "\n")
    assert "random-view vs none at equal epochs" in summary and "| random-view | `--adversary random-view` |" in summary
    assert "resuming random-view-s1" in printed and printed.count("is finished, reusing it") == 3
    assert printed.count("linear probe of") == 2, "the linear probes of unchanged checkpoints are reused"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    records = read_metrics(interrupted)
    assert records[0]["partial"] and records[0]["step"] == 1 and records[-1]["step"] == 4, "continued, not redone"
    times = [r["train_time"] for r in records]
    assert times == sorted(times), "training time carries over the resume"


def fake_run(run: Path, epochs: int, seconds_per_epoch: float, knn: list[float], load: float = 1.0,
             machine: str | None = None) -> None:
    """A finished run as metrics.jsonl and last.ckpt leave it (what resolution and the report read)."""
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"not read")
    lines = [json.dumps({"epoch": e, "step": e, "time": 1.5 * e * seconds_per_epoch, "knn_top1": knn[e - 1],
                         "train_time": e * seconds_per_epoch * load, "monitor_time": 0.5 * e * load,
                         **({"machine": machine} if machine else {})})
             for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_matched_time_and_best_of_variants_are_resolved_from_finished_runs(tmp_path, capsys):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
  slow: {adversary: random-view}
  slower: {adversary: random-view, alpha: 0.5}
  none-time-slow: {match_time_of: slow}
  best-alpha2: {best_of: [slow, slower], alpha: 2.0}
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    runs = plan(protocol)
    assert [(r.name, r.config is None) for r in runs[-4:]] == [
        ("none-time-slow-s0", True), ("best-alpha2-s0", True), ("none-time-slow-s1", True), ("best-alpha2-s1", True)]
    code, printed, _ = run(["reproduce", protocol_file(tmp_path, text), "--out", str(tmp_path / "rep"), "--dry-run"],
                           capsys)
    assert code == 0 and "none-time-slow-s1: waits for slow, none" in printed and not (tmp_path / "rep").exists()
    for seed, (none_rate, slow_rate) in enumerate([(1.0, 3.0), (1.2, 3.4)]):
        fake_run(protocol.out / "runs" / f"none-s{seed}", 2, none_rate, [40.0, 50.0])
        fake_run(protocol.out / "runs" / f"slow-s{seed}", 2, slow_rate, [45.0, 55.0 + seed])
        fake_run(protocol.out / "runs" / f"slower-s{seed}", 2, slow_rate, [45.0, 52.0])
        code, printed, _ = run(["reproduce", protocol_file(tmp_path, text), "--out", str(protocol.out),
                                "--dry-run"], capsys)  # matched over both seeds: ready only once both finished
        state = "resolves from finished" if seed == 1 else "waits for"
        assert code == 0 and f"none-time-slow-s0: {state} slow, none" in printed, printed
    runs = _resolve_stage(protocol, ["none-time-slow", "best-alpha2"], runs, echo=lambda text: None)
    resolved = json.loads((protocol.out / "resolved.json").read_text())
    # slow trains 2 epochs at 3.2 s/epoch on average (6.4 s), none takes 1.1 s/epoch: 6.4 / 1.1 -> 6 epochs
    assert resolved["none-time-slow"]["epochs"] == round(6.4 / 1.1) == 6
    assert resolved["best-alpha2"]["best"] == "slow", "slow's mean final kNN (55.5) beats slower's (52)"
    matched = next(r for r in runs if r.name == "none-time-slow-s1").config
    best = next(r for r in runs if r.name == "best-alpha2-s0").config
    assert (matched["epochs"], matched["adversary"], matched["seed"]) == (6, "none", 1)
    assert (best["adversary"], best["alpha"], best["epochs"]) == ("random-view", 2.0, 2)


def test_a_matched_variant_trained_seed_by_seed_is_measured_over_every_seed_of_the_file(tmp_path):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
  slow: {adversary: random-view}
  none-time-slow: {match_time_of: slow}
"""
    path, out = protocol_file(tmp_path, text), str(tmp_path / "rep")
    one = read_protocol(path, seeds="0", out=out)
    assert (one.seeds, one.match_seeds) == ([0], [0, 1])
    fake_run(one.out / "runs" / "none-s0", 2, 1.0, [40.0, 50.0])
    fake_run(one.out / "runs" / "slow-s0", 2, 3.0, [45.0, 55.0])
    with pytest.raises(IdaaError, match=r"matched over seeds 0,1: it needs the finished runs of slow, none for all "
                                        r"of them \(--seeds 0,1\)"):
        _resolve_stage(one, ["none-time-slow"], plan(one), echo=lambda text: None)
    assert not (one.out / "resolved.json").exists(), "nothing resolved from seed 0 alone"
    fake_run(one.out / "runs" / "none-s1", 2, 1.0, [40.0, 50.0])
    fake_run(one.out / "runs" / "slow-s1", 2, 5.0, [45.0, 55.0])
    runs = _resolve_stage(one, ["none-time-slow"], plan(one), echo=lambda text: None)
    found = read_resolved(one)["none-time-slow"]
    # slow's mean over both seeds is 8 s (seed 0 alone: 6 s) at none's 1 s per epoch: 8 epochs, not 6
    assert (found["epochs"], found["seeds"]) == (8, [0, 1])
    assert [r.name for r in runs if r.variant == "none-time-slow"] == ["none-time-slow-s0"]
    assert "fewer seeds" not in report_markdown(collect(one, runs, "idaa reproduce p.yaml"))
    (one.out / "resolved.json").write_text(json.dumps({"none-time-slow": {**found, "seeds": [0]}}))
    markdown = report_markdown(collect(one, plan(one), "idaa reproduce p.yaml"))
    assert "Measured over fewer seeds than the protocol's: `none-time-slow` over seed(s) 0 only." in markdown


def test_compare_time_pairs_and_a_published_report(tmp_path, capsys):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
  slow: {adversary: random-view}
  slow-alpha2: {adversary: random-view, alpha: 2.0}
  none-time-slow: {match_time_of: slow}
compare_time:
  - [slow-alpha2, none-time-slow]
linear:
  variants: [slow, none-time-slow]
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    for seed in (0, 1):
        fake_run(protocol.out / "runs" / f"none-s{seed}", 2, 1.0, [40.0, 50.0])
        fake_run(protocol.out / "runs" / f"slow-s{seed}", 2, 3.0, [45.0, 55.0 + seed])
        fake_run(protocol.out / "runs" / f"slow-alpha2-s{seed}", 2, 3.1, [45.0, 60.0 + seed], load=1.0 + seed)
    runs = _resolve_stage(protocol, ["none-time-slow"], plan(protocol), echo=lambda text: None)
    for seed in (0, 1):
        fake_run(protocol.out / "runs" / f"none-time-slow-s{seed}", 6, 1.0, [40.0, 45, 48, 50, 52, 53.0 + seed])
    for name, top1 in (("slow", [50.0, 51.0]), ("none-time-slow", [52.0, 53.0])):  # probes of these checkpoints
        for seed in (0, 1):
            run_dir = protocol.out / "runs" / f"{name}-s{seed}"
            (run_dir / "eval.json").write_text(json.dumps({
                "linear_top1": top1[seed], "checkpoint_sha256": file_digest(run_dir / "last.ckpt"),
                "reproduce_limit": None}))
    markdown = report_markdown(collect(protocol, runs, "idaa reproduce p.yaml"))
    probed = markdown.split("The same comparisons by linear top-1")[1].split("## Figures")[0]
    assert "| slow | none-time-slow | 50.50 ± 0.71 | 52.50 ± 0.71 | -2.00 | 1.41 | real: none-time-slow better |" \
        in probed and "slow-alpha2" not in probed, "only pairs whose both sides are probed"
    timed = markdown.split("## At equal training time")[1].split("##")[0]
    assert "| slow | none-time-slow | 55.50 ± 0.71 | 53.50 ± 0.71 | +2.00 | 1.41 | 6.00 / 6.00 | real" in timed
    assert "| slow-alpha2 | none-time-slow | 60.50 ± 0.71 | 53.50 ± 0.71 | +7.00 | 1.41 | 9.30 / 6.00 | real" in timed
    runs_section = markdown.split("## Runs")[1].split("##")[0]
    rows = {line.split(" | ")[0][2:]: line for line in runs_section.splitlines() if line.startswith("| ")}
    # seed 1 of slow-alpha2 ran on a machine twice as slow (training and monitor alike): 4.65x none's seconds,
    # but in units of its own kNN evaluations it costs what seed 0 did, 6.2 / 0.5 = 12.4 against none's 2 / 0.5
    assert rows["slow-alpha2"].endswith("| 4.65x | 1.50 ± 0.71 | 3.10x |"), rows["slow-alpha2"]
    assert rows["none-time-slow"].endswith("| 3.00x |") and rows["slow"].endswith("| 3.00x |")
    summary = readme_section(protocol, runs, "idaa reproduce p.yaml")
    assert "slow-alpha2 vs none-time-slow at equal training time" in summary
    assert "- slow vs none-time-slow at equal training time: 50.50 ± 0.71 vs 52.50 ± 0.71 linear top-1" in summary
    assert "By the linear probe, slow does not beat SimCLR trained for the same time (none-time-slow)" in summary
    # none reaches its final 50 at 2 s; slow reaches it (55, 56) at its epoch 2, 6 s: 3.00 of none's time
    assert "- slow reached none's final kNN in 3.00 ± 0.00 of none's training compute, load-free (2/2 seeds" \
        in summary
    # slow-alpha2's seed 1 took 12.4 s on the machine twice as slow, 6.20 of none's seconds, but its own kNN
    # evaluations took twice as long too: in load-free compute both seeds took 3.10 (raw seconds: 4.65 ± 2.19)
    assert "- slow-alpha2 reached none's final kNN in 3.10 ± 0.00 of none's training compute" in summary

    # --publish copies the report beside the README's link to it; the runs stay where they are
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "rep"
    readme.write_text(f"# x\n{START}\nold\n{END}\nkept\n")
    code, _, err = run(["reproduce", protocol_file(tmp_path, text), "--out", str(protocol.out), "--report-only",
                        "--publish", str(docs), "--readme-section", str(readme)], capsys)
    assert code == 0, err
    for name in ("report.md", "results.csv", "accuracy-vs-time.png", "time-to-accuracy.png", "resolved.json"):
        assert (docs / name).read_bytes() == (protocol.out / name).read_bytes(), name
    assert f"full report: [{docs}/report.md]({docs}/report.md), published from {protocol.out}/" in readme.read_text()
    assert readme.read_text().endswith(f"{END}\nkept\n")
    code, _, err = run(["reproduce", protocol_file(tmp_path, text), "--out", str(protocol.out), "--report-only",
                        "--publish", str(protocol.out)], capsys)
    assert code == 2 and "is the report folder itself" in err


def test_verdicts_and_time_fractions_against_hand_computed_values():
    v = compare([50.0, 52.0, 54.0], [47.0, 48.0, 49.0])
    se = math.sqrt(4 / 3 + 1 / 3)  # variances 4 and 1 over 3 seeds each
    assert v.difference == pytest.approx(4.0) and v.standard_error == pytest.approx(se) and v.verdict == "real"
    assert compare([50.0, 56.0], [49.0, 51.0]).verdict == "within noise"  # diff 3 < 2 * sqrt(9 + 1)
    assert compare([50.0], [49.0, 51.0]).verdict == "one seed: no verdict"

    def curve(seconds, knn):
        return RunResult("done", len(knn), knn[-1], seconds[-1], curve_epochs=list(range(1, len(knn) + 1)),
                         curve_seconds=seconds, curve_knn=knn)

    reference = {0: curve([10, 20, 30], [30, 38, 40]), 1: curve([10, 20, 30], [30, 41, 40])}
    variant = {0: curve([20, 40, 60], [35, 40, 45]), 1: curve([20, 40, 60], [35, 39, 39])}
    fractions, compared = time_fractions(variant, reference)
    # seed 0: reaches 40 at 40 s, the reference first at 30 s; seed 1: the reference's 40 (first at 20 s) is
    # never reached
    assert compared == 2 and fractions == [pytest.approx(40 / 30)]
    # with monitor timings the seconds count in units of each run's own kNN evaluation: the variant's seed 0
    # evaluated at 2 s each (a machine twice as slow), the reference's at 1 s, so 40 s are 20 units against 30
    variant[0].monitor_time, reference[0].monitor_time = 2.0 * 3, 1.0 * 3
    assert time_fractions(variant, reference)[0] == [pytest.approx(20 / 30)]


def test_shipped_protocols_plan_every_run(tmp_path, capsys):
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"checked for existence only by the dry run")
    code, printed, err = run(["reproduce", str(ROOT / "configs/reproduce/cpu-protocol-cifar10.yaml"), "--vae", str(vae),
                              "--out", str(tmp_path / "cpu"), "--dry-run"], capsys)
    assert code == 0, err
    assert "30 runs" in printed and printed.count("waits for") == 12 and "idaa-frac0.25-s2: new" in printed
    code, printed, err = run(["reproduce", str(ROOT / "configs/reproduce/cpu-protocol-cifar10-equal-time.yaml"),
                              "--vae", str(vae), "--out", str(tmp_path / "eq"), "--dry-run"], capsys)
    assert code == 0 and "6 runs" in printed and printed.count("waits for") == 2, err
    code, printed, err = run(["reproduce", str(ROOT / "configs/reproduce/digits-tiny.yaml"), "--seeds", "3",
                              "--variants", "none-time-idaa", "--out", str(tmp_path / "tiny"), "--dry-run"], capsys)
    assert code == 0, err
    assert [line.split(":")[0].strip() for line in printed.splitlines()[1:]] == [
        "none-s3", "idaa-s3", "none-time-idaa-s3"], "a chosen variant brings the variants it is measured against"
    assert not any((tmp_path / name).exists() for name in ("cpu", "eq", "tiny"))


def test_readme_section_replaces_only_the_marked_part(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nold numbers\n{END}\nafter\n")
    write_readme_section(readme, f"{START}\nnew numbers\n{END}\n")
    assert readme.read_text() == f"# title\n\nbefore\n{START}\nnew numbers\n{END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    with pytest.raises(IdaaError, match="markers"):
        write_readme_section(plain, f"{START}\nx\n{END}\n")
    assert plain.read_text() == "no markers here\n"


def test_readme_section_ignores_markers_quoted_in_prose(tmp_path):
    """A README quoting the markers inline (as ours does) keeps that prose; only the own-line pair is replaced."""
    readme = tmp_path / "README.md"
    prose = f"writes between `{START}` and `{END}` in FILE\n"
    readme.write_text(f"{prose}\n{START}\nold\n{END}\nafter\n")
    write_readme_section(readme, f"{START}\nnew\n{END}\n")
    assert readme.read_text() == f"{prose}\n{START}\nnew\n{END}\nafter\n"
    quoted_only = tmp_path / "quoted.md"
    quoted_only.write_text(prose)
    with pytest.raises(IdaaError, match="lines of their own"):
        write_readme_section(quoted_only, f"{START}\nx\n{END}\n")
    assert quoted_only.read_text() == prose


@pytest.mark.parametrize("text, extra, message", [
    ("seeds: [0]\nvariants: {none: {}}\nbogus: 1\n", [], "unknown config key(s) bogus"),
    ("variants: {none: {gamma: 1}}\n", [], "unknown setting(s) gamma in variant 'none'"),
    ("variants: {none: {batch_size: 0}}\n", [], "--batch-size must be"),
    ("variants: {idaa: {adversary: idaa}}\n", [], "names no VAE"),
    ("variants: {idaa: {adversary: idaa}}\n", ["--vae", "{tmp}/missing.pt"], "does not exist"),
    ("variants: {none: {}}\n", ["--seeds", "0,one"], "--seeds must be integers"),
    ("variants: {none: {}}\n", ["--seeds", "1,1"], "lists a seed twice"),
    ("variants: {none: {}}\n", ["--variants", "idaa"], "unknown variant(s) idaa"),
    ("variants: {none: {}, m: {match_time_of: idaa}}\n", [], "refers to unknown variant 'idaa'"),
    ("variants: {a: {best_of: [b]}, b: {best_of: [a]}}\n", [], "form a cycle"),
    ("variants: {none: {}}\ncompare: [[none, idaa]]\n", [], "'idaa' (in compare or linear) is not one of"),
    ("variants: {none: {}}\ncompare_time: [[none, idaa]]\n", [], "'idaa' (in compare or linear) is not one of"),
    ("variants: {none: {}}\ncompare_time: [none]\n", [], "compare_time entries must be pairs"),
    ("variants: {}\n", [], "has no variants"),
    ("variants: {none: {}}\n", ["--max-steps", "0"], "--max-steps must be"),
])
def test_bad_protocols_exit_2_with_one_line_and_write_nothing(text, extra, message, tmp_path, capsys):
    grid = protocol_file(tmp_path, BASE + text)
    out = tmp_path / "out"
    code, _, err = run(["reproduce", grid, "--out", str(out), *[e.format(tmp=tmp_path) for e in extra]], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_published_records_stand_in_for_lost_run_folders(tmp_path, capsys, monkeypatch):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
  slow: {adversary: random-view}
compare:
  - [slow, none]
linear:
  variants: [slow]
"""
    grid, out, docs = protocol_file(tmp_path, text), tmp_path / "rep", tmp_path / "docs"
    for run_ in plan(read_protocol(grid, out=str(out))):
        fake_run(run_.path, 2, 3.0 if run_.variant == "slow" else 1.0, [45.0, 50.0 + run_.seed])
        (run_.path / "config.yaml").write_text(yaml.safe_dump(run_.config))
        if run_.variant == "slow":
            (run_.path / "eval.json").write_text(json.dumps({
                "linear_top1": 60.0 + run_.seed, "checkpoint_sha256": file_digest(run_.path / "last.ckpt"),
                "reproduce_limit": None}))
    argv = ["reproduce", grid, "--out", str(out), "--publish", str(docs)]
    code, _, err = run([*argv, "--report-only"], capsys)
    assert code == 0, err
    before = list(csv.DictReader((docs / "results.csv").open()))
    shutil.rmtree(out)  # the scratch folder is lost; docs/ was committed

    code, printed, err = run([*argv, "--dry-run"], capsys)
    assert code == 0 and printed.count("done (published record)") == 4 and "(4 finished)" in printed, err

    def no_training(command, name, what):
        raise AssertionError(f"{name} was trained again")

    monkeypatch.setattr(reproduce, "run_child", no_training)
    code, printed, err = run([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert printed.count("is taken from its published record") == 4 and "linear probe" not in printed
    after = list(csv.DictReader((docs / "results.csv").open()))
    columns = ("variant", "seed", "status", "knn_top1", "train_time_s", "monitor_units", "linear_top1")
    assert [[r[c] for c in columns] for r in after] == [[r[c] for c in columns] for r in before]
    assert [r["run"] for r in after] == [str(docs / "runs" / f"{v}-s{s}") for s in (0, 1) for v in ("none", "slow")]
    assert "| slow | none | 50.50 ± 0.71 | 50.50 ± 0.71 | +0.00 |" in (out / "report.md").read_text()

    # a part of the grid (here taken from its records again) still reports, and publishes, the whole grid
    for part in (["--no-progress"], ["--report-only"]):
        code, printed, err = run([*argv, "--seeds", "1", "--variants", "slow", *part], capsys)
        assert code == 0, err
        assert list(csv.DictReader((docs / "results.csv").open())) == after, part
        published = (docs / "report.md").read_text()
        assert "seeds 0, 1; every run" in published and f"    idaa reproduce {grid} --out {out}\n" in published
        assert "| slow | none | 50.50 ± 0.71 | 50.50 ± 0.71 | +0.00 |" in published
    args = argparse.Namespace(protocol=grid, data_dir=None, vae=None, seeds="2", variants="slow", out=str(out),
                              max_steps=None, publish=str(docs))
    whole, command = whole_grid(args, read_protocol(grid, seeds="2", variants="slow", out=str(out)))
    assert whole.seeds == [0, 1, 2] and list(whole.variants) == ["none", "slow"] and whole.linear == ["slow"]
    assert command == f"idaa reproduce {grid} --seeds 0,1,2 --out {out}"

    # a probed variant's record without its probe is incomplete: that run would be trained again
    (docs / "runs" / "slow-s1" / "eval.json").unlink()
    code, printed, _ = run([*argv, "--dry-run"], capsys)
    assert code == 0 and "slow-s1: new" in printed and printed.count("done (published record)") == 3
    # a record of other settings is refused, as a run folder of other settings is
    saved = yaml.safe_load((docs / "runs" / "none-s0" / "config.yaml").read_text())
    (docs / "runs" / "none-s0" / "config.yaml").write_text(yaml.safe_dump({**saved, "lr": 0.5}))
    code, _, err = run([*argv, "--dry-run"], capsys)
    assert code == 2 and "holds a run with lr=0.5" in err and len(err.strip().splitlines()) == 1


def test_runs_taken_from_records_need_no_vae(tmp_path, capsys, monkeypatch):
    """On a fresh machine the VAE is needed only by a run still to train, not by records, reports or a dry run."""
    grid = protocol_file(tmp_path, BASE + "seeds: [0]\nvariants:\n  none: {}\n  adv: {adversary: idaa, eps: 0.1}\n")
    out, docs, vae = tmp_path / "rep", tmp_path / "docs", tmp_path / "gone" / "vae.pt"
    argv = ["reproduce", grid, "--out", str(out), "--publish", str(docs), "--vae", str(vae)]
    for run_ in plan(read_protocol(grid, vae=str(vae), out=str(out)), training=False):
        fake_run(run_.path, 2, 1.0, [45.0, 50.0])
        (run_.path / "config.yaml").write_text(yaml.safe_dump(run_.config))
    code, _, err = run([*argv, "--report-only"], capsys)
    assert code == 0, err
    shutil.rmtree(out)

    def no_training(command, name, what):
        raise AssertionError(f"{name} was trained again")

    monkeypatch.setattr(reproduce, "run_child", no_training)
    for extra in (["--dry-run"], ["--report-only"], ["--no-progress"]):
        code, printed, err = run([*argv, *extra], capsys)
        assert code == 0, (extra, err)
    assert printed.count("is taken from its published record") == 2
    shutil.rmtree(docs / "runs" / "adv-s0")  # now adv-s0 has to train, and its VAE is missing
    code, printed, _ = run([*argv, "--dry-run"], capsys)
    assert code == 0 and "adv-s0: new" in printed
    code, _, err = run([*argv, "--no-progress"], capsys)
    assert code == 2 and f"VAE '{vae}' (variant 'adv') does not exist" in err and len(err.strip().splitlines()) == 1


def test_knn_unit_matching_is_not_bent_by_machine_load(tmp_path):
    text = BASE + """seeds: [0]
match_by: knn-units
variants:
  none: {}
  slow: {adversary: random-view}
  none-time-slow: {match_time_of: slow}
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    runs = plan(protocol)
    fake_run(protocol.out / "runs" / "none-s0", 2, 1.0, [40.0, 50.0])
    # slow costs 3x none's work per epoch but ran on a machine twice as busy: its seconds say 6x
    fake_run(protocol.out / "runs" / "slow-s0", 2, 3.0, [45.0, 55.0], load=2.0)
    _resolve_stage(protocol, ["none-time-slow"], runs, echo=lambda text: None)
    resolved = json.loads((protocol.out / "resolved.json").read_text())["none-time-slow"]
    assert resolved["match_by"] == "knn-units" and resolved["epochs"] == 6, "3x the work of 2 epochs"
    assert round(resolved["target_train_time"] / resolved["seconds_per_epoch"]) == 12, "raw seconds would say 12"
    fake_run(protocol.out / "runs" / "none-time-slow-s0", 6, 1.0, [40.0, 44, 47, 50, 52, 54.0])
    runs = _resolve_stage(protocol, ["none-time-slow"], runs, echo=lambda text: None)
    timed = report_markdown(collect(protocol, runs, "idaa reproduce p.yaml")).split("## At equal training time")[1]
    # the table shows what the match was made on: 12 s against 6 s of raw time, but 12 kNN evaluations each
    assert "| 12.0 / 6.00 (12.0 / 12.0 kNN units) |" in timed and "`match_by: knn-units`" in timed
    with pytest.raises(IdaaError, match="match_by must be one of"):
        read_protocol(protocol_file(tmp_path, text.replace("knn-units", "minutes")), out=str(tmp_path / "x"))


def test_plus_vae_time_adds_the_vaes_training_to_the_matched_budget(tmp_path, tiny_vae):
    from idaa.nets import save_vae

    vae_dir = tmp_path / "vae-run"
    vae_dir.mkdir()
    save_vae(tiny_vae, vae_dir / "vae.pt", {"dataset": "digits"})
    (vae_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "time": 3.0}) + "\n")
    text = BASE + f"""seeds: [0]
match_by: knn-units
variants:
  none: {{}}
  idaa: {{adversary: idaa, vae: {vae_dir / "vae.pt"}}}
  none-time-idaa: {{match_time_of: idaa}}
  none-time-idaa-and-vae: {{match_time_of: idaa, plus_vae_time: true}}
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    runs = plan(protocol)
    fake_run(protocol.out / "runs" / "none-s0", 2, 1.0, [40.0, 50.0])  # 0.5 s per kNN evaluation
    fake_run(protocol.out / "runs" / "idaa-s0", 2, 2.0, [45.0, 55.0])
    _resolve_stage(protocol, ["none-time-idaa", "none-time-idaa-and-vae"], runs, echo=lambda text: None)
    resolved = json.loads((protocol.out / "resolved.json").read_text())
    # idaa: 8 kNN units (4 s at 0.5 s each) over none's 2 per epoch -> 4 epochs; its VAE's 3 s are 6 more units
    assert resolved["none-time-idaa"]["epochs"] == 4 and "vae_train_time" not in resolved["none-time-idaa"]
    assert resolved["none-time-idaa-and-vae"]["epochs"] == 7 and resolved["none-time-idaa-and-vae"][
        "vae_train_time"] == 3.0
    markdown = report_markdown(collect(protocol, plan(protocol, read_resolved(protocol), training=False), "cmd"))
    assert f"- `{vae_dir / 'vae.pt'}` trained in 3 s; used by idaa." in markdown
    with pytest.raises(IdaaError, match="plus_vae_time must be true or false, and goes with match_time_of"):
        read_protocol(protocol_file(tmp_path, text.replace("none: {}", "none: {plus_vae_time: true}")))


def plus_vae_grid(tmp_path: Path, tiny_vae) -> tuple[Path, str]:
    """A saved VAE's folder and a two-seed knn-units protocol: none, idaa with that VAE, SimCLR matched plus VAE."""
    from idaa.nets import save_vae

    vae_dir = tmp_path / "vae-run"
    vae_dir.mkdir()
    save_vae(tiny_vae, vae_dir / "vae.pt", {"dataset": "digits"})
    return vae_dir, BASE + f"""seeds: [0, 1]
match_by: knn-units
variants:
  none: {{}}
  idaa: {{adversary: idaa, vae: {vae_dir / "vae.pt"}}}
  none-time-vae-idaa: {{match_time_of: idaa, plus_vae_time: true}}
"""


def test_the_vaes_seconds_count_at_the_kNN_speed_of_the_reference_seeds_timed_beside_it(tmp_path, tiny_vae):
    vae_dir, text = plus_vae_grid(tmp_path, tiny_vae)
    (vae_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "time": 6.0, "machine": "b",
                                                       "load": 1.9}) + "\n")
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    runs = protocol.out / "runs"
    fake_run(runs / "none-s0", 2, 1.0, [40.0, 50.0], machine="a")  # 0.5 s per kNN evaluation on machine a
    fake_run(runs / "none-s1", 2, 1.0, [40.0, 50.0], load=3.0, machine="b")  # 1.5 s on the VAE's machine b
    for seed in (0, 1):
        fake_run(runs / f"idaa-s{seed}", 2, 2.0, [45.0, 55.0])
    _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)
    found = read_resolved(protocol)["none-time-vae-idaa"]
    # idaa: 8 units; the VAE's 6 s at machine b's 1.5 s per evaluation are 4 more (at both seeds' mean, 1 s: 6)
    assert (found["vae_knn_units"], found["vae_units_from"], found["epochs"]) == (4.0, ["none-s1"], 6)
    markdown = report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))
    assert "- `none-time-vae-idaa` counted its VAE's 6 s as 4.0 kNN evaluations at the speed of those of none-s1, " \
           "timed on the VAE's machine." in markdown
    assert "trained in 6 s while other work shared its CPUs (mean load per CPU 1.90); used by idaa." in markdown
    # any run whose monitor does the same work counts, IDAA's too: idaa-s0 on machine b at 1 s per evaluation
    shutil.rmtree(runs / "idaa-s0")
    fake_run(runs / "idaa-s0", 2, 2.0, [45.0, 55.0], load=2.0, machine="b")
    (protocol.out / "resolved.json").unlink()
    _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)
    found = read_resolved(protocol)["none-time-vae-idaa"]
    assert (found["vae_knn_units"], found["vae_units_from"]) == (6 / 1.25, ["idaa-s0", "none-s1"])
    for name in ("none-s1", "idaa-s0"):  # nothing timed beside the VAE: the reference's mean speed, 1 s
        (runs / name / "metrics.jsonl").write_text(
            (runs / name / "metrics.jsonl").read_text().replace('"machine": "b"', '"machine": "c"'))
    (protocol.out / "resolved.json").unlink()
    _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)
    found = read_resolved(protocol)["none-time-vae-idaa"]
    assert (found["vae_knn_units"], found["vae_units_from"], found["epochs"]) == (6.0, [], 7)
    markdown = report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))
    assert "at the speed of the mean of none's (no run was timed on the VAE's machine)." in markdown


def test_each_run_keeps_its_vaes_timing_for_the_match_and_the_report(tmp_path, tiny_vae, monkeypatch):
    """Every machine trains its own VAE: a run records the one it used, so neither the plus-VAE match nor the report
    depends on the VAE now on disk."""
    vae_dir, text = plus_vae_grid(tmp_path, tiny_vae)
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"), publish=str(tmp_path / "docs"))
    runs = protocol.out / "runs"
    # seed 0 trained on machine a beside a VAE of 6 s; seed 1 on machine b (three times as busy) beside one of 12 s
    for seed, (seconds, machine, load) in enumerate(((6.0, "a", 1.0), (12.0, "b", 3.0))):
        (vae_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "time": seconds, "machine": machine,
                                                           "hardware": "CPU kind"}) + "\n")
        fake_run(runs / f"none-s{seed}", 2, 1.0, [40.0, 50.0], load=load, machine=machine)
        idaa = next(r for r in plan(protocol, training=False) if r.name == f"idaa-s{seed}")
        monkeypatch.setattr(reproduce, "run_child", lambda command, name, what, run_=idaa, m=machine, x=load:
                            fake_run(run_.path, 2, 2.0, [45.0, 55.0], load=x, machine=m))
        reproduce._train(idaa, False, lambda text: None)
        reproduce.publish_run(protocol, idaa)
        assert json.loads((protocol.publish / "runs" / idaa.name / "vae.json").read_text())["seconds"] == seconds
    shutil.rmtree(vae_dir)  # that VAE is gone (a new machine), and so is seed 0's run folder
    shutil.rmtree(runs / "idaa-s0")
    _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)
    found = read_resolved(protocol)["none-time-vae-idaa"]
    # each VAE at its own machine's speed: 6 s / 0.5 s = 12 units, 12 s / 1.5 s = 8 units; mean 10 over idaa's 8,
    # at none's 2 units per epoch: 9 epochs
    assert (found["vae_train_time"], found["vae_knn_units"], found["epochs"]) == (9.0, 10.0, 9)
    assert found["vae_units_from"] == ["idaa-s0", "idaa-s1", "none-s0", "none-s1"]
    markdown = report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))
    assert f"- `{vae_dir / 'vae.pt'}` (used by idaa) trained, by each run's own record, in 6 s on CPU kind for " \
           "idaa-s0; 12 s on CPU kind for idaa-s1." in markdown
    (protocol.publish / "runs" / "idaa-s0" / "vae.json").unlink()  # a run that predates the record
    markdown = report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))
    assert "12 s on CPU kind for idaa-s1; not recorded for idaa-s0 (the VAE there now: an unknown time" in markdown
    (protocol.out / "resolved.json").unlink()
    with pytest.raises(IdaaError, match="does not say how long the VAE trained"):
        _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)


def test_the_report_names_the_runs_trained_beside_other_work(tmp_path):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    for seed, loads in ((0, [0.9, 1.1]), (1, [1.0, 2.0])):  # seed 1 shared its CPUs half the time
        run_dir = protocol.out / "runs" / f"none-s{seed}"
        fake_run(run_dir, 2, 1.0, [40.0, 50.0])
        records = [{**json.loads(line), "load": load}
                   for line, load in zip((run_dir / "metrics.jsonl").read_text().splitlines(), loads, strict=True)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    markdown = report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))
    assert "above 1.25), so their costs, in kNN units too, are bent upward: none-s1 (1.50)." in markdown
    assert "none-s0" not in markdown.split("bent upward")[1].split("\n")[0]


def test_a_pretrain_record_names_its_machine_and_its_load(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", "--limit", "64", "--width", "4", "--batch-size", "32",
                 "--epochs", "1", "--knn-every", "0", "--no-progress", "--out", str(out)]) == 0
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert record["machine"] and record["machine"] == read_run(out, 1).machine
    assert isinstance(record["load"], float) and record["load"] >= 0


def test_the_report_names_the_kinds_of_hardware_when_the_runs_span_more_than_one(tmp_path):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
"""

    def timed_on(kinds, out):
        protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / out))
        for seed, kind in enumerate(kinds):
            run_dir = protocol.out / "runs" / f"none-s{seed}"
            fake_run(run_dir, 2, 1.0, [40.0, 50.0])
            records = [{**json.loads(line), "hardware": kind} for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return report_markdown(collect(protocol, plan(protocol, training=False), "cmd"))

    assert "more than one kind of hardware" not in timed_on(["EPYC (AVX512, native bf16)"] * 2, "one")
    markdown = timed_on(["EPYC (AVX512, native bf16)", "EPYC (AVX2)"], "two")
    assert "compare costs within one kind: EPYC (AVX512, native bf16): none-s0; EPYC (AVX2): none-s1." in markdown


def test_a_bf16_vae_variant_is_not_trained_on_a_cpu_that_emulates_bf16(tmp_path, capsys, monkeypatch, tiny_vae):
    from idaa.nets import save_vae

    vae = tmp_path / "vae.pt"
    save_vae(tiny_vae, vae, {"dataset": "digits"})
    grid = protocol_file(tmp_path, BASE + f"""seeds: [0]
variants:
  idaa-bf16: {{adversary: idaa, vae: {vae}, vae_precision: bf16}}
""")
    out = tmp_path / "rep"
    monkeypatch.setattr(reproduce, "native_bf16", lambda device_type: False)
    code, _, err = run(["reproduce", grid, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "idaa-bf16-s0 runs its VAE in bf16, which" in err and "vae_precision: fp32" in err
    monkeypatch.setattr(reproduce, "run_child", lambda command, name, what: None)  # trains nothing
    monkeypatch.setattr(reproduce, "native_bf16", lambda device_type: True)
    code, _, err = run(["reproduce", grid, "--out", str(out)], capsys)
    assert "runs its VAE in bf16" not in err


def test_the_vaes_seconds_convert_beside_any_run_of_the_grid_whatever_variants_are_selected(tmp_path, tiny_vae):
    from idaa.nets import save_vae

    vae_dir = tmp_path / "vae-run"
    vae_dir.mkdir()
    save_vae(tiny_vae, vae_dir / "vae.pt", {"dataset": "digits"})
    (vae_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "time": 6.0, "machine": "b"}) + "\n")
    text = BASE + f"""seeds: [0, 1]
match_by: knn-units
variants:
  none: {{}}
  none-e3: {{epochs: 3}}
  idaa: {{adversary: idaa, vae: {vae_dir / "vae.pt"}}}
  none-time-vae-idaa: {{match_time_of: idaa, plus_vae_time: true}}
"""
    path = protocol_file(tmp_path, text)
    out = str(tmp_path / "rep")
    runs = Path(out) / "runs"
    for seed in (0, 1):  # the reference and the IDAA runs on machine a, 0.5 s per kNN evaluation
        fake_run(runs / f"none-s{seed}", 2, 1.0, [40.0, 50.0], machine="a")
        fake_run(runs / f"idaa-s{seed}", 2, 2.0, [45.0, 55.0], machine="a")
    fake_run(runs / "none-e3-s0", 3, 1.0, [40.0, 50.0, 52.0], load=3.0, machine="b")  # beside the VAE: 1.5 s
    protocol = read_protocol(path, out=out, variants="none-time-vae-idaa", seeds="0")
    assert "none-e3" not in protocol.variants and "none-e3" in protocol.grid_variants
    _resolve_stage(protocol, ["none-time-vae-idaa"], plan(protocol), echo=lambda text: None)
    found = read_resolved(protocol)["none-time-vae-idaa"]
    # the VAE's 6 s count at none-e3-s0's 1.5 s per evaluation (not the reference's 0.5 s on another machine)
    assert (found["vae_knn_units"], found["vae_units_from"]) == (4.0, ["none-e3-s0"])


def probe(run_dir: Path, top1: float) -> None:
    """The linear probe's record of a run's checkpoint, as `idaa eval linear` leaves it for the report."""
    (run_dir / "eval.json").write_text(json.dumps({"linear_top1": top1, "reproduce_limit": None,
                                                    "checkpoint_sha256": file_digest(run_dir / "last.ckpt")}))


def test_the_goal_is_met_only_by_a_pair_won_by_knn_and_linear_over_every_seed(tmp_path):
    text = BASE + """seeds: [0, 1]
variants:
  none: {}
  slow: {adversary: random-view}
  none-time-slow: {match_time_of: slow}
linear:
  variants: [slow, none-time-slow]
"""
    protocol = read_protocol(protocol_file(tmp_path, text), out=str(tmp_path / "rep"))
    runs_dir = protocol.out / "runs"
    for seed in (0, 1):
        fake_run(runs_dir / f"none-s{seed}", 2, 1.0, [40.0, 50.0])
        fake_run(runs_dir / f"slow-s{seed}", 2, 3.0, [45.0, 55.0 + seed])
        probe(runs_dir / f"slow-s{seed}", 50.0 + seed)
    runs = _resolve_stage(protocol, ["none-time-slow"], plan(protocol), echo=lambda text: None)

    def goal() -> str:
        return readme_section(protocol, plan(protocol), "idaa reproduce p.yaml").split("- slow vs")[0]

    fake_run(runs_dir / "none-time-slow-s0", 6, 1.0, [40.0, 45, 48, 50, 52, 53.0])
    probe(runs_dir / "none-time-slow-s0", 48.0)
    assert "- At 2 epochs: not measured yet. Still training: slow vs none-time-slow: kNN +2.50, linear +2.50 (1/2 " \
           "seeds)." in goal(), "one seed of the baseline: no verdict yet"
    fake_run(runs_dir / "none-time-slow-s1", 6, 1.0, [40.0, 45, 48, 50, 52, 54.0])
    probe(runs_dir / "none-time-slow-s1", 49.0)
    # kNN 55.5 vs 53.5 and linear 50.5 vs 48.5, each with 2 SE 1.41: IDAA better by both
    assert "- At 2 epochs: met by slow." in goal() and "Still training" not in goal()
    probe(runs_dir / "none-time-slow-s1", 51.0)
    # linear 50.5 vs 49.5 (2 SE 3.16): within noise, so the kNN win alone does not meet the goal
    assert ("- At 2 epochs: not met: no IDAA setting beats SimCLR given the same compute by both probes (difference "
            "IDAA - SimCLR: slow vs none-time-slow: kNN +2.00 (2 SE 1.41), linear +1.00 (2 SE 3.16)).") in goal()
    markdown = report_markdown(collect(protocol, runs, "idaa reproduce p.yaml"))
    assert "- At 2 epochs: not met" in markdown.split("## At equal training time")[1].split("##")[0]
