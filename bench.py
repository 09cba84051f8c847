"""
Benchmark ACDiT on this machine and print a Markdown table:
  - sampling with the KV cache against the uncached reference sampler, at a small batch and at 100 images,
  - a training step of ACDiT (SCAM over (2N-1)*Bl tokens) against a plain DiT (one block), for images,
  - on CUDA also FlexAttention (compiled) against the dense-mask SDPA path in training,
each for the MNIST default model, a longer sequence (32x32x3 at patch 2, 16 blocks of 16)
and the Moving MNIST video model (8 frames of 32x32 at patch 8, one block of 16 per frame).

    python bench.py                   # about 5 minutes on a 2-core CPU
    python bench.py --quick=True      # tiny models, done in seconds (what the tests run)
    python bench.py --device=cuda --batch_size=64 --reps=10
"""

import dataclasses
import os
import platform
import statistics
import sys
import textwrap
import time

import torch

import acdit
import cli

OPTIONS = {
    'device': cli.DEVICE_OPTION,
    'quick': (False, 'tiny models (depth 1, width 32), sample_batches 2, batch_size 2, steps 2: seconds'),
    'sample_batches': ('8,100', "images per sampling call, one group of rows each (100: generate.py's default)"),
    'batch_size': (8, 'images per training step'),
    'steps': (5, 'denoising steps per block when sampling'),
    'reps': (3, 'timed runs of each variant (the median is shown), after a warmup run'),
    'seed': (0, 'seeds the weights, data, labels and noise'),
}
CFG_SCALE = 2.0  # guidance on, as train.py and generate.py sample: every pass runs 2 x batch rows


def shapes(quick):
    """The token layouts: the MNIST default, a longer sequence, where the KV cache (and
    attention's share of the cost) matters more, and config/moving_mnist.py's videos."""
    size = dict(depth=1, width=32, n_heads=2) if quick else {}
    return {'28x28x1 p4, 7 blocks x 7': acdit.ACDiTConfig(**size),
            '32x32x3 p2, 16 blocks x 16': acdit.ACDiTConfig(img_size=32, in_channels=3, patch_size=2,
                                                           block_h=1, block_w=16, **size),
            'video 8x32x32x1 p8, 8 frames x 16': acdit.ACDiTConfig(img_size=32, n_frames=8, patch_size=8,
                                                                  block_h=4, block_w=4, **size)}


def sample_token_forwards(config, batch, steps, cached):
    """Tokens one acdit.sample() call pushes through the network (rows x tokens, summed over
    passes), counted from the algorithm. Under CFG every pass has 2*batch rows."""
    rows, N, Bl = 2 * batch, config.n_blocks, config.block_len
    if cached:  # each step runs block i's Bl tokens; then block i is committed (not the last one)
        return rows * steps * N * Bl + rows * (N - 1) * Bl
    return rows * steps * sum(i * Bl + Bl for i in range(N))  # each step also re-commits the i clean blocks


def compare(variants, reps, dev):
    """variants: [(name, fn, warmup_fn)]. Warm each up, then time them in turns, the order
    flipping every rep, so that the machine's slow drifts hit every variant alike.
    Returns {name: (median seconds, max peak bytes on CUDA or None)}."""
    for _, _, warmup in variants:
        warmup()
    times, peaks = {name: [] for name, _, _ in variants}, {name: [] for name, _, _ in variants}
    for r in range(reps):
        for name, fn, _ in (variants if r % 2 == 0 else variants[::-1]):
            cli.sync(dev)
            if dev.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
            t0 = time.perf_counter()
            fn()
            cli.sync(dev)
            times[name].append(time.perf_counter() - t0)
            peaks[name].append(torch.cuda.max_memory_allocated(dev) - before if dev.type == 'cuda' else None)
    return {n: (statistics.median(times[n]), None if None in peaks[n] else max(peaks[n])) for n in times}


def bench_sampling(label, config, batch, args, dev):
    torch.manual_seed(args.seed)
    model = acdit.ACDiT(dataclasses.replace(config, attn_backend='sdpa')).to(dev).eval()
    labels = torch.randint(config.n_classes, (batch,), device=dev)

    def sampler(use_cache, steps):
        return lambda: acdit.sample(model, labels, cfg_scale=CFG_SCALE, steps=steps, use_cache=use_cache,
                                    generator=torch.Generator(device=dev).manual_seed(args.seed))

    # warm up with one step per block: every code path and shape, at a fraction of the cost
    variants = [(name, sampler(cached, args.steps), sampler(cached, 1))
                for name, cached in (('KV cache', True), ('uncached', False))]
    result = compare(variants, args.reps, dev)
    return [dict(bench=f'sampling, batch {batch}', shape=label, variant=name, result=result[name],
                 tokens=sample_token_forwards(config, batch, args.steps, name == 'KV cache'))
            for name, _, _ in variants]


def bench_training(label, config, args, dev):
    gen = torch.Generator().manual_seed(args.seed)
    imgs = (torch.rand(args.batch_size, config.in_channels, config.img_size, config.img_size, generator=gen) * 2 - 1).to(dev)
    labels = torch.randint(config.n_classes, (args.batch_size,), generator=gen).to(dev)
    ctx = cli.autocast_context(dev, 'bfloat16')  # what train.py does: bf16 on CUDA, else float32
    setups = [('DiT (1 block)', dataclasses.replace(config, block_h=config.grid, block_w=config.grid)),
              ('ACDiT, sdpa', dataclasses.replace(config, attn_backend='sdpa'))]
    if dev.type == 'cuda':
        setups.append(('ACDiT, flex', dataclasses.replace(config, attn_backend='flex')))

    def step_fn(config):
        torch.manual_seed(args.seed)
        model = acdit.ACDiT(config).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with ctx:
                loss = model.training_loss(imgs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    variants = []
    for name, config in setups:  # two warmup steps: the first also makes AdamW's state (and compiles flex)
        step = step_fn(config)
        variants.append((name, step, lambda step=step: [step() for _ in range(2)]))
    result = compare(variants, args.reps, dev)
    return [dict(bench='training step', shape=label, variant=name, result=result[name],
                 tokens=args.batch_size * config.seq_len) for name, config in setups]


def table(rows):
    """Rows as a Markdown table, padded to read well in a terminal too. ratio = time / the
    group's first row's time; ideal = the same for token-forwards; of ideal = ratio / ideal."""
    head = ['benchmark', 'shape', 'variant', 'token-forwards', 'time (ms)', 'peak MiB', 'ratio', 'ideal', 'of ideal']
    right = [False] * 3 + [True] * 6
    body, base = [], None
    for row in rows:
        seconds, peak = row['result']
        if base is None or (row['bench'], row['shape']) != base[:2]:
            base = (row['bench'], row['shape'], seconds, row['tokens'])
        ratio, ideal = seconds / base[2], row['tokens'] / base[3]
        body.append([row['bench'], row['shape'], row['variant'], f"{row['tokens']:,}", f'{seconds * 1e3:.1f}',
                     'n/a' if peak is None else f'{peak / 2**20:.1f}', f'{ratio:.2f}x', f'{ideal:.2f}x',
                     f'{ratio / ideal:.2f}'])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(cells):
        return '| ' + ' | '.join(s.rjust(w) if r else s.ljust(w) for s, w, r in zip(cells, widths, right)) + ' |'
    rule = '|' + '|'.join('-' * (w + 1) + ':' if r else '-' * (w + 2) for w, r in zip(widths, right)) + '|'
    return '\n'.join([line(head), rule] + [line(r) for r in body])


def main(argv=None):
    args = cli.parse_args(argv, __doc__, OPTIONS, {'device': cli.DEVICES})
    if args.quick:
        args.sample_batches, args.batch_size, args.steps = '2', 2, 2
    try:
        batches = [int(b) for b in str(args.sample_batches).split(',')]
    except ValueError:
        raise cli.ConfigError(f"sample_batches={args.sample_batches!r}: expected numbers separated by commas") from None
    for key, value in (('sample_batches', min(batches)), ('batch_size', args.batch_size), ('steps', args.steps),
                       ('reps', args.reps)):
        cli.check(value >= 1, f'{key}={value} must be at least 1')
    dev = cli.pick_device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}'
    print(f'# ACDiT benchmark: {dev} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads')
    print(f'sampling {args.steps} steps per block with cfg_scale {CFG_SCALE}, training batch {args.batch_size}, '
          f'median of {args.reps} timed run(s) after warmup{", quick (tiny models)" if args.quick else ""}\n')
    rows = []
    for label, config in shapes(args.quick).items():
        for batch in batches:
            print(f'measuring sampling, batch {batch}, {label} ...', file=sys.stderr)
            rows += bench_sampling(label, config, batch, args, dev)
        if config.n_frames == 1:  # video: sampling only (a frame is already one block, no DiT to compare)
            print(f'measuring training, {label} ...', file=sys.stderr)
            rows += bench_training(label, config, args, dev)
    print(table(rows) + '\n')
    print(textwrap.fill("ratio: time against the group's first row; ideal: the same ratio of token-forwards (rows x "
                        "tokens through the network, summed over passes; attention's growing cost is left out, fixed "
                        "per-call costs too); of ideal: ratio / ideal. peak MiB (CUDA only): the most allocated during "
                        "a run. FlexAttention rows need CUDA (no backward elsewhere; fast only compiled).", 100))
    return rows


if __name__ == '__main__':
    cli.run_cli(main)
