"""
Benchmark ACDiT on this machine and print a Markdown table:
  - sampling with the KV cache against the uncached reference sampler,
  - a training step of ACDiT (SCAM over (2N-1)*Bl tokens) against a plain DiT (one block),
  - on CUDA also FlexAttention (compiled) against the dense-mask SDPA path in training,
each for the MNIST default model and a longer sequence (32x32x3 at patch 2, 16 blocks of 16).

    python bench.py                   # default sizes: under a minute on a 2-core CPU
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
import train
from generate import parse_args, run_cli, sync
from train import ConfigError

OPTIONS = [
    ('device', 'auto', "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'"),
    ('quick', False, 'tiny models (depth 1, width 32), batch_size 2, steps 2, reps 3: seconds'),
    ('batch_size', 8, 'images per sampling call and per training step'),
    ('steps', 10, 'denoising steps per block when sampling'),
    ('reps', 3, 'timed runs of each variant (the median is shown), after a warmup run'),
    ('seed', 0, 'seeds the weights, data, labels and noise'),
]
DEFAULTS = {key: default for key, default, _ in OPTIONS}
CFG_SCALE = 2.0  # guidance on, as train.py and generate.py sample: every step runs 2 x batch rows


def shapes(quick):
    """The two token layouts, by name: the MNIST default (acdit.ACDiTConfig()) and a longer
    sequence, where the KV cache (and attention's share of the cost) matters more."""
    size = dict(depth=1, width=32, n_heads=2) if quick else {}
    return {
        '28x28x1 p4, 7 blocks x 7': acdit.ACDiTConfig(**size),
        '32x32x3 p2, 16 blocks x 16': acdit.ACDiTConfig(img_size=32, in_channels=3, patch_size=2,
                                                       block_h=1, block_w=16, **size),
    }


def sample_token_forwards(cfg, batch, steps, cached):
    """Tokens one acdit.sample() call pushes through the network (rows x tokens, summed over
    passes), counted from the algorithm. Under CFG every denoising pass has 2*batch rows."""
    rows, N, Bl = 2 * batch, cfg.n_blocks, cfg.block_len
    if cached:  # each step runs block i's Bl tokens; then block i is committed (not the last one)
        return rows * steps * N * Bl + batch * (N - 1) * Bl
    return rows * steps * sum(i * Bl + Bl for i in range(N))  # each step reruns the i clean blocks


# -----------------------------------------------------------------------------
# timing

def run_once(fn, dev):
    """Seconds one call of fn takes and, on CUDA, the peak bytes it allocated on top of what
    was already allocated (activations, gradients, workspace); None where unknown."""
    sync(dev)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) - before if dev.type == 'cuda' else None
    return seconds, peak


def compare(variants, reps, dev):
    """variants: list of (name, fn, warmup_fn). Warm each up, then time them in turns, the
    order flipping every rep, so that the machine's slow drifts hit every variant alike.
    Returns {name: (median seconds, max peak bytes or None)}."""
    for _, _, warmup in variants:
        warmup()
    times = {name: [] for name, _, _ in variants}
    peaks = {name: [] for name, _, _ in variants}
    for r in range(reps):
        for name, fn, _ in (variants if r % 2 == 0 else variants[::-1]):
            seconds, peak = run_once(fn, dev)
            times[name].append(seconds)
            peaks[name].append(peak)
    return {name: (statistics.median(times[name]), None if None in peaks[name] else max(peaks[name]))
            for name in times}


# -----------------------------------------------------------------------------
# the two benchmarks; each returns table rows, the first of a group being its baseline

def bench_sampling(label, cfg, c, dev):
    # The cached sampler never uses a mask; the uncached one uses the dense SCAM mask
    # (FlexAttention would recompile for each of the N prefix lengths).
    torch.manual_seed(c.seed)
    model = acdit.ACDiT(dataclasses.replace(cfg, attn_backend='sdpa')).to(dev).eval()
    labels = torch.randint(cfg.n_classes, (c.batch_size,), device=dev)

    def sampler(use_cache, steps):
        def run():
            gen = torch.Generator(device=dev).manual_seed(c.seed)  # the same noise on every call
            acdit.sample(model, labels, cfg_scale=CFG_SCALE, steps=steps, generator=gen,
                         use_cache=use_cache)
        return run

    # warm up with one step per block: every code path and mask shape, at a fraction of the cost
    variants = [(name, sampler(cached, c.steps), sampler(cached, 1))
                for name, cached in (('KV cache', True), ('uncached', False))]
    result = compare(variants, c.reps, dev)
    return [dict(bench='sampling', shape=label, variant=name, result=result[name],
                 tokens=sample_token_forwards(cfg, c.batch_size, c.steps, name == 'KV cache'))
            for name, _, _ in variants]


def bench_training(label, cfg, c, dev):
    gen = torch.Generator().manual_seed(c.seed)
    imgs = (torch.rand(c.batch_size, cfg.in_channels, cfg.img_size, cfg.img_size, generator=gen) * 2 - 1).to(dev)
    labels = torch.randint(cfg.n_classes, (c.batch_size,), generator=gen).to(dev)
    ctx = train.autocast_context(dev, 'bfloat16')  # what train.py does: bf16 on CUDA, else float32
    dit = dataclasses.replace(cfg, block_h=cfg.grid, block_w=cfg.grid)  # one block = a plain DiT
    setups = [('DiT (1 block)', dit), ('ACDiT, sdpa', dataclasses.replace(cfg, attn_backend='sdpa'))]
    if dev.type == 'cuda' and acdit.HAS_FLEX:
        setups.append(('ACDiT, flex', dataclasses.replace(cfg, attn_backend='flex')))

    def step_fn(mcfg):
        torch.manual_seed(c.seed)
        model = acdit.ACDiT(mcfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with ctx:
                loss = model.training_loss(imgs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    variants = []
    for name, mcfg in setups:
        step = step_fn(mcfg)
        # two warmup steps: the first also creates AdamW's state (and compiles flex on CUDA)
        variants.append((name, step, lambda step=step: [step() for _ in range(2)]))
    result = compare(variants, c.reps, dev)
    return [dict(bench='training step', shape=label, variant=name, result=result[name],
                 tokens=c.batch_size * mcfg.seq_len)  # (2N-1)*Bl per image; N*Bl for the DiT (N = 1)
            for name, mcfg in setups]


# -----------------------------------------------------------------------------
# report

def machine(dev):
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs'


def table(rows):
    """Rows as a Markdown table, columns padded so that it reads well in a terminal too.
    ratio = time / the group's first row's time; ideal = the same for token-forwards."""
    head = ['benchmark', 'shape', 'variant', 'token-forwards', 'time (ms)', 'peak MiB', 'ratio', 'ideal']
    right = [False, False, False, True, True, True, True, True]
    body, base = [], None
    for row in rows:
        seconds, peak = row['result']
        if base is None or (row['bench'], row['shape']) != base[:2]:
            base = (row['bench'], row['shape'], seconds, row['tokens'])
        body.append([row['bench'], row['shape'], row['variant'], f"{row['tokens']:,}",
                     f'{seconds * 1e3:.1f}', 'n/a' if peak is None else f'{peak / 2**20:.1f}',
                     f'{seconds / base[2]:.2f}x', f"{row['tokens'] / base[3]:.2f}x"])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(cells):
        return '| ' + ' | '.join(s.rjust(w) if r else s.ljust(w) for s, w, r in zip(cells, widths, right)) + ' |'
    rule = '|' + '|'.join('-' * (w + 1) + ':' if r else '-' * (w + 2) for w, r in zip(widths, right)) + '|'
    return '\n'.join([line(head), rule] + [line(r) for r in body])


def max_rss_mib():
    """The process's peak resident memory (the whole run, not one row), where the OS says."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == 'darwin' else rss / 2**10  # bytes on macOS, KiB on Linux


def main(argv=None):
    c = parse_args(argv, __doc__, OPTIONS)
    if c is None:
        return None
    if c.quick:
        c.batch_size, c.steps, c.reps = 2, 2, 3
    for key in ('batch_size', 'steps', 'reps'):
        if getattr(c, key) < 1:
            raise ConfigError(f'{key}={getattr(c, key)} must be at least 1')
    dev = train.pick_device(c.device)
    print(f'# ACDiT benchmark: {dev} ({machine(dev)}), torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads')
    print(f'batch {c.batch_size}, sampling {c.steps} steps per block with cfg_scale {CFG_SCALE}, '
          f'median of {c.reps} timed run(s) after warmup{", quick (tiny models)" if c.quick else ""}')
    print()
    rows = []
    for label, cfg in shapes(c.quick).items():
        for what, measure in (('sampling', bench_sampling), ('training', bench_training)):
            print(f'measuring {what}, {label} ...', file=sys.stderr)
            rows += measure(label, cfg, c, dev)
    print(table(rows))
    print()
    notes = [
        'ratio: time relative to the first row of its group; ideal: the same ratio of token-forwards '
        '(tokens through the network, rows x tokens summed over passes). Sampling: the cached sampler '
        "runs each block's Bl tokens per step plus one commit pass per block, the uncached one reruns "
        'the whole clean prefix every step. Training: (2N-1)*Bl tokens per image against N*Bl. '
        'Token-forwards leave out attention, whose cost grows with the context length, so long '
        'sequences can beat the ideal ratio; fixed per-call overheads pull small models below it.']
    if dev.type == 'cuda':
        notes.append('peak MiB: torch.cuda.max_memory_allocated during a run minus what was allocated '
                     'before it. flex: torch.compile(flex_attention), as acdit.attend runs it on CUDA; '
                     'both samplers use sdpa.')
    else:
        rss = max_rss_mib()
        notes.append(f'peak MiB: n/a on {dev.type} (no per-run allocator statistics); the whole process '
                     f"peaked at {'n/a' if rss is None else f'{rss:.0f} MiB'} resident (ru_maxrss).")
        notes.append(f'FlexAttention rows skipped: they need CUDA. On {dev.type} FlexAttention has no '
                     f'backward (it cannot train), and it is only fast when torch.compile fuses it on a GPU.')
    print('\n\n'.join(textwrap.fill(note, 100) for note in notes))
    return rows


if __name__ == '__main__':
    run_cli(main)
