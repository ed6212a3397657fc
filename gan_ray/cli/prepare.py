"""`gan-ray prepare SRC --out DEST`: an image folder or a built-in dataset decoded once into a prepared dataset
(Parquet shards + manifest) that training reads whole or streams with Ray Data (docs/datasets.md)."""
from __future__ import annotations

import argparse

from gan_ray.cli.flags import add_address, add_settings_flags, given_values
from gan_ray.train.prepare import PrepareSettings


def add_command(sub) -> None:
    p = sub.add_parser("prepare", help="decode an image folder or a built-in dataset once into Parquet shards "
                                       "(local, shared mount or object storage) for training and streaming")
    p.add_argument("src", metavar="SRC", help="an image folder (flat, or one sub-folder per class) or a built-in "
                                              "dataset: digits, mnist, fashion-mnist, cifar10")
    add_settings_flags(p, PrepareSettings)
    add_address(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gan_ray.core.prepared import human_bytes
    from gan_ray.train.prepare import prepare

    settings = PrepareSettings.from_mapping(given_values(args, PrepareSettings), source="flags")
    result = prepare(args.src, settings, address=args.address)
    m = result.manifest
    shape = "x".join(map(str, m.shape))
    print(f"prepared dataset: {m.location}")
    print(f"  images:   {m.count['train']:,} train + {m.count['heldout']:,} held out, {shape}, "
          f"{m.num_classes or 'no'} classes, {human_bytes(m.decoded_bytes('train'))} decoded (train)")
    print(f"  shards:   {len(m.shards['train'])} train + {len(m.shards['heldout'])} held out")
    print(f"  content:  sha256 {m.content_hash[:16]}")
    if m.source.get("skipped"):
        print(f"  skipped:  {len(m.source['skipped'])} unreadable image(s), listed in the manifest")
    if not result.already:
        print(f"  speed:    {result.images_per_s:,.0f} images/s ({result.seconds:.1f} s)")
    print(f"train on it: gan-ray train --dataset {m.location}   (--data-mode memory|stream|auto)")
    return 0
