"""The spine issue's CPU protocol: a method with none / random-view / clae / idaa, same seed and epochs.

    python benchmarks/spine_protocol.py --data-dir .cache/data/cifar10_jpg --vae runs/vae-cifar10-10k/vae.pt
    python benchmarks/spine_protocol.py ... --method simsiam --adversaries none,idaa   # -> runs/protocol-simsiam
    python benchmarks/spine_protocol.py ... --adversaries idaa --suffix=-clean --extra=--attack-graph=clean
        # -> runs/protocol/idaa-clean: the same protocol with extra `idaa pretrain` flags

Runs `idaa pretrain --config configs/cpu-protocol-cifar10.yaml` once per adversary (sequentially; a finished run is
reused and an interrupted one resumed from its last.ckpt, so the script can simply be re-run) and prints a markdown
table of the final kNN top-1 accuracy (k=200, T=0.1, backbone features, full test set) and the wall time of each
run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def finished(run: Path, epochs: int) -> dict | None:
    """The last metrics record of a completed run, else None."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return records[-1] if records and records[-1]["epoch"] == epochs and "knn_top1" in records[-1] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--out", default=None, help="default runs/protocol (simclr) or runs/protocol-METHOD")
    parser.add_argument("--method", default="simclr", help="any registered method; the protocol is unchanged")
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-protocol-cifar10.yaml"))
    parser.add_argument("--adversaries", default="none,random-view,clae,idaa")
    parser.add_argument("--idaa-eps", type=float, default=0.1, help="latent eps for idaa (the orientation used 0.1)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", action="append", default=[],
                        help="an extra `idaa pretrain` argument (repeatable; write --extra=--flag=value)")
    parser.add_argument("--suffix", default="",
                        help="appended to each run folder's name, to keep variants apart (write --suffix=-name)")
    args = parser.parse_args()
    args.out = args.out or ("runs/protocol" if args.method == "simclr" else f"runs/protocol-{args.method}")

    rows = []
    for adversary in args.adversaries.split(","):
        run = Path(args.out) / (adversary + args.suffix)
        command = [sys.executable, "-m", "idaa", "pretrain", "--config", args.config, "--method", args.method,
                   "--adversary", adversary,
                   "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--seed", str(args.seed),
                   "--out", str(run), "--no-progress", *args.extra]
        if adversary in ("idaa", "idaa-nodecomp", "latent-noise"):
            command += ["--vae", args.vae, "--eps", str(args.idaa_eps)]
        record = finished(run, args.epochs)
        if record is None:
            if (run / "last.ckpt").is_file():  # an interrupted run continues exactly where it stopped
                command = [sys.executable, "-m", "idaa", "pretrain", "--resume", "--out", str(run), "--no-progress"]
            elif run.exists():
                command.append("--overwrite")
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, check=True)
            record = finished(run, args.epochs)
        rows.append({"adversary": adversary + args.suffix, "knn_top1": record["knn_top1"], "seconds": record["time"]})

    base = next((r["seconds"] for r in rows if r["adversary"] == "none"), None)
    print(f"\n| {args.method} + | kNN top-1 (%) | wall time (s) | time vs none |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        print(f"| {r['adversary']} | {r['knn_top1']:.2f} | {r['seconds']:.0f} | {ratio} |")
    (Path(args.out) / f"table{args.suffix}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
