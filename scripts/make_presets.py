"""Write configs/paper/*.yaml: a preset per row of the paper's Tables 1, 2, 3, 4, 6, 9, 10 and 12.

    python scripts/make_presets.py          # (re)write the presets
    python scripts/make_presets.py --check  # exit 1 if configs/paper differs from what this script writes

The recipes follow SPEC section 2 (each method's reference recipe) and the paper's appendix C.1; Table 6
(FixMatch) presets live beside them as semi-table6-*.yaml for `idaa semi --config`. A test keeps them in sync.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "configs" / "paper"

DATA = {  # dataset -> (config fields, the VAE it expects, a note)
    "cifar10": ({"dataset": "cifar10"}, "runs/vae-cifar10/vae.pt", ""),
    "cifar100": ({"dataset": "cifar100"}, "runs/vae-cifar100/vae.pt", ""),
    "miniimagenet": ({"dataset": "folder", "data_dir": "data/miniimagenet-64"}, "runs/vae-miniimagenet/vae.pt",
                     "miniImageNet (Ebrahimi et al. 2020 split) as data/miniimagenet-64/{train,test}/<class>/*, "
                     "images resized to 64 px"),
    "imagenet": ({"dataset": "folder", "data_dir": "data/imagenet-224"}, "runs/vae-imagenet/vae.pt",
                 "ImageNet as data/imagenet-224/{train,test}/<class>/*, center-cropped to 224 px"),
    "imagenet100": ({"dataset": "imagenet100", "data_dir": "data/imagenet", "image_size": 224},
                    "runs/vae-imagenet100/vae.pt",
                    "ImageNet-100 (CMC's 100 classes, shipped in idaa) read from the ImageNet folder data/imagenet "
                    "(train/<wnid>/, val/), streamed at 224 px; on a cluster pack it once with `idaa data pack "
                    "data/imagenet --dataset imagenet100 --out data/imagenet100-shards` and pass --data-dir "
                    "data/imagenet100-shards"),
}
# Tables 4 and 9: linear transfer of the ImageNet-100 backbone to eight datasets (layouts: docs/data.md)
TRANSFER = [("cifar10", "data/cifar10"), ("cifar100", "data/cifar100"), ("birdsnap", "data/birdsnap"),
            ("aircraft", "data/fgvc-aircraft-2013b"), ("dtd", "data/dtd"), ("pets", "data/oxford-iiit-pet"),
            ("flowers102", "data/flowers-102"), ("cub200", "data/CUB_200_2011")]
EPS = {"idaa": 0.15, "clae": 0.03, "idaa-nodecomp": 0.15}

# SPEC section 2: each method's reference recipe.
CLAE_RECIPE = {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128}
RECIPES = {
    "plain": CLAE_RECIPE, "uel": CLAE_RECIPE,
    "simclr": {"optimizer": "adam", "lr": 3e-4, "weight_decay": 1e-6, "batch_size": 256},
    "simsiam": {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256},
    "hcl": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6, "batch_size": 256},
    "debiased": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6, "batch_size": 256},
}


def preset(table: str, method: str, data: str, adversary: str, epochs: int, backbone: str,
           vae: str | None = None, **extra: object) -> tuple[str, dict, str]:
    suffix = extra.pop("_suffix", None)
    fields, default_vae, note = DATA[data]
    cfg: dict = {"method": method, "adversary": adversary, **fields, "backbone": backbone, "epochs": epochs,
                 **RECIPES[method], "schedule": "cosine"}
    if adversary != "none":
        cfg["eps"] = EPS[adversary]
    vae = vae or default_vae
    if adversary in ("idaa", "idaa-nodecomp"):
        cfg["vae"] = vae
    cfg.update(extra)
    # online kNN over 1.28M ImageNet images costs more than it tells; evaluate those runs offline
    cfg.update({"knn_every": 0 if data == "imagenet" else 10, "checkpoint_every": 50})
    name = f"{table}-{method}-{data}-{adversary}" + (f"-{suffix}" if suffix else "")
    title = table.replace("table", "Table ")
    lines = [f"Paper {title}: {method} + {adversary} on {data}, {backbone}, {epochs} epochs."]
    if "vae" in cfg:
        lines.append(f"Needs the VAE made by: {vae_command(cfg['vae'], fields)}")
    if note:
        lines.append(f"Data: {note}.")
    return name, cfg, "\n".join(f"# {line}" for line in lines)


def vae_command(path: str, fields: dict) -> str:
    """The `idaa vae train` call that writes the VAE a preset expects (beta and latent size from its name)."""
    folder = str(Path(path).parent)
    beta = folder.split("-beta")[1] if "-beta" in folder else "0.1"
    large = "imagenet-224" in fields.get("data_dir", "") or fields.get("image_size") == 224
    latent = 3072 if large else 512
    data_dir = f" --data-dir {fields['data_dir']}" if "data_dir" in fields else ""
    size = f" --image-size {fields['image_size']}" if "image_size" in fields else ""
    return (f"idaa vae train --dataset {fields['dataset']}{data_dir}{size} --latent-dim {latent} --beta {beta} "
            f"--epochs 300 --out {folder}")


def transfer_commands(run: str) -> list[str]:
    """The `idaa eval transfer` calls that make one row of Table 4/9 from a pretraining run."""
    return [f"idaa eval transfer {run}/last.ckpt --dataset {name} --data-dir {folder}" for name, folder in TRANSFER]


def rows() -> list[tuple[str, dict, str]]:
    out = []
    for method in ("plain", "uel", "simsiam", "simclr"):  # Table 1: ResNet-18, 300 (100) epochs
        for data in ("cifar10", "cifar100", "miniimagenet"):
            for adversary in ("none", "clae", "idaa"):
                epochs = 100 if data == "miniimagenet" else 300
                extra = {"batch_size": 128} if data == "miniimagenet" else {}
                out.append(preset("table1", method, data, adversary, epochs, "resnet18-cifar", **extra))
    for method in ("hcl", "debiased"):  # Table 2: ResNet-50, 400 epochs
        for data in ("cifar10", "cifar100"):
            for adversary in ("none", "idaa"):
                out.append(preset("table2", method, data, adversary, 400, "resnet50-cifar"))
    for epochs in (100, 200):  # Table 3: SimSiam ResNet-50 on ImageNet, batch 256
        for adversary in ("none", "idaa"):
            out.append(preset("table3", "simsiam", "imagenet", adversary, epochs, "resnet50", lr=0.05,
                              weight_decay=1e-4, policy="simsiam", _suffix=f"{epochs}ep",
                              method_options={"proj_layers": 3, "proj_hidden": 2048, "proj_dim": 2048,
                                              "pred_hidden": 512}))
    for table, method in (("table4", "simclr"), ("table9", "simsiam")):  # ResNet-18, 100 epochs on ImageNet-100
        for adversary in ("none", "clae", "idaa"):
            name, cfg, header = preset(table, method, "imagenet100", adversary, 100, "resnet18")
            run = f"runs/{name}"
            lines = [f"Run with: idaa pretrain --config THIS_FILE --out {run}",
                     f"Then the row of Table {table[5:]} (linear transfer, one result file per dataset):",
                     *transfer_commands(run)]
            out.append((name, cfg, header + "\n" + "\n".join(f"# {line}" for line in lines)))
    for data in ("cifar10", "cifar100", "miniimagenet"):  # Table 10: SimCLR + IDAA for VAE beta 0, 0.1, 1, 10
        for beta in ("0", "0.1", "1", "10"):
            epochs = 100 if data == "miniimagenet" else 300
            extra = {"batch_size": 128} if data == "miniimagenet" else {}
            out.append(preset("table10", "simclr", data, "idaa", epochs, "resnet18-cifar",
                              vae=f"runs/vae-{data}-beta{beta}/vae.pt", _suffix=f"beta{beta}", **extra))
    for data in ("cifar10", "cifar100"):  # Table 12: with and without the decomposition (C.4: a beta=1 VAE)
        out.append(preset("table12", "simclr", data, "none", 300, "resnet18-cifar"))
        out.append(preset("table12", "simclr", data, "idaa-nodecomp", 300, "resnet18-cifar",
                          vae=f"runs/vae-{data}-beta1/vae.pt"))
        out.append(preset("table12", "simclr", data, "idaa", 300, "resnet18-cifar"))
    return out


def semi_rows() -> list[tuple[str, dict, str]]:
    """Table 6: FixMatch on CIFAR-100 with 400/2500/10000 labels, WRN-28-8, none/CLAE/IDAA (`idaa semi --config`)."""
    out = []
    for labels in (400, 2500, 10000):
        for adversary in ("none", "clae", "idaa"):
            cfg: dict = {"method": "fixmatch", "labels": labels, "adversary": adversary, "dataset": "cifar100",
                         "backbone": "wrn28-8", "steps": 2 ** 20, "batch_size": 64, "mu": 7, "threshold": 0.95,
                         "lambda_u": 1.0, "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-3, "ema_decay": 0.999}
            if adversary != "none":
                cfg["eps"] = EPS[adversary]
            if adversary == "idaa":
                cfg["vae"] = DATA["cifar100"][1]
            header = [f"Paper Table 6: FixMatch + {adversary} on CIFAR-100 with {labels} labels, WRN-28-8, 2^20 steps.",
                      "Run with: idaa semi --config THIS_FILE --data-dir DATA --out RUN"]
            if adversary == "idaa":
                header.append(f"Needs the VAE made by: {vae_command(cfg['vae'], {'dataset': 'cifar100'})}")
            out.append((f"semi-table6-fixmatch-cifar100-{labels}-{adversary}", cfg,
                        "\n".join(f"# {line}" for line in header)))
    return out


def render(cfg: dict, header: str) -> str:
    return header + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    wanted = {f"{name}.yaml": render(cfg, header) for name, cfg, header in rows() + semi_rows()}
    if args.check:
        have = {p.name: p.read_text() for p in OUT.glob("*.yaml")}
        if have != wanted:
            print(f"configs/paper is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("*.yaml"):
        stale.unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(wanted)} presets to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
