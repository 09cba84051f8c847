"""
The autoregression <-> diffusion trade-off, measured on MNIST.

Trains the same small model with several block shapes under the same budget (same
iterations, batch and learning rate), from token-wise autoregression (1x1 blocks, 16
blocks of 1 token) through rows and squares to a single block (plain DiT), and
prints a Markdown table: final test loss of the EMA model, training time, sampling time
with and without the KV cache, and where each run's sample grid is.

    python tradeoff.py --data_dir=../shared/data/mnist             # the README's table
    python tradeoff.py --data_dir=../shared/data/mnist --max_iters=200 --root=out-quick  # a quick look

Any other --key=value is passed to train.py for every run; --root=DIR (default
out-tradeoff) is where the runs go. A run folder that already holds a finished run
(train_seconds.txt) is reused, not retrained: delete it, or pick another --root,
after changing flags.
"""
import os
import sys
import time

import torch

import acdit
import evaluate
import generate
import train

# 7x7-pixel patches make a 4x4 grid of 16 tokens, which 1x1, 1x4, 2x2, 2x4 and 4x4 blocks
# tile (the default 4x4-pixel patches make a 7x7 grid, and 7 is prime)
PATCH = 7
# name -> (block_h, block_w) in patches
SHAPES = {
    "token-wise AR (1x1)": (1, 1),
    "rows (1x4)": (1, 4),
    "squares (2x2)": (2, 2),
    "halves (2x4)": (2, 4),
    "plain DiT (4x4)": (4, 4),
}


def time_sampling(model, use_cache, steps, n=10):
    """Seconds to sample n images (one per class), DDIM with CFG."""
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    acdit.sample(model, labels, cfg_scale=2.0, steps=steps, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t0


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return
    root, sample_steps, passthrough = "out-tradeoff", 50, []
    for arg in argv:
        if arg.startswith("--root="):
            root = arg.split("=", 1)[1]
        else:
            passthrough.append(arg)
    # pinned, not train.py's defaults (which moved on since), so the README's table stays reproducible
    budget = ["--max_iters=2000", "--batch_size=64", "--learning_rate=3e-3", "--warmup_iters=100",
              "--rope_base=10000", "--depth=4",
              "--eval_interval=2000", "--sample_interval=2000", "--log_interval=500",
              "--device=cpu", "--decay_frac=0.2", f"--patch_size={PATCH}", "--compile=False",
              "--min_snr_gamma=0.0", "--sampler=ddim", "--cfg_scale=2.0"]
    # checks the passed flags before any training, and says where the data is
    data_dir = train.parse_config(budget + passthrough, train.DEFAULTS)["data_dir"]
    test_x, test_y = train.load_dataset("mnist", data_dir, "test")
    judge = evaluate.get_judge(data_dir)
    rows = []
    for name, (bh, bw) in SHAPES.items():
        out = os.path.join(root, f"block{bh}x{bw}")
        print(f"\n=== {name}: {out} ===", flush=True)
        timing = os.path.join(out, "train_seconds.txt")
        if not os.path.exists(timing):  # trained already: reuse the run (delete the folder to redo)
            t0 = time.perf_counter()
            train.main(budget + passthrough + [f"--block_h={bh}", f"--block_w={bw}", f"--out_dir={out}"])
            with open(timing, "w") as f:
                f.write(f"{time.perf_counter() - t0:.1f}\n")
        with open(timing) as f:
            train_s = float(f.read())
        model, ckpt = generate.load_model(os.path.join(out, "ckpt.pt"), "ema")
        mcfg = model.cfg
        (loss,) = train.estimate_loss([model], test_x, test_y, 20, train.nullcontext())
        acc, fid, _, _ = evaluate.judge_model(model, judge, test_x, n_per_class=30, steps=sample_steps)
        cached = time_sampling(model, True, sample_steps)
        uncached = time_sampling(model, False, sample_steps)
        grid = os.path.join(out, f"samples_{ckpt['iter_num']:06d}.png")
        rows.append((name, mcfg.n_blocks, mcfg.block_len, mcfg.seq_len, loss, acc, fid, train_s,
                     cached, uncached, grid))

    flags = dict(a.split("=", 1) for a in budget + passthrough)  # later flags win, as in train.py
    print(f"\nbudget: {' '.join(f'{k}={v}' for k, v in flags.items())}; sampling: 10 images, DDIM "
          f"{sample_steps} steps/block, CFG 2.0; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("judge: 300 samples (30 per class), class accuracy and FID in the judge's features "
          "(evaluate.py)")
    print("| blocks | N x tokens | train seq | test loss (EMA) | class acc | FID | train time | "
          "sample, KV cache | sample, uncached | ratio | grid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, bl, seq, loss, acc, fid, ts, c, u, grid in rows:
        print(f"| {name} | {n} x {bl} | {seq} | {loss:.4f} | {acc:.3f} | {fid:.1f} | "
              f"{train.fmt_time(ts)} | {c:.1f} s | {u:.1f} s | {u / c:.1f}x | {grid} |")


if __name__ == "__main__":
    generate.run_cli(lambda: main(sys.argv[1:]))  # one-line errors, no tracebacks
