"""
Sample images from an ACDiT checkpoint written by train.py.

    python generate.py --ckpt=out/ckpt.pt                      # 10 samples of every class -> out/samples.png
    python generate.py --ckpt=out/ckpt.pt --labels=3,7 --n_per_class=8 --gif=out/gen.gif
    python generate.py --ckpt=out/ckpt.pt --sampler=dpm++ --steps=10   # DPM-Solver++: 4x faster
    python generate.py --ckpt=out/ckpt.pt --use_cache=False    # the uncached reference sampler
    python generate.py --ckpt=out/ckpt.pt --npz=out/samples.npz   # raw uint8 samples for evaluation
    python generate.py --ckpt=out/ckpt.pt --prefix_blocks=3 --data_dir=path/to/mnist  # complete test images
    python generate.py --ckpt=out-moving-mnist/ckpt.pt --gif=out-moving-mnist/videos.gif --n_frames=16

With the defaults it redraws the last sample grid train.py saved for the checkpoint
(same seed, guidance scale, steps and sampler), on the same kind of device. For a video
model the PNG is a strip, one row per video and one column per frame, and --gif animates
the videos themselves.
"""

import math
import os
import time
import types

import numpy as np
import torch

import acdit
import cli
import data

# ----------------------------------------------------------------------------- config start
ckpt = 'out/ckpt.pt'  # checkpoint written by train.py
weights = 'ema'  # 'ema' (the averaged weights train.py samples with) or 'model' (the raw ones)
out = ''  # grid PNG, one row per label (or source image; for video one per video); '' = samples.png by the checkpoint
labels = 'all'  # class labels to sample, e.g. 0,1,2, or 'all'
n_per_class = 10  # samples per label (per source image with prefix_blocks): the columns of the grid
cfg_scale = 'auto'  # classifier-free guidance (1.0 = none), or one per block 'w0,w1,...'; 'auto' = the run's
sampler = 'auto'  # 'ddpm' (ancestral), 'ddim' (deterministic), 'dpm++' (DPM-Solver++(2M)); 'auto' as above
steps = 'auto'  # denoising steps per block; 'auto' as above
cfg_interval = ''  # 'lo,hi': guide only the steps with lo <= t <= hi ('' = every step)
seed = 0  # seeds the noise: the same seed gives the same images, cached or not
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'
use_cache = True  # keep finished blocks' keys/values in a KV cache; False rebuilds it every step
npz = ''  # if set, also save images (N, H, W, C) (videos: (N, T, H, W, C)) uint8 and labels (N,) here with np.savez
gif = ''  # if set, also save an animated GIF here: the generation block by block (for video: the videos)
n_frames = 0  # video models: frames to generate (0 = the trained length; more slides the cache window)
prefix_blocks = 0  # K > 0: give the first K blocks of test images, generate the rest (prefix completion)
sources = 1  # with prefix_blocks: test images per label, the first ones of that class in the test set
indices = ''  # with prefix_blocks: test-set indices to complete instead, e.g. 0,7,42 ('' = by label)
data_dir = 'data'  # where the test images for prefix_blocks are
# ----------------------------------------------------------------------------- config end


def parse_labels(text, n_classes):
    """'all' or '0,1,2' -> a list of class ids."""
    if text == 'all':
        return list(range(n_classes))
    try:
        labels = [int(s) for s in text.split(',')]
    except ValueError:
        raise cli.ConfigError(f"labels={text!r}: expected class numbers separated by commas "
                              f"(e.g. --labels=0,1,2) or 'all'") from None
    bad = [y for y in labels if not 0 <= y < n_classes]
    cli.check(not bad, f"labels={text!r}: {', '.join(map(str, bad))} out of range; "
                       f"this model knows classes 0..{n_classes - 1}")
    return labels


def check_options(opt):
    """The checks that need no checkpoint, so a typo fails at once; returns the cfg_interval."""
    cli.check(opt.sources >= 1, f'sources={opt.sources} must be at least 1')
    cli.check(opt.prefix_blocks >= 0, f'prefix_blocks={opt.prefix_blocks} must be >= 0')
    from PIL import Image  # the grid's format comes from its file name
    cli.check(not opt.out or os.path.splitext(opt.out)[1].lower() in Image.registered_extensions(),
              f"out={opt.out!r}: the file name needs an image extension such as .png")
    return cli.check_sampling_options(opt)


def mark_generated(images, mcfg, n_given):
    """uint8 (B, C, H, W) -> RGB, the generated blocks tinted green so the given part shows."""
    rgb = images.expand(-1, 3, -1, -1).clone() if images.shape[1] == 1 else images.clone()
    given = torch.zeros(1, mcfg.n_blocks * mcfg.block_len, 1)
    given[:, :n_given * mcfg.block_len] = 1
    given = acdit.unpatchify(given.expand(-1, -1, mcfg.patch_dim), mcfg)[:, :1].bool()  # (1, 1, H, W)
    tinted = rgb.float() * torch.tensor([0.55, 1.0, 0.55]).view(1, 3, 1, 1)
    return torch.where(given, rgb, tinted.round().to(torch.uint8))


class GifRecorder:
    """A callback for acdit.sample() that keeps a few frames per block, each a grid like the
    PNG: finished blocks clean, the current block as its predicted x0 (a readable guess from
    the first step on, where x_t is mostly noise), blocks still to come mid-gray."""

    def __init__(self, mcfg, nrow, steps, frames_per_block=6):
        self.mcfg, self.nrow, self.steps = mcfg, nrow, steps
        self.stride = max(1, math.ceil(steps / frames_per_block))
        self.frames = []

    def __call__(self, block, step, clean, x, x0):
        if step % self.stride and step != self.steps - 1:
            return
        rest = x0.new_zeros(x0.shape[0], (self.mcfg.n_blocks - block - 1) * self.mcfg.block_len, x0.shape[2])
        tokens = torch.cat([clean, x0, rest], dim=1)              # 0 = mid-gray
        self.frames.append(data.grid_array(data.to_uint8(acdit.unpatchify(tokens, self.mcfg)), self.nrow))

    def save(self, path):
        save_gif(self.frames, path)


def save_gif(frames, path, ms_per_frame=80, hold_last_ms=2000):
    """uint8 arrays (H, W, C) -> an animated GIF that loops, the last frame held longer."""
    from PIL import Image
    h, w, c = frames[0].shape
    scale = max(1, min(256 // min(h, w), 1024 // max(h, w)))  # small grids: nearest-neighbour upscale
    images = [Image.fromarray(f[:, :, 0] if c == 1 else f).resize((w * scale, h * scale), Image.NEAREST)
              for f in frames]
    images[0].save(path, format='GIF', save_all=True, append_images=images[1:], loop=0,
                   duration=[ms_per_frame] * (len(images) - 1) + [hold_last_ms])


def main(argv=None):
    opt = cli.parse_args(argv, __file__, __doc__)
    if opt is None:
        return None
    interval = check_options(opt)
    dev = cli.pick_device(opt.device)
    model, ckpt = cli.load_model(opt.ckpt, opt.weights, dev)
    mcfg, K = model.cfg, opt.prefix_blocks
    cli.check(K < mcfg.n_blocks, f'prefix_blocks={K}: this model has {mcfg.n_blocks} blocks, so at most '
                                 f'{mcfg.n_blocks - 1} can be given')
    video = mcfg.n_frames > 1
    cli.check(not (video and K), 'prefix_blocks: prefix completion is for image models only')
    cli.check(opt.n_frames == 0 or video, f'n_frames={opt.n_frames}: only for video models; this checkpoint makes images')
    cli.check(opt.n_frames >= 0, f'n_frames={opt.n_frames} must be >= 1 (or 0: the trained length)')
    cli.check(opt.use_cache or opt.n_frames <= mcfg.n_frames,
              f'n_frames={opt.n_frames}: past the trained {mcfg.n_frames} frames only with --use_cache=True '
              f'(the cache window slides; the uncached reference has no window)')
    n_total = opt.n_frames or mcfg.n_blocks                       # blocks to generate
    cfg_scale, steps, sampler = cli.sampling_settings(opt, ckpt, n_blocks=n_total)
    cli.check(steps <= mcfg.n_timesteps, f"steps={steps} is more than the model's {mcfg.n_timesteps} diffusion timesteps")
    classes = parse_labels(opt.labels, mcfg.n_classes)
    prefix, nrow = None, opt.n_per_class
    if K:  # the first `sources` test images of each class, each completed n_per_class times
        shape = (mcfg.img_size, mcfg.in_channels)
        dataset = next((name for name, s in data.DATASET_SHAPES.items() if s == shape), None)
        if dataset is None:
            raise cli.CheckpointError(f'{opt.ckpt}: no dataset here has {shape[0]}x{shape[0]}x{shape[1]} images '
                                      f'to take a prefix from')
        test_x, test_y = data.load_dataset(dataset, opt.data_dir, 'test')
        picks = [i for y in classes for i in (test_y == y).nonzero()[:opt.sources, 0].tolist()]
        if opt.indices != '':
            try:
                picks = [int(i) for i in str(opt.indices).split(',')]
            except ValueError:
                raise cli.ConfigError(f"indices={opt.indices!r}: expected test-set indices separated by commas") from None
            cli.check(all(0 <= i < len(test_x) for i in picks),
                      f'indices={opt.indices!r}: the test set has images 0..{len(test_x) - 1}')
        real = test_x[picks].repeat_interleave(opt.n_per_class, dim=0)
        labels = test_y[picks].repeat_interleave(opt.n_per_class).to(dev)
        prefix = acdit.patchify(data.to_float(real), mcfg)[:, :K * mcfg.block_len].to(dev)
        nrow = opt.n_per_class + 1
    else:
        labels = torch.tensor(classes, device=dev).repeat_interleave(opt.n_per_class)  # one row per label
    print(f"loaded {opt.ckpt} ({opt.weights} weights, iter {ckpt.get('iter_num', '?')}): "
          f'{model.num_params() / 1e6:.2f}M parameters, {mcfg.n_blocks} blocks of {mcfg.block_len} tokens')
    print(f'sampling {len(labels)} {f"videos of {n_total} frames" if video else "images"} ({opt.n_per_class} per {"source image" if K else "label"}, labels '
          f'{",".join(map(str, classes))}{f", given {K} of {mcfg.n_blocks} blocks" if K else ""}) on {dev}: '
          f"{sampler}, {steps} steps per block, cfg_scale {cfg_scale}, {'KV cache' if opt.use_cache else 'uncached reference'}")

    gif = GifRecorder(mcfg, nrow - bool(K), steps) if opt.gif and not video else None
    every = math.ceil(n_total / 4)  # at most four progress lines per run
    t0 = time.perf_counter()

    def callback(block, step, clean, x, x0):
        if gif is not None:
            gif(block, step, clean, x, x0)
        if step == steps - 1 and ((block + 1) % every == 0 or block + 1 == n_total):
            print(f'  {"frame" if video else "block"} {block + 1}/{n_total} ({time.perf_counter() - t0:.1f}s)')

    # count the work from outside acdit.py: the first layer sees every pass (denoising steps and
    # commits alike) as (rows, tokens, width); CFG's two halves are rows of one pass
    work = types.SimpleNamespace(passes=0, tokens=0)

    def count(module, args, output):
        work.passes += 1
        work.tokens += args[0].shape[0] * args[0].shape[1]

    hook = model.blocks[0].register_forward_hook(count)
    gen = torch.Generator(device=dev).manual_seed(opt.seed)  # as train.py seeds its grids
    imgs = acdit.sample(model, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps, generator=gen,
                        use_cache=opt.use_cache, prefix=prefix, callback=callback,
                        cfg_interval=interval, n_frames=opt.n_frames or None)
    cli.sync(dev)
    seconds = time.perf_counter() - t0
    hook.remove()
    print(f"done in {seconds:.2f}s{' (with GIF frames)' if gif else ''}: {work.passes} network passes, "
          f"{work.tokens:,} token-forwards")

    images = data.to_uint8(imgs).cpu()                            # (B, [T,] C, H, W)
    grid, nrow = (images.flatten(0, 1), n_total) if video else (images, nrow)  # a video: a row of frames
    if K:  # each row: the source image, then its completions with the generated part tinted
        marked = mark_generated(images, mcfg, K).view(len(picks), opt.n_per_class, 3, *images.shape[2:])
        source = test_x[picks].expand(-1, 3, -1, -1)[:, None]
        grid = torch.cat([source, marked], dim=1).flatten(0, 1)
    out = opt.out or os.path.join(os.path.dirname(opt.ckpt), 'samples.png')
    for path in (out, opt.npz, opt.gif):
        if path:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    data.save_grid(grid, out, nrow=nrow)
    print(f'wrote {out}')
    if opt.npz:
        with open(opt.npz, 'wb') as f:  # a file object, so np.savez keeps the name as given
            np.savez(f, images=images.movedim(-3, -1).numpy(), labels=labels.cpu().numpy())
        print(f'wrote {opt.npz}')
    if gif is not None:
        gif.save(opt.gif)
        print(f'wrote {opt.gif} ({len(gif.frames)} frames)')
    elif opt.gif:  # the videos play side by side: a row per label, n_per_class videos in each
        frames = [data.grid_array(images[:, t], opt.n_per_class) for t in range(images.shape[1])]
        save_gif(frames, opt.gif, ms_per_frame=200, hold_last_ms=600)
        print(f'wrote {opt.gif} ({len(frames)} frames)')
    return types.SimpleNamespace(images=images, labels=labels.cpu(), seconds=seconds, passes=work.passes,
                                 token_forwards=work.tokens)


if __name__ == '__main__':
    cli.run_cli(main)
