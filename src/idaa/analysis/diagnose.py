"""Identity-preservation diagnostic (paper Fig. 1b/1c, Sec. 4.1 and D.1).

Per sample: the distance from the anchor to its positive (hardness) and to its nearest negative, in the
embedding the contrastive loss is applied to. A positive closer than the nearest negative keeps the sample's
identity; the boundary d_pos = d_neg separates the two. Random augmentation, CLAE and IDAA are compared on the
same anchors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idaa.analysis.plots import AUGMENTATION_COLORS, AUGMENTATION_LABELS, kde, new_figure
from idaa.analysis.setup import AttackSetup, attacked_views, loss_embedding
from idaa.errors import IdaaError

AUGMENTATIONS = ("random", "clae", "idaa")


def identity_distances(anchors: torch.Tensor, positives: torch.Tensor,
                       negatives: str = "anchors") -> tuple[torch.Tensor, torch.Tensor]:
    """(d_pos, d_neg): ||a_i - p_i|| and min over j != i of ||a_i - n_j||, on L2-normalised rows.

    `negatives="anchors"` takes n_j = a_j (the other samples' anchors, the same for every augmentation);
    `"positives"` takes n_j = p_j (the other samples' augmented views, the NT-Xent negatives).
    """
    if negatives not in ("anchors", "positives"):
        raise IdaaError(f"negatives must be 'anchors' or 'positives', got {negatives!r}")
    if anchors.shape != positives.shape or anchors.ndim != 2 or len(anchors) < 2:
        raise IdaaError(f"need two N x D embeddings with N >= 2, got {tuple(anchors.shape)} and "
                        f"{tuple(positives.shape)}")
    a = torch.nn.functional.normalize(anchors.double(), dim=1)
    p = torch.nn.functional.normalize(positives.double(), dim=1)
    pool = a if negatives == "anchors" else p
    d_pos = (a - p).norm(dim=1)
    dist = torch.cdist(a, pool, compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(float("inf"))
    return d_pos, dist.min(dim=1).values


def summarise(d_pos: torch.Tensor | np.ndarray, d_neg: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Fraction identity-preserved (d_pos < d_neg), median hardness (median d_pos) and a few more statistics."""
    pos, neg = np.asarray(d_pos, dtype=np.float64), np.asarray(d_neg, dtype=np.float64)
    margin = pos - neg
    return {"identity_preserved": float(np.mean(pos < neg)), "median_hardness": float(np.median(pos)),
            "mean_hardness": float(np.mean(pos)), "median_nearest_negative": float(np.median(neg)),
            "median_margin": float(np.median(margin)), "n": int(len(pos))}


def run_diagnostic(setup: AttackSetup, n: int = 512, batch_size: int | None = None, attack_view: str = "v1",
                   negatives: str = "anchors", bn: str = "loss", seed: int = 0) -> dict[str, Any]:
    """Distances and summary for random / CLAE / IDAA positives of `n` seeded, class-balanced samples.

    Attacks run in batches of the run's training batch size (the anchored loss depends on the batch); the
    nearest negative is searched among all `n` samples. `bn="loss"` embeds adversarial positives through the
    adversarial BN, as the training loss does; `"main"` embeds every view through the main BN.
    """
    if n < 2:
        raise IdaaError(f"--n must be >= 2 (a sample needs a negative), got {n}")
    if bn not in ("loss", "main"):
        raise IdaaError(f"--bn must be 'loss' or 'main', got {bn!r}")
    if n > len(setup.data):
        raise IdaaError(f"--n {n} is larger than the {setup.data.name} split ({len(setup.data)} images)")
    batch_size = int(batch_size or setup.config.get("batch_size") or 256)
    if batch_size < 2:
        raise IdaaError(f"--batch-size must be >= 2, got {batch_size}")
    subset = setup.data.take(n, seed=seed)
    torch.manual_seed(seed)
    embeddings: dict[str, list[torch.Tensor]] = {"anchor": [], **{name: [] for name in AUGMENTATIONS}}
    for chunk in subset.images.split(batch_size):
        views = attacked_views(setup, chunk, on=attack_view)
        with torch.no_grad():
            embeddings["anchor"].append(loss_embedding(setup.method, views["anchor"]))
            embeddings["random"].append(loss_embedding(setup.method, views["random"]))
            for name in ("clae", "idaa"):
                embeddings[name].append(loss_embedding(setup.method, views[name], adv=bn == "loss"))
    anchors = torch.cat(embeddings["anchor"])
    summary, samples = {}, {}
    for name in AUGMENTATIONS:
        d_pos, d_neg = identity_distances(anchors, torch.cat(embeddings[name]), negatives)
        summary[name] = summarise(d_pos.cpu(), d_neg.cpu())
        samples[name] = {"d_pos": [round(v, 6) for v in d_pos.tolist()],
                         "d_neg": [round(v, 6) for v in d_neg.tolist()]}
    return {"source": setup.source, "dataset": setup.data.name, "n": n, "batch_size": batch_size,
            "attack_view": attack_view, "negatives": negatives, "bn": bn, "eps": setup.eps, "seed": seed,
            "notes": list(setup.notes), "summary": summary, "samples": samples}


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of the summary (fractions in percent)."""
    eps = result["eps"]
    lines = ["| augmentation | eps | identity-preserved (%) | median hardness d_pos | median d_nearest_neg |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in AUGMENTATIONS:
        s = result["summary"][name]
        budget = f"{eps[name]:g}" if name in eps else "-"
        lines.append(f"| {AUGMENTATION_LABELS[name]} | {budget} | {100 * s['identity_preserved']:.1f} | "
                     f"{s['median_hardness']:.3f} | {s['median_nearest_negative']:.3f} |")
    return "\n".join(lines)


def plot_diagnostic(result: dict[str, Any], path: str | Path) -> Path:
    """Scatter d_pos vs d_nearest_neg with the identity-preserving boundary, and the density of d_pos - d_neg."""
    fig = new_figure(11.5, 4.6)
    scatter, density = fig.subplots(1, 2)
    top = max(max(max(s["d_pos"]), max(s["d_neg"])) for s in result["samples"].values()) * 1.05
    for name in AUGMENTATIONS:
        s, stats = result["samples"][name], result["summary"][name]
        label = f"{AUGMENTATION_LABELS[name]} ({100 * stats['identity_preserved']:.0f}% preserved)"
        scatter.scatter(s["d_pos"], s["d_neg"], s=7, alpha=0.5, color=AUGMENTATION_COLORS[name], label=label,
                        linewidths=0)
        margin = np.asarray(s["d_pos"]) - np.asarray(s["d_neg"])
        grid, values = kde(margin)
        density.plot(grid, values, color=AUGMENTATION_COLORS[name], label=AUGMENTATION_LABELS[name])
        density.fill_between(grid, values, alpha=0.15, color=AUGMENTATION_COLORS[name])
    scatter.plot([0, top], [0, top], color="black", linewidth=1, linestyle="--", label="identity-preserving boundary")
    scatter.fill_between([0, top], [0, 0], [0, top], color="black", alpha=0.05)
    scatter.set(xlim=(0, top), ylim=(0, top), xlabel="distance anchor -> positive (hardness)",
                ylabel="distance anchor -> nearest negative", title="(b) below the line: identity changed")
    scatter.legend(fontsize=8, loc="upper left")
    density.axvline(0, color="black", linewidth=1, linestyle="--")
    density.set(xlabel="d_pos - d_nearest_neg  (> 0: identity changed)", ylabel="density",
                title="(c) kernel density of the margin")
    density.legend(fontsize=8)
    fig.suptitle(f"{result['dataset']}, {result['n']} samples, {Path(str(result['source'])).parent}: "
                 f"eps CLAE {result['eps']['clae']:g}, IDAA {result['eps']['idaa']:g}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_diagnostic(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """diagnose.png and diagnose.json (summary, settings and per-sample distances) in `out_dir`."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdaaError(f"cannot create output folder '{out}' ({exc.strerror or type(exc).__name__})") from None
    png = plot_diagnostic(result, out / "diagnose.png")
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))
    return png, out / "diagnose.json"
