"""
Sample images from an ACDiT checkpoint written by train.py.

    python generate.py --ckpt=out/ckpt.pt                      # 10 samples of every class -> out/samples.png
    python generate.py --ckpt=out/ckpt.pt --labels=3,7 --n_per_class=8 --gif=out/gen.gif
    python generate.py --ckpt=out/ckpt.pt --use_cache=False    # the uncached reference sampler
    python generate.py --ckpt=out/ckpt.pt --npz=out/samples.npz   # raw uint8 samples for evaluation

The method itself is acdit.sample(); this script only loads the weights, checks the
options, counts the work the sampler does and writes the pictures. Options are parsed by
train.py's parser, so they behave like train.py's (--key=value, or a config file .py).
With the defaults it reproduces the last sample grid train.py saved for the checkpoint
(same seed, guidance scale, steps and sampler), on the same kind of device.
"""

import math
import os
import sys
import time
import types

import numpy as np
import torch

import acdit
import train
from train import CheckpointError, ConfigError

# (key, default, meaning). 'auto' means: what train.py sampled with, read from the checkpoint.
OPTIONS = [
    ('ckpt', 'out/ckpt.pt', 'checkpoint written by train.py'),
    ('weights', 'ema', "'ema' (the averaged weights train.py samples with) or 'model' (the raw ones)"),
    ('out', '', "grid PNG, one row per label; '' = samples.png next to the checkpoint"),
    ('labels', 'all', "class labels to sample, e.g. 0,1,2, or 'all'"),
    ('n_per_class', 10, 'samples per label (the columns of the grid)'),
    ('cfg_scale', 'auto', "classifier-free guidance (1.0 = none); 'auto' = the checkpoint's cfg_scale, "
                          f"else {train.DEFAULTS['cfg_scale']}"),
    ('sampler', 'auto', "'ddpm' (ancestral, adds noise every step) or 'ddim' (deterministic); "
                        f"'auto' = the checkpoint's sampler, else {train.DEFAULTS['sampler']}"),
    ('steps', 'auto', "denoising steps per block; 'auto' = the checkpoint's sample_steps, "
                      f"else {train.DEFAULTS['sample_steps']}"),
    ('seed', 0, 'seeds the noise: the same seed gives the same images, cached or not'),
    ('device', 'auto', "'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'"),
    ('use_cache', True, "keep finished blocks' keys/values in a KV cache; False reruns the prefix every step"),
    ('npz', '', "if set, also save images (N, H, W, C) uint8 and labels (N,) here with np.savez"),
    ('gif', '', 'if set, also save an animated GIF of the generation here, block by block'),
]
DEFAULTS = {key: default for key, default, _ in OPTIONS}


# -----------------------------------------------------------------------------
# command line helpers (bench.py uses them too)

def help_text(doc, options):
    """--help: the script's docstring, then every option with its default and meaning."""
    lines = [doc.strip(), '', 'options:']
    lines += [f'  --{key}={default!r}'.ljust(30) + f'  {meaning}' for key, default, meaning in options]
    return '\n'.join(lines)


def parse_args(argv, doc, options):
    """Command-line arguments (default: sys.argv[1:]) -> a namespace of options, parsed by
    train.parse_config; None once the help is printed for -h or --help."""
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(help_text(doc, options))
        return None
    return types.SimpleNamespace(**train.parse_config(argv, {key: default for key, default, _ in options},
                                                       choices={}))


def run_cli(main):
    """Run main(); report a user's mistake as one line on stderr instead of a traceback:
    exit status 2 for a bad option (as argparse does), 1 for a file that cannot be used."""
    try:
        main()
    except (ConfigError, CheckpointError, train.DataError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


# -----------------------------------------------------------------------------
# options

def parse_labels(text, n_classes=None):
    """'all' or '0,1,2' -> a list of class ids; range-checked once n_classes is known."""
    if text == 'all':
        return None if n_classes is None else list(range(n_classes))
    try:
        labels = [int(s) for s in text.split(',')]
    except ValueError:
        raise ConfigError(f"labels={text!r}: expected class numbers separated by commas "
                          f"(e.g. --labels=0,1,2) or 'all'") from None
    bad = [y for y in labels if n_classes is not None and not 0 <= y < n_classes]
    if bad:
        raise ConfigError(f"labels={text!r}: {', '.join(map(str, bad))} out of range; "
                          f"this model knows classes 0..{n_classes - 1}")
    return labels


def from_checkpoint(cfg, key, kind, train_config, train_key):
    """The value of option `key` as `kind` (int or float). 'auto' takes what train.py sampled
    with: the checkpoint's train config if it has the key, else train.py's default."""
    text = getattr(cfg, key)
    if text == 'auto':
        if train_config is None:
            return None  # checked again once the checkpoint is loaded
        text = train_config.get(train_key, train.DEFAULTS[train_key])
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or (kind is int and value < 1):
        want = 'an integer >= 1' if kind is int else 'a number'
        raise ConfigError(f"{key}={text} must be {want} or 'auto' (the checkpoint's {train_key})")
    return value


def check_options(cfg, train_config=None):
    """Raise ConfigError for an impossible option; return (cfg_scale, steps, sampler). Called once
    before the checkpoint is loaded (a typo should not wait for it; 'auto' values are None
    then) and once after, with the checkpoint's train config. evaluate.py uses it too (its
    options are a subset: no --out)."""
    if cfg.weights not in ('ema', 'model'):
        raise ConfigError(f"weights={cfg.weights!r}: choose 'ema' or 'model'")
    sampler = cfg.sampler
    if sampler == 'auto' and train_config is not None:
        sampler = train_config.get('sampler', train.DEFAULTS['sampler'])
    if sampler != 'auto' and sampler not in acdit.SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}: choose one of {', '.join(acdit.SAMPLERS)}")
    if cfg.n_per_class < 1:
        raise ConfigError(f'n_per_class={cfg.n_per_class} must be at least 1')
    from PIL import Image  # the grid's format comes from its file name (save_grid uses Pillow)
    out = getattr(cfg, 'out', '')
    if out and os.path.splitext(out)[1].lower() not in Image.registered_extensions():
        raise ConfigError(f"out={out!r}: the file name needs an image extension such as .png")
    return (from_checkpoint(cfg, 'cfg_scale', float, train_config, 'cfg_scale'),
            from_checkpoint(cfg, 'steps', int, train_config, 'sample_steps'), sampler)


# -----------------------------------------------------------------------------
# the model

def load_model(path, weights='ema', device='cpu'):
    """The ACDiT in a train.py checkpoint with its `weights` ('ema' or 'model'), in eval mode
    on device, and the checkpoint dict. Anything unusable raises CheckpointError."""
    if not os.path.isfile(path):  # train.load_checkpoint's message is about resuming training
        raise CheckpointError(f'no checkpoint at {path}: train one with `python train.py` '
                              f'(it writes <out_dir>/ckpt.pt) or point --ckpt at one')
    ckpt = train.load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model_config'), dict):
        raise CheckpointError(f"{path} is not a train.py checkpoint: expected a dict with a "
                              f"'model_config' entry, found {type(ckpt).__name__}"
                              + (f" with keys {', '.join(map(str, ckpt))}" if isinstance(ckpt, dict) else ''))
    if weights not in ckpt:
        raise CheckpointError(f"{path} has no {weights!r} weights; try --weights="
                              f"{'model' if weights == 'ema' else 'ema'}")
    try:
        # The attention backend is a run-time choice, not part of the weights: the cached
        # sampler attends with no mask at all, and the uncached reference is simplest with
        # the dense mask (FlexAttention would recompile for each prefix length).
        mcfg = acdit.ACDiTConfig(**dict(ckpt['model_config'], attn_backend='sdpa'))
        model = acdit.ACDiT(mcfg)
        model.load_state_dict(ckpt[weights])
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        # load_state_dict says 'Error(s) in loading state_dict for ACDiT:' and then one
        # line per problem; the first problem is the useful part of a one-line error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ['']
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(':') else lines[0]
        more = f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''
        raise CheckpointError(f'checkpoint {path} does not fit an ACDiT model: {detail}{more}') from None
    return model.to(device).eval(), ckpt


class WorkCounter:
    """Counts the work acdit.sample() does by watching the model, so acdit.py stays free of
    bookkeeping. A forward hook on the first layer sees every pass through the transformer
    (denoising steps and KV-cache commits alike) with its (rows, tokens) shape; wrapping
    model.commit reads the cache's size (KVCache.nbytes) after each commit."""

    def __init__(self, model):
        self.model = model
        self.evals = self.commits = self.token_forwards = self.kv_bytes = 0

    def _count(self, module, args, output):
        x = args[0]  # (rows, tokens, width): CFG's two halves are rows of one pass
        self.evals += 1
        self.token_forwards += x.shape[0] * x.shape[1]

    def _commit(self, block_tokens, kv_cache):
        type(self.model).commit(self.model, block_tokens, kv_cache)
        self.commits += 1
        self.kv_bytes = kv_cache.nbytes()

    def __enter__(self):
        self.hook = self.model.blocks[0].register_forward_hook(self._count)
        self.model.commit = self._commit  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        del self.model.commit


# -----------------------------------------------------------------------------
# pictures

def grid_array(images, nrow):
    """uint8 images (B, C, H, W) with B a multiple of nrow -> one (rows*H, nrow*W, C) numpy
    array, nrow images per row: the layout of train.save_grid."""
    B, C, H, W = images.shape
    grid = images.cpu().view(B // nrow, nrow, C, H, W).permute(0, 3, 1, 4, 2)
    return grid.reshape(B // nrow * H, nrow * W, C).numpy()


class GifRecorder:
    """A callback for acdit.sample() that keeps a few frames per block, each a grid like the
    PNG: finished blocks clean, the current block as its predicted x0 (a readable guess from
    the first step on, where x_t is mostly noise), blocks still to come mid-gray."""

    def __init__(self, cfg, nrow, steps, frames_per_block=6):
        self.cfg, self.nrow, self.steps = cfg, nrow, steps
        self.stride = max(1, math.ceil(steps / frames_per_block))
        self.frames = []

    def __call__(self, block, step, clean, x, x0):
        last = step == self.steps - 1
        if step % self.stride and not last:
            return
        todo = self.cfg.n_blocks - block - 1
        rest = x0.new_zeros(x0.shape[0], todo * self.cfg.block_len, x0.shape[2])  # 0 = mid-gray
        tokens = torch.cat([clean, x0, rest], dim=1)
        self.frames.append(grid_array(train.to_uint8(acdit.unpatchify(tokens, self.cfg)), self.nrow))

    def save(self, path, ms_per_frame=80, hold_last_ms=2000):
        from PIL import Image
        h, w, c = self.frames[0].shape
        # nearest-neighbour upscale of small grids (short side to ~256px, long side <= 1024)
        scale = max(1, min(256 // min(h, w), 1024 // max(h, w)))
        images = [Image.fromarray(f[:, :, 0] if c == 1 else f).resize((w * scale, h * scale), Image.NEAREST)
                  for f in self.frames]
        durations = [ms_per_frame] * (len(images) - 1) + [hold_last_ms]
        images[0].save(path, format='GIF', save_all=True, append_images=images[1:],
                       duration=durations, loop=0)


def sync(dev):
    """Wait for queued GPU work, so that the clock measures the work and not its launch."""
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    elif dev.type == 'mps':
        torch.mps.synchronize()


def makedirs_for(path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv, __doc__, OPTIONS)
    if cfg is None:
        return None
    parse_labels(cfg.labels)
    check_options(cfg)  # before the checkpoint load: a typo should fail at once
    dev = train.pick_device(cfg.device)
    model, ckpt = load_model(cfg.ckpt, cfg.weights, dev)
    mcfg = model.cfg
    cfg_scale, steps, sampler = check_options(cfg, ckpt.get('config') or {})
    if steps > mcfg.n_timesteps:
        raise ConfigError(f'steps={steps} is more than the model\'s {mcfg.n_timesteps} diffusion timesteps')
    classes = parse_labels(cfg.labels, mcfg.n_classes)
    labels = torch.tensor(classes, device=dev).repeat_interleave(cfg.n_per_class)  # one row per label
    print(f"loaded {cfg.ckpt} ({cfg.weights} weights, iter {ckpt.get('iter_num', '?')}): "
          f'{model.num_params() / 1e6:.2f}M parameters, {mcfg.n_blocks} blocks of {mcfg.block_len} tokens')
    print(f'sampling {len(labels)} images ({cfg.n_per_class} per label, labels {",".join(map(str, classes))}) on {dev}: '
          f'{sampler}, {steps} steps per block, cfg_scale {cfg_scale}, '
          f"{'KV cache' if cfg.use_cache else 'uncached reference'}")

    gif = GifRecorder(mcfg, cfg.n_per_class, steps) if cfg.gif else None
    every = max(1, mcfg.n_blocks // 4)  # about four progress lines per run
    t0 = time.perf_counter()

    def callback(block, step, clean, x, x0):
        if gif is not None:
            gif(block, step, clean, x, x0)
        if step == steps - 1 and ((block + 1) % every == 0 or block + 1 == mcfg.n_blocks):
            print(f'  block {block + 1}/{mcfg.n_blocks} ({time.perf_counter() - t0:.1f}s)')

    gen = torch.Generator(device=dev).manual_seed(cfg.seed)  # as train.sample_grid seeds its grid
    with WorkCounter(model) as work:
        imgs = acdit.sample(model, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps,
                            generator=gen, use_cache=cfg.use_cache, callback=callback)
    sync(dev)
    seconds = time.perf_counter() - t0
    cache = f'KV cache {work.kv_bytes:,} bytes ({work.kv_bytes / 2**20:.2f} MiB)' if cfg.use_cache else 'no KV cache'
    commits = f' ({work.evals - work.commits} denoising + {work.commits} commits)' if cfg.use_cache else ''
    print(f"done in {seconds:.2f}s{' (with GIF frames)' if gif else ''}: {work.evals} network evaluations"
          f'{commits}, {work.token_forwards:,} token-forwards, {cache}')

    out = cfg.out or os.path.join(os.path.dirname(cfg.ckpt), 'samples.png')
    images = train.to_uint8(imgs).cpu()
    makedirs_for(out)
    train.save_grid(images, out, nrow=cfg.n_per_class)
    print(f'wrote {out}')
    if cfg.npz:
        makedirs_for(cfg.npz)
        with open(cfg.npz, 'wb') as f:  # a file object, so np.savez keeps the name as given
            np.savez(f, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.cpu().numpy())
        print(f'wrote {cfg.npz}')
    if gif is not None:
        makedirs_for(cfg.gif)
        gif.save(cfg.gif)
        print(f'wrote {cfg.gif} ({len(gif.frames)} frames)')
    return types.SimpleNamespace(images=images, labels=labels.cpu(), seconds=seconds, evals=work.evals,
                                 token_forwards=work.token_forwards, kv_bytes=work.kv_bytes)


if __name__ == '__main__':
    run_cli(main)
