"""FixMatch against the supervised-only baseline on the embedded digits data, same labelled split, seed and steps.

    python benchmarks/semi_digits.py                      # 50 labels, FixMatch (no adversary) vs supervised
    python benchmarks/semi_digits.py --adversaries none,clae
    python benchmarks/semi_digits.py --adversaries none,idaa --vae runs/demo/vae/vae.pt

Runs `idaa semi --method supervised` and `idaa semi --method fixmatch` (once per adversary) one after the other,
each in its own process with --threads torch threads (1 by default: on a shared 2-core machine a second thread
mostly waits), and prints a markdown table of the final test accuracy of the EMA model on the 359 held-out
digits, the mask rate and pseudo-label accuracy of FixMatch's last interval, and the wall time of each run.

The protocol is sized for a laptop CPU: a WideResNet-16-1, 16 labelled + 7 x 16 unlabelled images per step,
FixMatch's SGD (0.03, Nesterov, cosine to 7/16 pi) and threshold 0.95; the EMA decay is 0.99 instead of 0.999
because 0.999 averages over ~1000 steps, longer than the whole run. Both methods get every setting alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def last_record(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/semi_digits")
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backbone", default="wrn16-1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--adversaries", default="none", help="comma-separated adversaries for FixMatch")
    parser.add_argument("--vae", default=None, help="vae.pt trained on digits, for idaa/idaa-nodecomp/latent-noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    common = ["--dataset", "digits", "--labels", str(args.labels), "--steps", str(args.steps),
              "--backbone", args.backbone, "--batch-size", str(args.batch_size), "--mu", str(args.mu),
              "--threshold", str(args.threshold), "--ema-decay", str(args.ema_decay), "--lr", str(args.lr),
              "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--device", "cpu", "--no-progress",
              "--overwrite"]
    runs = [("supervised", "none")] + [("fixmatch", a) for a in args.adversaries.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for method, adversary in runs:
        name = method if method == "supervised" else f"fixmatch+{adversary}"
        out = Path(args.out) / name
        command = [sys.executable, "-m", "idaa", "semi", "--method", method, "--out", str(out), *common]
        if adversary != "none":
            command += ["--adversary", adversary]
            if adversary in ("idaa", "idaa-nodecomp", "latent-noise"):
                command += ["--vae", str(args.vae)]
        print("$ " + " ".join(command), flush=True)
        began = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        record = last_record(out)
        rows.append({"run": name, "labels": args.labels, "steps": record["step"], "test_top1": record["test_top1"],
                     "mask_rate": record.get("mask_rate"), "pseudo_label_acc": record.get("pseudo_label_acc"),
                     "seconds": time.perf_counter() - began})

    print(f"\ndigits, {args.labels} labels, {args.backbone}, batch {args.batch_size} + {args.mu}x unlabelled, "
          f"{args.steps} steps, seed {args.seed}, EMA decay {args.ema_decay}\n")
    print("| run | labels | steps | EMA test top-1 (%) | mask rate | pseudo-label acc (%) | wall time (s) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mask = f"{r['mask_rate']:.2f}" if r["mask_rate"] is not None else "-"
        pseudo = f"{r['pseudo_label_acc']:.1f}" if r["pseudo_label_acc"] is not None else "-"
        print(f"| {r['run']} | {r['labels']} | {r['steps']} | {r['test_top1']:.2f} | {mask} | {pseudo} | "
              f"{r['seconds']:.0f} |")
    (Path(args.out) / "table.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
