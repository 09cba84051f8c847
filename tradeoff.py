"""
The autoregression <-> diffusion trade-off, measured on MNIST.

Trains the same small model with several block shapes under the same budget (same
iterations, batch and learning rate), from token-wise autoregression (1x1 blocks, 16
blocks of 1 token) through rows and squares to a single block (plain DiT), and prints a
Markdown table: final test loss of the EMA model, the judge's class accuracy and FID,
training time, sampling time with and without the KV cache, and each run's sample grid.

    python tradeoff.py --data_dir=path/to/mnist                   # the README's table
    python tradeoff.py --data_dir=path/to/mnist --max_iters=200 --root=out-quick  # a quick look

Any other --key=value is passed to train.py for every run; --root=DIR (default out-tradeoff) is where
the runs go. A run folder that already holds a finished run (train_seconds.txt) is reused, not
retrained: delete it, or pick another --root, after changing flags.
"""

import os
import subprocess
import sys
import time

import torch

import acdit
import cli
import data
from judge import get_judge, judge_images, sample_images

# 7x7-pixel patches make a 4x4 grid of 16 tokens, which 1x1, 1x4, 2x2, 2x4 and 4x4 blocks
# tile (the default 4x4-pixel patches make a 7x7 grid, and 7 is prime)
SHAPES = {'token-wise AR (1x1)': (1, 1), 'rows (1x4)': (1, 4), 'squares (2x2)': (2, 2),
          'halves (2x4)': (2, 4), 'plain DiT (4x4)': (4, 4)}
# pinned, not train.py's defaults (which moved on since), so the README's table stays reproducible
BUDGET = ['--max_iters=2000', '--batch_size=64', '--learning_rate=3e-3', '--warmup_iters=100',
          '--rope_base=10000', '--depth=4', '--eval_interval=2000', '--sample_interval=2000',
          '--log_interval=500', '--device=cpu', '--decay_frac=0.2', '--patch_size=7', '--compile=False',
          '--min_snr_gamma=0.0', '--sampler=ddim', '--cfg_scale=2.0']
SAMPLE_STEPS = 50
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')


def time_sampling(model, use_cache, n=10):
    """Seconds to sample n images (one per class), DDIM with CFG 2.0."""
    t0 = time.perf_counter()
    acdit.sample(model, torch.arange(n) % 10, cfg_scale=2.0, sampler='ddim', steps=SAMPLE_STEPS,
                 use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t0


def main(argv):
    if '-h' in argv or '--help' in argv:
        print(__doc__.strip())
        return
    root = next((a.split('=', 1)[1] for a in reversed(argv) if a.startswith('--root=')), 'out-tradeoff')
    passthrough = [a for a in argv if not a.startswith('--root=')]
    data_dir = next((a.split('=', 1)[1] for a in reversed(BUDGET + passthrough) if a.startswith('--data_dir=')), 'data')
    flags = dict(a[2:].split('=', 1) for a in BUDGET + passthrough if a.startswith('--') and '=' in a)
    rows, judge = [], None
    for name, (bh, bw) in SHAPES.items():
        out = os.path.join(root, f'block{bh}x{bw}')
        print(f'\n=== {name}: {out} ===', flush=True)
        timing = os.path.join(out, 'train_seconds.txt')
        if not os.path.exists(timing):  # not trained yet (delete the folder to redo a run)
            t0 = time.perf_counter()
            cmd = [sys.executable, TRAIN, *BUDGET, *passthrough, f'--block_h={bh}', f'--block_w={bw}', f'--out_dir={out}']
            status = subprocess.run(cmd).returncode
            if status:  # train.py has said why on stderr (a bad option: one line, status 2)
                sys.exit(status)
            with open(timing, 'w') as f:
                f.write(f'{time.perf_counter() - t0:.1f}\n')
        with open(timing) as f:
            train_s = float(f.read())
        model, ckpt = cli.load_model(os.path.join(out, 'ckpt.pt'), 'ema')
        judge = judge or get_judge(data_dir)
        test_x, _ = data.load_dataset('mnist', data_dir, 'test')
        images, labels, _ = sample_images(model, 30, 2.0, SAMPLE_STEPS, 'ddim')
        acc, fid, _ = judge_images(judge, images, labels, test_x)
        cached, uncached = time_sampling(model, True), time_sampling(model, False)
        m = model.config
        rows.append((name, m.n_blocks, m.block_len, m.seq_len, ckpt['ema_test_loss'], acc, fid, train_s, cached,
                     uncached, os.path.join(out, f"samples_{ckpt['iter_num']:06d}.png")))

    print(f"\nbudget: {' '.join(f'--{k}={v}' for k, v in flags.items())}; sampling: 10 images, DDIM "
          f'{SAMPLE_STEPS} steps/block, CFG 2.0; torch {torch.__version__}, {torch.get_num_threads()} threads')
    print('judge: 300 samples (30 per class), class accuracy and FID in the judge\'s features (judge.py)')
    print('| blocks | N x tokens | train seq | test loss (EMA) | class acc | FID | train time | '
          'sample, KV cache | sample, uncached | ratio | grid |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, n, bl, seq, loss, acc, fid, ts, c, u, grid in rows:
        m, s = divmod(int(ts), 60)
        print(f'| {name} | {n} x {bl} | {seq} | {loss:.4f} | {acc:.3f} | {fid:.1f} | {m}m{s:02d}s | '
              f'{c:.1f} s | {u:.1f} s | {u / c:.1f}x | {grid} |')


if __name__ == '__main__':
    cli.run_cli(lambda: main(sys.argv[1:]))
