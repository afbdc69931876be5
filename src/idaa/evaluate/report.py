"""`idaa report`: gather eval.json / eval_knn.json / eval_transfer_*.json of many runs into one table.

Results of one checkpoint are merged into one run; runs whose pretraining configs differ only in the seed
(and in paths or bookkeeping such as the output folder or the device) form one row, reported as mean ± sample
std over the seeds present. Rows are labelled by method + adversary, with the pretraining dataset alongside;
when two rows would share a label, the config keys that tell them apart are appended. The README's tables are
generated with this, not typed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idaa.errors import IdaaError

RESULT_GLOBS = ("eval.json", "eval_knn.json", "eval_transfer_*.json")
# config keys that do not change what is trained: seeds are averaged over, the rest is bookkeeping
NOT_A_SETTING = {"seed", "out", "device", "download", "data_dir", "vae", "knn_every", "checkpoint_every",
                 "checkpoint_steps", "skip_nonfinite", "max_steps", "command", "embed_map"}
ADVERSARY_ORDER = ("none", "random-view", "latent-noise", "clae", "idaa-nodecomp", "idaa")
FORMATS = ("markdown", "csv")


@dataclass
class Run:
    """Every evaluation of one checkpoint."""

    config: dict[str, Any]
    knn: float | None = None
    linear_top1: float | None = None
    linear_top5: float | None = None
    transfer: dict[str, float] = field(default_factory=dict)


def find_result_files(paths: list[str]) -> list[Path]:
    """Result files named directly, or found recursively under folders; none at all is an error."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for pattern in RESULT_GLOBS:
                found.extend(sorted(path.rglob(pattern)))
        else:
            raise IdaaError(f"'{path}' does not exist")
    if not found:
        raise IdaaError(f"no eval.json, eval_knn.json or eval_transfer_*.json under {', '.join(paths)}")
    return sorted(set(found), key=lambda p: (p.stat().st_mtime, str(p)))  # newest last: it wins a duplicate


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IdaaError(f"'{path}' is not a readable JSON result ({type(exc).__name__})") from None
    if not isinstance(record, dict) or not ({"knn_top1", "linear_top1"} & record.keys()):
        raise IdaaError(f"'{path}' is not an idaa evaluation result (no knn_top1 or linear_top1)")
    return record


def _config(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The pretraining config: stored in the result, else the run's config.yaml beside it or its checkpoint."""
    if isinstance(record.get("config"), dict):
        return record["config"]
    for folder in (path.parent, Path(str(record.get("checkpoint", ""))).parent):
        if (folder / "config.yaml").is_file():
            loaded = yaml.safe_load((folder / "config.yaml").read_text())
            if isinstance(loaded, dict):
                return loaded
    return {"method": record.get("method", "?"), "adversary": record.get("adversary", "?"),
            "dataset": record.get("pretrain_dataset") or record.get("dataset", "?")}


def collect_runs(paths: list[str]) -> list[Run]:
    """One Run per checkpoint (by content hash, else by path), holding every result found for it."""
    runs: dict[str, Run] = {}
    for path in find_result_files(paths):
        record = _read(path)
        key = record.get("checkpoint_sha256") or str(Path(str(record.get("checkpoint", path))).resolve())
        run = runs.setdefault(key, Run(_config(record, path)))
        kind = record.get("kind") or ("knn" if "knn_top1" in record else "linear")
        if kind == "knn":
            run.knn = float(record["knn_top1"])
        elif kind == "transfer":
            run.transfer[str(record.get("transfer_name") or record.get("dataset"))] = float(record["linear_top1"])
        else:
            run.linear_top1, run.linear_top5 = float(record["linear_top1"]), float(record.get("linear_top5", "nan"))
    return list(runs.values())


def _setting(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in NOT_A_SETTING}, sort_keys=True, default=str)


def _mean_std(values: list[float]) -> tuple[float, float | None, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, None, 0
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None, 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)), len(values)


def summarise(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric columns, rows): one row per group of runs that differ only in seed, mean/std per column."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_setting(run.config), []).append(run)
    transfers = sorted({name for run in runs for name in run.transfer})
    columns = ["knn_top1", "linear_top1", "linear_top5"] + [f"transfer_{name}_top1" for name in transfers]
    rows = []
    for members in groups.values():
        cfg = members[0].config
        row: dict[str, Any] = {"method": cfg.get("method", "?"), "adversary": cfg.get("adversary", "?"),
                               "dataset": cfg.get("dataset", "?"), "seeds": len(members),
                               "setting": json.loads(_setting(cfg))}
        values = {"knn_top1": [r.knn for r in members], "linear_top1": [r.linear_top1 for r in members],
                  "linear_top5": [r.linear_top5 for r in members]}
        values.update({f"transfer_{n}_top1": [r.transfer.get(n) for r in members] for n in transfers})
        for column in columns:
            row[column] = _mean_std(values[column])
        rows.append(row)
    _label(rows)
    rank = {name: i for i, name in enumerate(ADVERSARY_ORDER)}
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["method"]), rank.get(r["adversary"], len(rank)),
                             str(r["adversary"]), r["label"]))
    return columns, rows


def _label(rows: list[dict[str, Any]]) -> None:
    """'method + adversary', plus the settings that differ between rows that would otherwise look the same."""
    by_label: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        row["label"] = f"{row['method']} + {row['adversary']}"
        by_label.setdefault((row["label"], str(row["dataset"])), []).append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for r in same for k in r["setting"]})
        differing = [k for k in keys if len({json.dumps(r["setting"].get(k), default=str) for r in same}) > 1]
        for row in same:
            row["label"] += " (" + ", ".join(f"{k}={row['setting'].get(k)}" for k in differing) + ")"


_TITLES = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "linear_top5": "linear top-5"}


def _title(column: str) -> str:
    if column in _TITLES:
        return _TITLES[column]
    return f"transfer {column.removeprefix('transfer_').removesuffix('_top1')} top-1"


def _cell(stat: tuple[float, float | None, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table; cells are mean ± std over seeds (std only where several seeds exist)."""
    header = ["method + adversary", "dataset", "seeds"] + [_title(c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(columns)) + "|"]
    for row in rows:
        cells = [row["label"], str(row["dataset"]), str(row["seeds"])] + [_cell(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV with a mean and a std column per metric (std empty for a single seed, both empty when missing)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "method", "adversary", "dataset", "seeds"]
                    + [f"{c}_{part}" for c in columns for part in ("mean", "std")])
    for row in rows:
        stats = []
        for column in columns:
            mean, std, n = row[column]
            stats += [f"{mean:.6f}" if n else "", f"{std:.6f}" if std is not None else ""]
        writer.writerow([row["label"], row["method"], row["adversary"], row["dataset"], row["seeds"], *stats])
    return buffer.getvalue()


def build_report(paths: list[str], fmt: str = "markdown") -> str:
    """The whole report text for result files/folders `paths` in `fmt` (markdown or csv)."""
    if fmt not in FORMATS:
        raise IdaaError(f"--format must be markdown or csv, got {fmt!r}")
    columns, rows = summarise(collect_runs(paths))
    return to_markdown(columns, rows) if fmt == "markdown" else to_csv(columns, rows)
