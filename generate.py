"""
Sample images (or videos) from an ACDiT checkpoint written by train.py.

    python generate.py --ckpt=out/ckpt.pt                      # 10 samples of every class -> out/samples.png
    python generate.py --ckpt=out/ckpt.pt --labels=3,7 --n_per_class=8 --gif=out/gen.gif
    python generate.py --ckpt=weights/cifar10.pt --labels=cat,dog --out=pets.png   # classes by name
    python generate.py --ckpt=out/ckpt.pt --sampler=dpm++ --steps=10   # DPM-Solver++: 4x faster
    python generate.py --ckpt=out/ckpt.pt --npz=out/samples.npz   # raw uint8 samples for evaluation
    python generate.py --ckpt=out/ckpt.pt --prefix_blocks=3 --data_dir=path/to/mnist  # complete test images
    python generate.py --ckpt=out-moving-mnist/ckpt.pt --gif=out-moving-mnist/videos.gif --n_frames=16
    python generate.py --ckpt=out-moving-mnist/ckpt.pt --prefix_blocks=3 --data_dir=path/to/mnist  # predict frames

With the defaults it redraws the last sample grid train.py saved for the checkpoint (same
seed, guidance scale, steps and sampler; after a short run, the --n_per_class and --steps it
printed), and prints the class of each row. For a video model the PNG is a strip, a row per
video and a column per frame, and --gif animates the videos themselves. With --prefix_blocks a
video model predicts frames: it is given the first K frames of test videos (a test digit moving
as in training) and makes the rest; each true video's row comes before its predictions' rows.
"""

import math
import os
import time

import numpy as np
import torch

import acdit
import cli
import data

OPTIONS = {**cli.SAMPLING_OPTIONS,  # ckpt, weights, cfg_scale, sampler, steps, seed, n_frames, device
    'out': ('', "grid PNG, a row per label (or source image, or video); '' = samples.png by the checkpoint"),
    'labels': ('all', "classes to sample, by name or number (e.g. cat,dog or 3,5), or 'all'"),
    'n_per_class': (10, 'samples per label (per source image with prefix_blocks): the columns of the grid'),
    'use_cache': (True, "keep finished blocks' keys/values in a KV cache; False rebuilds it every step"),
    'npz': ('', 'if set, also save images (N, [T,] H, W, C) uint8 and labels (N,) here (np.savez), for evaluate.py'),
    'gif': ('', 'if set, also save an animated GIF: the generation block by block (for video: the videos)'),
    'prefix_blocks': (0, 'K > 0: give the first K blocks of test images (frames of test videos), generate the rest'),
    'sources': (1, 'with prefix_blocks: test images per label, the first of that class in the test set'),
    'indices': ('', "with prefix_blocks: test-set indices to complete instead, e.g. 0,7,42"),
    'data_dir': ('', "where the test images for prefix_blocks are; '' = the training run's data_dir"),
}
CHOICES = cli.SAMPLING_CHOICES


def parse_list(key, text, n, names=()):
    """'3,7' -> [3, 7], each a number in 0..n-1, or 'cat,dog' -> their places in names (a folder named '7': that class)."""
    items = text.split(',')
    bad = next((s for s in items if s not in names and not (s.isdigit() and int(s) < n)), None)
    cli.check(bad is None, f"{key}={text!r}: {bad!r} is not a number in 0..{n - 1}"
                           + (f" nor a class ({', '.join(names)})" if names else ''))
    return [names.index(s) if s in names else int(s) for s in items]


def rgb(images):
    """uint8 (..., C, H, W) with C = 1 or 3 -> (..., 3, H, W)."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:])


def mark_generated(images, config, n_given):
    """uint8 images (B, [T,] C, H, W) -> RGB, the generated blocks (video: frames) tinted green, so the given part shows."""
    n_blocks = images.shape[1] if images.ndim == 5 else config.n_blocks
    given = torch.zeros(1, n_blocks * config.block_len, config.patch_dim)
    given[:, :n_given * config.block_len] = 1
    given = acdit.unpatchify(given, config)[..., :1, :, :].bool()   # (1, [T,] 1, H, W)
    tinted = (rgb(images) * torch.tensor([0.55, 1.0, 0.55]).view(3, 1, 1)).round().to(torch.uint8)
    return torch.where(given, rgb(images), tinted)


def main(argv=None):
    args = cli.parse_args(argv, __doc__, OPTIONS, CHOICES)
    from PIL import Image  # the grid's format comes from its file name
    for key in ('n_per_class', 'sources'):
        cli.check(getattr(args, key) >= 1, f'{key}={getattr(args, key)} must be at least 1')
    cli.check(not args.out or os.path.splitext(args.out)[1].lower() in Image.registered_extensions(),
              f'out={args.out!r}: the file name needs an image extension such as .png')
    dev = cli.pick_device(args.device)
    model, ckpt = cli.load_model(args.ckpt, args.weights, dev)
    config, K, video = model.config, args.prefix_blocks, model.config.n_frames > 1
    unit = 'frames' if video else 'blocks'                          # a video's block is a frame
    cfg_scale, steps, sampler = cli.sampling_settings(args, ckpt)
    cli.check(0 <= K < config.n_blocks, f'prefix_blocks={K} must be in 0..{config.n_blocks - 1} (the model has '
                                      f'{config.n_blocks} {unit})')
    cli.check(args.n_frames >= 0 and (args.use_cache or args.n_frames <= config.n_frames),
              f'n_frames={args.n_frames}: 0 (the trained length) or more; past the trained {config.n_frames} '
              f'frames only with --use_cache=True (the cache window slides)')
    n_total = args.n_frames or config.n_blocks                      # blocks to generate
    names = ckpt.get('classes', [str(i) for i in range(config.n_classes)])  # older checkpoints: numbers
    wanted = list(range(config.n_classes)) if args.labels == 'all' else parse_list('labels', args.labels, config.n_classes, names)
    prefix = None
    if K:  # the first `sources` test images of each class (or --indices), each completed n_per_class times
        test_x, test_y = data.load_dataset(ckpt['args']['dataset'], args.data_dir or ckpt['args']['data_dir'], 'test',
                                           config.img_size, config.in_channels)
        picks = parse_list('indices', args.indices, len(test_x)) if args.indices else \
            [i for y in wanted for i in (test_y == y).nonzero()[:args.sources, 0].tolist()]
        real = test_x[picks]
        if video:  # each test digit moving as in training (path drawn from --seed), n_total frames
            real = data.moving_mnist(real, torch.Generator().manual_seed(args.seed), frames=n_total)
        prefix = acdit.patchify(data.to_float(real), config)[:, :K * config.block_len]
        prefix = prefix.repeat_interleave(args.n_per_class, dim=0).to(dev)
    labels = (test_y[picks] if K else torch.tensor(wanted)).repeat_interleave(args.n_per_class).to(dev)  # a row each
    print(f"loaded {args.ckpt} ({args.weights} weights, iter {ckpt['iter_num']}): {model.num_params() / 1e6:.2f}M "
          f"parameters, {config.n_blocks} blocks of {config.block_len} tokens")
    print(f"sampling {len(labels)} {f'videos of {n_total} frames' if video else 'images'}"
          f"{f', given {K} of {n_total} {unit}' if K else ''} on {dev}: {sampler}, {steps} steps per "
          f"block, cfg_scale {cfg_scale}, {'KV cache' if args.use_cache else 'uncached reference'}")

    frames, gif_stride = [], max(1, math.ceil(steps / 6))         # GIF: about 6 frames per block
    every, t0 = math.ceil(n_total / 4), time.perf_counter()       # at most four progress lines

    def callback(block, step, clean, x, x0):
        if args.gif and not video and (step % gif_stride == 0 or step == steps - 1):
            # finished blocks clean, the current one as its predicted x0, the rest mid-gray (0)
            rest = x0.new_zeros(x0.shape[0], (config.n_blocks - block - 1) * config.block_len, x0.shape[2])
            tokens = torch.cat([clean, x0, rest], dim=1)
            frames.append(data.grid_array(data.to_uint8(acdit.unpatchify(tokens, config)), args.n_per_class))
        if step == steps - 1 and ((block + 1) % every == 0 or block + 1 == n_total):
            print(f'  {"frame" if video else "block"} {block + 1}/{n_total} ({time.perf_counter() - t0:.1f}s)')

    gen = torch.Generator(device=dev).manual_seed(args.seed)      # as train.py seeds its grids
    imgs = acdit.sample(model, labels, cfg_scale=cfg_scale, sampler=sampler, steps=steps, generator=gen,
                        use_cache=args.use_cache, prefix=prefix, n_frames=args.n_frames or None, callback=callback)
    cli.sync(dev)
    print(f'done in {time.perf_counter() - t0:.2f}s{" (with GIF frames)" if frames else ""}')

    images = data.to_uint8(imgs).cpu()                            # (B, [T,] C, H, W)
    grid = images.flatten(0, 1) if video else images
    nrow = n_total if video else args.n_per_class + (K > 0)       # a video: a row of frames; a source first
    if K:  # a source, then its completions with the generated part tinted (video: each a row of frames)
        marked = mark_generated(images, config, K).unflatten(0, (len(picks), args.n_per_class))
        grid = torch.cat([rgb(real)[:, None], marked], dim=1).flatten(0, 2 if video else 1)
    out = args.out or os.path.join(os.path.dirname(args.ckpt), 'samples.png')
    data.save_grid(grid, out, nrow=nrow)
    print(f"wrote {out}: rows of {', '.join(names[i] for i in labels[::args.n_per_class].tolist())}"
          + (f' ({args.n_per_class + (K > 0)} rows each: a video a row)' if video else ''))
    if args.npz:
        os.makedirs(os.path.dirname(args.npz) or '.', exist_ok=True)
        with open(args.npz, 'wb') as f:  # a file object, so np.savez keeps the name as given
            np.savez(f, images=images.movedim(-3, -1).numpy(), labels=labels.cpu().numpy(), n_classes=config.n_classes,
                     dataset=ckpt['args']['dataset'], data_dir=args.data_dir or ckpt['args']['data_dir'])  # for evaluate.py
        print(f'wrote {args.npz}')
    if args.gif:  # for video: the videos play side by side, a row per label
        frames = [data.grid_array(images[:, t], args.n_per_class) for t in range(images.shape[1])] if video else frames
        data.save_gif(frames, args.gif, *((200, 600) if video else ()))
        print(f'wrote {args.gif} ({len(frames)} frames)')
    return images, labels.cpu()


if __name__ == '__main__':
    cli.run_cli(main)
