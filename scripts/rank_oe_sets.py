"""Rank candidate outlier-exposure (OE) image sets for unknown-aware multi-label training by EDGE's measure.

Each sub-folder of ``--oe-root`` is a candidate OE set (e.g. the textures of ``../shared/data/dtd10``). For
the in-distribution (ID) training images and each candidate, the features of a network are taken batch by
batch, and the candidates are listed by :func:`lightning_lt.metrics.ood.oe_dilation_distance`: the distance
between the mean singular values of ID and OE feature batches (EDGE, AAAI 2025; ``oe.py`` of its code), smallest
first. The features are those of a torchvision backbone (``--arch``; classifier removed, so the pooled
features), with the weights of a lightning-lt task checkpoint (``--checkpoint``: its ``backbone.*`` entries,
e.g. a ``MultiLabelOODModule`` trained on the ID data) or a local torchvision state dict (``--weights-path``,
e.g. ImageNet weights, as EDGE uses); without either the network is randomly initialised (a warning says so).

Differences from the reference script: the images get the evaluation transform (resize, centre crop) rather
than random crops and flips, the network is in eval mode (the reference leaves it in training mode, so its
BatchNorm uses the statistics of each mixed ID + OE batch), the ID loader is not shuffled (every candidate
is paired with the same ID batches), and the distance is that of whole spectra (``--k`` for the top-k), which
ranks as the reference's number does.

    python scripts/rank_oe_sets.py --checkpoint model.ckpt --arch resnet18 --image-size 96 --batch-size 24
    python scripts/rank_oe_sets.py --data voc --root /data/VOCdevkit --oe-root /data/dtd/images \\
        --arch resnet50 --weights-path resnet50-imagenet.pth
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lightning_lt.datamodules.multilabel import (  # noqa: E402
    COCOMultiLabel,
    MultiLabelDataset,
    OODImageFolder,
    VOCMultiLabel,
    multilabel_eval_transform,
)
from lightning_lt.metrics.ood import rank_oe_sets  # noqa: E402
from lightning_lt.nets import TorchvisionBackbone  # noqa: E402

DATA = {"coco": COCOMultiLabel, "voc": VOCMultiLabel}


def default_shared_data(name: str) -> str:
    return str((REPO_ROOT.parent / "shared" / "data" / name).resolve())


def load_backbone(arch: str, checkpoint: str | None, weights_path: str | None) -> TorchvisionBackbone:
    """A :class:`TorchvisionBackbone` with the ``backbone.*`` weights of a task checkpoint, or a state dict."""
    if checkpoint is not None and weights_path is not None:
        raise SystemExit("error: give --checkpoint or --weights-path, not both")
    backbone = TorchvisionBackbone(arch, weights_path=weights_path)
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise SystemExit(f"error: --checkpoint {checkpoint!r} does not exist")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False).get("state_dict", {})
        weights = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if not weights:
            raise SystemExit(
                f"error: {checkpoint!r} has no `backbone.*` weights: pass a lightning-lt task checkpoint (e.g. of "
                "MultiLabelOODModule) or use --weights-path for a torchvision state dict"
            )
        try:
            backbone.load_state_dict(weights)
        except RuntimeError as err:
            raise SystemExit(f"error: the backbone of {checkpoint!r} is not a {arch!r}; fix --arch ({err})") from err
    elif weights_path is None:
        warnings.warn(f"No --checkpoint or --weights-path: the {arch} features are those of a random network.")
    return backbone


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="coco", help="layout of --root")
    parser.add_argument("--root", default=default_shared_data("coco128"), help="the ID data set")
    parser.add_argument("--oe-root", default=default_shared_data("dtd10"), help="one sub-folder per candidate")
    parser.add_argument("--candidates", nargs="+", help="sub-folders of --oe-root to rank (default: all)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--checkpoint", help="lightning-lt task checkpoint whose backbone gives the features")
    parser.add_argument("--weights-path", help="local torchvision state dict of --arch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="ID and OE batch size (the reference: 64)")
    parser.add_argument("--k", type=int, default=None, help="compare the top-k singular values (default: all)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--json", help="also write the ranking to this JSON file")
    args = parser.parse_args(argv)
    for name, path in (("--root", args.root), ("--oe-root", args.oe_root)):
        if not os.path.isdir(path):
            parser.error(f"{name} {path!r} is not a directory")

    transform = multilabel_eval_transform(args.image_size)
    data = DATA[args.data](args.root)
    id_set = MultiLabelDataset(data.split_samples(data.train_split), data.num_classes, transform)
    names = args.candidates or sorted(
        e.name for e in os.scandir(args.oe_root) if e.is_dir() and not e.name.startswith(".")
    )

    def loader(dataset):
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True,
                          num_workers=args.num_workers)

    candidates = {name: loader(OODImageFolder(args.oe_root, [name], 1, transform)) for name in names}
    for name, candidate in [("ID", loader(id_set)), *candidates.items()]:
        if len(candidate) == 0:
            parser.error(f"{name} has fewer images than --batch-size {args.batch_size}: lower --batch-size")
    backbone = load_backbone(args.arch, args.checkpoint, args.weights_path)
    ranking = rank_oe_sets(backbone, loader(id_set), candidates, k=args.k)

    print(f"OE candidates by dilation distance to {args.root} ({len(id_set)} images), smallest first:")
    for place, (name, distance) in enumerate(ranking, 1):
        print(f"{place:3d}. {name:24s} {distance:.4f}")
    if args.json:
        setup = {key: getattr(args, key) for key in ("data", "root", "oe_root", "arch", "checkpoint", "weights_path",
                                                     "image_size", "batch_size", "k")}
        Path(args.json).write_text(json.dumps({"setup": setup, "ranking": ranking}, indent=2) + "\n")
    return ranking


if __name__ == "__main__":
    main()
