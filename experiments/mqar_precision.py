"""One MQAR setting, one model, under a chosen precision: does the model learn associative recall?

    python3 experiments/mqar_precision.py --mixer gdn --precision bf16 --unpadded-keys --out OUT.json

Trains with experiments/mqar.py's loop (same optimizer, schedule and batches) on a single
(length, pairs) setting and prints the loss curve and the accuracy on 256 held-out sequences.
--precision:
  fp32                   no autocast
  bf16                   bf16 autocast, as the experiments train
  bf16-gdn-kernel-fp32   bf16 autocast with the GDN chunk kernel fed fp32 q, k, v (its fp32 path)
--unpadded-keys runs the GDN kernel at the model's key width 32 instead of padding it to
chunk.MIN_KEY_WIDTH: the path on which bf16 GDN did not learn MQAR (docs/results.md, section 2).
"""
import argparse
import json
import time
from pathlib import Path

import mqar  # imports common, which puts the repo's packages on the path
import numpy as np

PRECISIONS = ("fp32", "bf16", "bf16-gdn-kernel-fp32")


def feed_gdn_kernel_fp32():
    """Hands the model's GDN chunk kernel fp32 q, k, v and gives its output back in their dtype."""
    from oryx_torch import model as model_module
    from oryx_torch.kernels.gdn import fed_fp32

    model_module.gated_delta_rule = fed_fp32(model_module.gated_delta_rule)


def unpad_gdn_keys():
    """Runs the GDN chunk kernel at the key width it is given (the failing path of head size 32)."""
    from oryx_torch.kernels.gdn import chunk

    chunk.MIN_KEY_WIDTH = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", choices=["gdn", "mamba2"], default="gdn")
    parser.add_argument("--modes", choices=["recurrent", "attention", "mixed"], default="recurrent")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--unpadded-keys", action="store_true",
                        help="GDN kernel at key width 32, not padded to chunk.MIN_KEY_WIDTH")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args()
    if 4 * args.pairs > args.length:
        parser.error(f"--pairs: {args.pairs} pairs need --length >= {4 * args.pairs} (pairs, then queries and answers)")
    import torch

    # the model of experiments/configs/mqar.json, trained on one setting
    config = json.loads((Path(__file__).parent / "configs" / "mqar.json").read_text())
    exp = {**config, "seq_len": args.length, "train_lengths": [args.length], "train_pairs": [args.pairs],
           "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.lr / 10, "seed": args.seed,
           "log_every": args.log_every}
    exp["bf16"] = args.precision != "fp32"
    if args.precision == "bf16-gdn-kernel-fp32":
        feed_gdn_kernel_fp32()
    if args.unpadded_keys:
        unpad_gdn_keys()
    started = time.time()
    entry = {"name": f"{args.mixer}-{args.modes}", "mixer": args.mixer, "modes": args.modes}
    trainer, curve, _ = mqar.train_model(exp, entry, args.steps)
    inputs, targets = mqar.padded_mqar(np.random.default_rng([args.seed, 2]), 256, args.length, args.pairs,
                                       args.length, trainer.cfg.vocab_size)
    trainer.model.eval()
    hits, scored = trainer.accuracy(inputs, targets, np.full(inputs.shape, args.modes == "attention"))
    result = {"experiment": "mqar_precision", "args": vars(args), "device": str(trainer.device),
              "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "loss_curve": [(step, round(loss, 4)) for step, loss in curve], "accuracy": hits / scored,
              "wall_s": round(time.time() - started, 1)}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
