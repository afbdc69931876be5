"""Streaming data source: decode+crop throughput, time a training step waits for data, peak RSS, in-memory cost.

Usage: python benchmarks/bench_data.py [--files 10000] [--skip-rss] [--throughput-only]

Realistic inputs are made once under .cache/bench_data/ (never committed): the CIFAR-10 JPEG archive
(../shared/data/cifar10-jpg.tar.xz) unpacked, its training images upsampled to random sizes around 400 x 350
and saved as JPEG q90 (10 classes), plus a few 2000 px photos-sized images; the throughput sample is timed
again with an EXIF block added, as camera photos carry one. All ratios come from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idaa.data.crops import crop_boxes, crop_views
from idaa.data.feeds import TensorFeed, make_feed
from idaa.data.memory import ImageDataset
from idaa.data.options import StreamOptions
from idaa.data.sources import open_dataset
from idaa.data.views import build_view_policy

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_data"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.xz"


def make_inputs(files: int, big: int = 20) -> Path:
    """CIFAR-10 training JPEGs upsampled to ~400 x 350 (q90) in class folders, plus `big` 2000 px images."""
    folder = CACHE / f"realistic{files}"
    if (folder / ".done").is_file():
        return folder
    if not (CACHE / "cifar10_jpg").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(CACHE, filter="data")
    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in (CACHE / "cifar10_jpg" / "train").iterdir())
    for k in range(files):
        c = classes[k % len(classes)]
        src = CACHE / "cifar10_jpg" / "train" / c / f"{k // len(classes):04d}.jpg"
        w, h = int(rng.integers(320, 480)), int(rng.integers(280, 420))
        if k < big:
            w, h = 2000, int(rng.integers(1300, 1700))
        (folder / c).mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(folder / c / f"{k:06d}.jpg",
                                                                                   quality=90)
    (folder / ".done").touch()
    return folder


def with_exif(files: list[str]) -> list[str]:
    """Copies of `files` carrying an EXIF block (orientation 1 and a camera make, as photos from a camera do), the
    block inserted after the start marker so the pixels stay the same bytes; made once under the cache."""
    folder = CACHE / "exif-sample"
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110] = 1, "Camera maker", "Camera model"
    block = exif.tobytes()
    copies = []
    for path in files:
        target = folder / Path(path).name
        if not target.is_file():
            data = Path(path).read_bytes()
            folder.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[:2] + b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block + data[2:])
        copies.append(str(target))
    return copies


def plain_crop(path: str, size: int, rng: random.Random) -> torch.Tensor:
    """The plain path: full Pillow decode, then the same random-resized crop resized with Pillow."""
    img = Image.open(path).convert("RGB")
    x0, y0, cw, ch = crop_boxes(img.size[0], img.size[1], rng, (0.08, 1.0))
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def throughput(files: list[str], label: str, rounds: int = 5) -> list[tuple[str, float, float, float, float]]:
    """Images/s in one process (= per worker: one torch thread, as in a DataLoader worker) for the streaming crop
    (training default: fast decoding; and exact decoding) and the plain path, at 224 and 64 px."""
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    for size in (224, 64):
        times: dict[str, list[float]] = {"stream": [], "exact": [], "plain": []}
        for _ in range(rounds):  # interleaved, so all see the same machine load
            for key, fast in (("stream", True), ("exact", False)):
                start = time.perf_counter()
                for i, path in enumerate(files):
                    crop_views(path, i, 0, 0, size, (0.08, 1.0), 1, fast_decode=fast)
                times[key].append(len(files) / (time.perf_counter() - start))
            rng = random.Random(0)
            start = time.perf_counter()
            for path in files:
                plain_crop(path, size, rng)
            times["plain"].append(len(files) / (time.perf_counter() - start))
        stream, exact, plain = (statistics.median(times[k]) for k in ("stream", "exact", "plain"))
        rows.append((f"{label} -> {size} px", stream, exact, plain, stream / plain))
    torch.set_num_threads(threads)
    return rows


def data_wait(folder: Path, workers: int, steps: int, batch: int) -> dict[str, float]:
    """SimCLR + ResNet-18 steps at 64 px on streamed crops: the share of each step spent waiting for a batch."""
    from idaa.checkpoints import build_from_config
    from idaa.train.config import PretrainConfig

    cfg = dataclasses.asdict(PretrainConfig(out="x", backbone="resnet18"))
    data = open_dataset("folder", folder, options=StreamOptions(stream=True, image_size=64, workers=workers))
    device = torch.device("cpu")
    method = build_from_config(cfg).train()
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-4)
    feed = make_feed(data, device, batch)
    views = build_view_policy("simclr", 64, data.mean, data.std, crop=False)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: batch * (steps + 2)]
    waits, totals = [], []
    iterator = iter(feed.batches(1, order))
    last = time.perf_counter()
    for _ in range(steps + 2):
        b = next(iterator)
        got = time.perf_counter()
        loss = method(views(b.first), views(b.second), None, None, 1.0)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        waits.append(got - last)
        totals.append(now - last)
        last = now
    waits, totals = waits[2:], totals[2:]  # the first batches include worker start-up
    return {"step_s": statistics.median(totals), "wait_s": statistics.median(waits),
            "wait_share": sum(waits) / sum(totals)}


def peak_rss(folder: Path, out: Path) -> dict[str, float]:
    """Peak memory (MB) of `idaa pretrain --max-steps 20` on the folder, listing cold (its caches removed first): the
    main process's RSS, and the process tree's RSS and PSS summed (RSS counts pages the forked workers share with
    the main process once per process; PSS splits them, so its sum is the memory the run really holds)."""
    for cache in (*folder.glob(".idaa-listing-*.json"), *folder.glob(".idaa-stats-*.json")):
        cache.unlink()
    command = [sys.executable, "-m", "idaa", "pretrain", "--dataset", "folder", "--data-dir", str(folder),
               "--stream", "--image-size", "64", "--max-steps", "20", "--batch-size", "32", "--width", "8",
               "--knn-every", "0", "--workers", "2", "--epochs", "1", "--out", str(out), "--overwrite",
               "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    main_peak = tree_peak = pss_peak = 0
    while proc.poll() is None:
        pids = [proc.pid] + _children(proc.pid)
        rss = [_status_kb(p, "status", "VmRSS:") for p in pids]
        pss = sum(_status_kb(p, "smaps_rollup", "Pss:") for p in pids)
        main_peak, tree_peak, pss_peak = max(main_peak, rss[0]), max(tree_peak, sum(rss)), max(pss_peak, pss)
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"pretrain on {folder} failed with exit code {proc.returncode}")
    return {"main_mb": main_peak / 1024, "tree_mb": tree_peak / 1024, "pss_mb": pss_peak / 1024}


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _status_kb(pid: int, name: str, field: str) -> int:
    """A kB field of /proc/PID/status or /proc/PID/smaps_rollup (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hard_linked(folder: Path, copies: int) -> Path:
    """A folder with `copies` hard links of every file of `folder` (10x the files, no extra disk)."""
    target = folder.with_name(folder.name + f"x{copies}")
    if (target / ".done").is_file():
        return target
    for src in sorted(folder.rglob("*.jpg")):
        for k in range(copies):
            dst = target / src.parent.name / f"{k}-{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(src, dst)
    (target / ".done").touch()
    return target


def in_memory_cost(batches: int = 20, batch: int = 256, rounds: int = 7) -> tuple[float, float]:
    """ms per batch of two SimCLR views on CIFAR-sized data: direct slicing (before) vs TensorFeed (now)."""
    images = torch.randint(0, 256, (batch * batches, 3, 32, 32), dtype=torch.uint8)
    data = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64), [], "bench", (0.5,) * 3, (0.25,) * 3)
    views = build_view_policy("simclr", 32, data.mean, data.std)
    feed = TensorFeed(data, torch.device("cpu"), batch, batch)
    order = torch.randperm(len(images))
    before, after = [], []
    for _ in range(rounds):  # interleaved; the fastest round of each is the least disturbed by other load
        start = time.perf_counter()
        for i in range(batches):
            x = images[order[i * batch:(i + 1) * batch]]
            views(x), views(x)
        before.append((time.perf_counter() - start) / batches * 1e3)
        start = time.perf_counter()
        for b in feed.batches(1, order):
            views(b.first), views(b.second)
        after.append((time.perf_counter() - start) / batches * 1e3)
    return min(before), min(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--sample", type=int, default=1000, help="files timed for decode throughput")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps for the data wait")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--throughput-only", action="store_true", help="only the decode + crop table")
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    folder = make_inputs(args.files)
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    big = [f for f in files if int(Path(f).stem) < 20]
    sample = [f for f in files if int(Path(f).stem) >= 20][:: max(1, len(files) // args.sample)][: args.sample]
    print(f"inputs: {len(files)} JPEGs (q90, ~400x350, {len(big)} of 2000 px) in {folder}; {len(sample)} + "
          f"{len(big)} timed; {os.cpu_count()} cores\n")
    print("| crop | streaming (libjpeg-turbo, draft scales, fast decode) img/s per worker | the same, exact decode "
          "| plain Pillow decode + crop img/s | ratio (fast / plain) | ratio (exact / plain) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = throughput(sample, "~400x350") + throughput(with_exif(sample), "~400x350 with EXIF")
    for name, stream, exact, plain, ratio in rows + throughput(big, "2000 px"):
        print(f"| {name} | {stream:.0f} | {exact:.0f} | {plain:.0f} | {ratio:.2f}x | {exact / plain:.2f}x |")
    if args.throughput_only:
        return
    wait = data_wait(folder, workers=2, steps=args.steps, batch=args.batch_size)
    print(f"\n| ResNet-18 SimCLR step, 64 px, batch {args.batch_size}, 2 workers | step (s) | waiting for data (s) | "
          "share |\n| --- | ---: | ---: | ---: |")
    print(f"| median over {args.steps} steps | {wait['step_s']:.3f} | {wait['wait_s']:.3f} | "
          f"{100 * wait['wait_share']:.1f}% |")
    before, after = in_memory_cost()
    print("\n| in-memory path (CIFAR size, batch 256, two views) | ms per batch |\n| --- | ---: |")
    print(f"| slicing in the loop (before) | {before:.1f} |\n| TensorFeed (now) | {after:.1f} |")
    if args.skip_rss:
        return
    rows = []
    for target in (folder, hard_linked(folder, 10)):
        n = sum(1 for _ in target.rglob("*.jpg"))
        rows.append((n, peak_rss(target, CACHE / "rss-run")))
    print("\n| `idaa pretrain --max-steps 20` (streamed, 64 px, 2 workers, cold listing) | peak RSS main (MB) | "
          "peak RSS process tree (MB) | peak PSS process tree (MB) |\n| --- | ---: | ---: | ---: |")
    for n, rss in rows:
        print(f"| {n} files | {rss['main_mb']:.0f} | {rss['tree_mb']:.0f} | {rss['pss_mb']:.0f} |")
    print(f"| difference | {rows[1][1]['main_mb'] - rows[0][1]['main_mb']:.0f} | "
          f"{rows[1][1]['tree_mb'] - rows[0][1]['tree_mb']:.0f} | {rows[1][1]['pss_mb'] - rows[0][1]['pss_mb']:.0f} |")


if __name__ == "__main__":
    main()
