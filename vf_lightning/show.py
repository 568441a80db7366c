"""``python -m vf_lightning.show CKPT [CKPT ...] --data NAME``: test accuracy of trained networks."""

from __future__ import annotations

import argparse

from vf_lightning.checkpoint import load_networks
from vf_lightning.data import DATAMODULES
from vf_lightning.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", help="a pair checkpoint (.ckpt) or model checkpoints (.pt)")
    p.add_argument("--data", default="fashion_mnist", choices=sorted(DATAMODULES))
    p.add_argument("--data_dir", default=None)
    args = p.parse_args()
    models, cfgs = load_networks(args.checkpoints)
    dm = DATAMODULES[args.data](data_dir=args.data_dir, num_workers=0, pad_to_32=cfgs[0].image_size == 32)
    dm.setup("test")
    for name, model in zip("abcdefgh", models):
        r = evaluate(model, dm.test_dataloader())
        print(f"network {name}: test accuracy {r['acc']:.4f}  loss {r['loss']:.4f}")


if __name__ == "__main__":
    main()
