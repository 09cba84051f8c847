"""
The autoregression <-> diffusion trade-off, measured on MNIST.

Trains the same small model with several block shapes under the same budget (same
iterations, batch and learning rate), from token-wise autoregression (1x1 blocks, 49
blocks of 1 token) through row strips (7 blocks of 7) to a single block (plain DiT), and
prints a Markdown table: final test loss of the EMA model, training time, sampling time
with and without the KV cache, and where each run's sample grid is.

    python tradeoff.py --data_dir=../shared/data/mnist             # the README's table
    python tradeoff.py --data_dir=../shared/data/mnist --max_iters=200   # a quick look

Any other --key=value is passed to train.py for every run.
"""
import os
import sys
import time
import types

import torch

import acdit
import train

# name -> (block_h, block_w) in patches of the 7x7 grid (28px, patch 4)
SHAPES = {
    "token-wise AR (1x1)": (1, 1),
    "columns (7x1)": (7, 1),
    "rows (1x7)": (1, 7),
    "plain DiT (7x7)": (7, 7),
}


def time_sampling(model, use_cache, steps, n=10):
    """Seconds to sample n images (one per class), DDIM with CFG."""
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    acdit.sample(model, labels, cfg_scale=2.0, steps=steps, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t0


def main(argv):
    root, sample_steps, passthrough = "out-tradeoff", 50, []
    for arg in argv:
        if arg.startswith("--root="):
            root = arg.split("=", 1)[1]
        else:
            passthrough.append(arg)
    budget = ["--max_iters=1000", "--eval_interval=1000", "--sample_interval=1000",
              "--log_interval=250", "--device=cpu"]
    rows = []
    for name, (bh, bw) in SHAPES.items():
        out = os.path.join(root, f"block{bh}x{bw}")
        print(f"\n=== {name}: {out} ===", flush=True)
        t0 = time.perf_counter()
        train.main(budget + passthrough + [f"--block_h={bh}", f"--block_w={bw}", f"--out_dir={out}"])
        train_s = time.perf_counter() - t0
        ckpt = train.load_checkpoint(os.path.join(out, "ckpt.pt"))
        mcfg = acdit.ACDiTConfig(**ckpt["model_config"])
        model = acdit.ACDiT(mcfg)
        model.load_state_dict(ckpt["ema"])
        config = ckpt["config"]
        test_x, test_y = train.load_dataset("mnist", config["data_dir"], "test")
        cfg = types.SimpleNamespace(batch_size=64, eval_iters=20)
        (loss,) = train.estimate_loss([model], test_x, test_y, cfg, train.nullcontext())
        cached = time_sampling(model, True, sample_steps)
        uncached = time_sampling(model, False, sample_steps)
        grid = os.path.join(out, f"samples_{ckpt['iter_num']:06d}.png")
        rows.append((name, mcfg.n_blocks, mcfg.block_len, mcfg.seq_len, loss, train_s,
                     cached, uncached, grid))

    print(f"\nbudget: {' '.join(budget + passthrough)}; sampling: 10 images, DDIM "
          f"{sample_steps} steps/block, CFG 2.0; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| blocks | N x tokens | train seq | test loss (EMA) | train time | sample, KV cache | "
          "sample, uncached | ratio | grid |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, bl, seq, loss, ts, c, u, grid in rows:
        print(f"| {name} | {n} x {bl} | {seq} | {loss:.4f} | {train.fmt_time(ts)} | {c:.1f} s | "
              f"{u:.1f} s | {u / c:.1f}x | {grid} |")


if __name__ == "__main__":
    main(sys.argv[1:])
