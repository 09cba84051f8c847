"""
Judge samples with an independent classifier: class accuracy and FID, beside the same
judge's numbers for real test images (the best any model can score).

    python evaluate.py --ckpt=out/ckpt.pt                # 1000 samples, judged on the run's dataset
    python evaluate.py --npz=out/samples.npz             # images from generate.py
    python evaluate.py --ckpt=out-moving-mnist/ckpt.pt --n_frames=24     # videos, past their length
    python evaluate.py --ckpt=out-moving-mnist/ckpt.pt --prefix_blocks=4  # frame prediction
    python evaluate.py --ckpt=out-cifar10/ckpt.pt --cfg_scale=3          # colour images: their own judge

A small CNN (nothing to do with ACDiT), trained once on the run's training images and cached
(--judge; about a minute for MNIST, tens of minutes for colour images on 2 CPU cores), reads
n_per_class samples of every class drawn with the settings the run sampled with; we report
  - accuracy: how often the judge reads the class that was asked for;
  - FID: the Frechet distance between the judge's penultimate features of the samples
    and of the test set (lower is better; biased upward for few samples, so
    compare numbers made with the same number of samples only).
For a Moving MNIST checkpoint every frame is judged (the digit cut out around its center
of mass), beside real Moving MNIST videos made from the test digits, and the digit's
motion is measured: speed and spread of its frame-to-frame displacement. With --prefix_blocks=K
the model predicts frames instead: given the first K frames of those real videos it makes the
rest, and each frame ahead is scored against the true one (class accuracy, the digit's
center-of-mass error in pixels, pixel MSE) beside the baseline of repeating the last given frame.
"""

import time

import numpy as np
import torch

import acdit
import cli
import data
from judge import center_of_mass, frame_digits, get_judge, judge_images, judged_split, misreadings, motion, sample_images

OPTIONS = {**cli.SAMPLING_OPTIONS,  # ckpt, weights, cfg_scale, sampler, steps, seed, n_frames, device
    'npz': ('', 'if set, judge these images (generate.py --npz) instead of sampling from ckpt'),
    'data_dir': ('', "the dataset (the judge trains on it, FID compares with it); '' = the run's data_dir"),
    'judge': ('auto', "the judge's weights, trained and saved on first use, then reused; 'auto' = judge.pt "
                      "for MNIST, judge_<dataset or folder name>.pt else"),
    'n_per_class': (100, 'samples per class (1000 in all: FID needs a few hundred)'),
    'prefix_blocks': (0, 'video models: K > 0 gives the first K frames of real test videos and judges the rest'),
}
CHOICES = cli.SAMPLING_CHOICES


def read_npz(path):
    """uint8 images (N, C, H, W) or videos (N, T, C, H, W), labels, and the run's dataset, data_dir
    and n_classes (files from before generate.py saved them: MNIST) from generate.py --npz."""
    try:
        with np.load(path) as f:
            images, labels = torch.from_numpy(f['images']), torch.from_numpy(f['labels']).long()
            run = {k: f[k].item() if k in f else '' for k in ('dataset', 'data_dir', 'n_classes')}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise cli.ConfigError(f'{path} is not an NPZ of images and labels as generate.py --npz writes '
                              f'({type(e).__name__}: {e})') from None
    run['dataset'] = run['dataset'] or ('moving_mnist' if images.ndim == 5 else 'mnist')
    run['n_classes'] = run['n_classes'] or 10
    size, channels = data.DATASET_SHAPES.get(run['dataset'], (images.shape[-2], images.shape[-1]))
    cli.check(images.dtype == torch.uint8 and images.ndim in (4, 5) and images.shape[-3:] == (size, size, channels)
              and channels in (1, 3) and (images.ndim == 4 or images.shape[1] >= 3),
              f"{path}: expected {run['dataset']}'s uint8 images (N, {size}, {size}, {channels}) or videos "
              f"(N, T >= 3, {size}, {size}, {channels}); got {images.dtype} {tuple(images.shape)}")
    cli.check(labels.shape == (len(images),) and bool(((labels >= 0) & (labels < run['n_classes'])).all()),
              f"{path}: expected one label in 0..{run['n_classes'] - 1} per image")
    return images.movedim(-1, -3), labels, run


def main(argv=None):
    args = cli.parse_args(argv, __doc__, OPTIONS, CHOICES)
    cli.check(args.n_per_class >= 1, f'n_per_class={args.n_per_class} must be at least 1')
    sampling = [k for k in (*cli.SAMPLING_OPTIONS, 'n_per_class', 'prefix_blocks') if getattr(args, k) != OPTIONS[k][0]]
    cli.check(not (args.npz and sampling), f"--npz judges the file's images as they are: {', '.join(sampling)} would "
                                           f"sample from --ckpt (give one or the other)")
    if args.npz:
        images, labels, run = read_npz(args.npz)
        what = f"{args.npz}: {len(images)} {'videos' if images.ndim == 5 else 'images'}"
        channels, size = images.shape[-3], images.shape[-1]
    else:
        dev = cli.pick_device(args.device)
        model, ckpt = cli.load_model(args.ckpt, args.weights, dev)
        cfg_scale, steps, sampler = cli.sampling_settings(args, ckpt)
        run, video = dict(ckpt['args'], n_classes=model.config.n_classes), model.config.n_frames > 1
        channels, size = model.config.in_channels, model.config.img_size
        cli.check(args.n_frames == 0 or args.n_frames >= 3, f'n_frames={args.n_frames}: at least 3 (the motion '
                                                            f'check needs two displacements)')
        cli.check(args.prefix_blocks == 0 or video, f'prefix_blocks={args.prefix_blocks}: frame prediction is '
                                                    f'for video models (generate.py completes images)')
        most = min(model.config.n_frames, args.n_frames or model.config.n_frames) - 1  # a frame left to predict
        cli.check(0 <= args.prefix_blocks <= most, f'prefix_blocks={args.prefix_blocks} must be in 0..{most} '
                  f'(frames given, fewer than the trained {model.config.n_frames} and those made)')
    dataset, data_dir, n_classes = run['dataset'], args.data_dir or run['data_dir'] or 'data', run['n_classes']
    judge = get_judge(data_dir, args.judge, dataset, size, channels, n_classes)  # before sampling: a bad data_dir fails now
    test_x, test_y = judged_split(dataset, data_dir, 'test', size, channels)
    if args.prefix_blocks:
        picks = torch.cat([(test_y == y).nonzero()[:args.n_per_class, 0] for y in range(n_classes)])
        return judge_predictions(judge, model, data.halve(test_x)[picks], test_y[picks], args.prefix_blocks,
                                 args.n_frames or model.config.n_frames, args.seed,
                                 dict(cfg_scale=cfg_scale, steps=steps, sampler=sampler))
    if not args.npz:
        images, labels, seconds = sample_images(model, args.n_per_class, cfg_scale, steps, sampler, args.seed,
                                                n_frames=args.n_frames or None)
        what = (f"{args.ckpt} (iter {ckpt['iter_num']}, {args.weights}): {len(images)} samples, {sampler} "
                f'{steps} steps/block, CFG {cfg_scale} (sampling {seconds:.0f}s)')
    # the ceiling: as many real test images, the first of each class in the same proportions
    picks = torch.cat([(test_y == y).nonzero()[:int((labels == y).sum()), 0] for y in range(n_classes)])
    if images.ndim == 5:
        return judge_videos(judge, images, labels, test_x, test_y, picks, what)
    acc, fid, confusion = judge_images(judge, images, labels, test_x)
    real_acc, real_fid, _ = judge_images(judge, test_x[picks], test_y[picks], test_x)
    print(f'{what}: class accuracy {acc:.3f}, FID {fid:.1f}')
    print(f'real test images, same judge, {len(picks)} images: class accuracy {real_acc:.3f}, FID {real_fid:.1f}')
    per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
    print('accuracy per class: ' + '  '.join(f'{c}: {a:.2f}' for c, a in enumerate(per_class.tolist())))
    print(f'most frequent misreadings: {misreadings(confusion)}')
    return acc, fid, real_acc, real_fid


def real_videos(digits, frames):
    """Real Moving MNIST videos (B, frames, 1, 32, 32) of halved test digits (B, 1, 14, 14), their paths drawn from
    seed 0: what generated videos are judged beside, and what frame prediction is scored against."""
    return data.moving_mnist(digits, torch.Generator().manual_seed(0), frames=frames)


def judge_videos(judge, videos, labels, test_x, test_y, picks, what):
    """Every frame of uint8 videos (B, T, 1, 32, 32) judged, beside real Moving MNIST videos of
    the same length made from the test digits picks (the same classes), and the motion of both."""
    B, T = videos.shape[:2]
    digits = data.halve(test_x)
    real = real_videos(digits[picks], T)
    ref = frame_digits(data.moving_mnist(digits, torch.Generator().manual_seed(1), frames=1))  # for FID
    frames = frame_digits(videos)                                 # (B*T, 1, 28, 28), video by video
    acc, fid, confusion = judge_images(judge, frames, labels.repeat_interleave(T), ref)
    real_acc, real_fid, _ = judge_images(judge, frame_digits(real), test_y[picks].repeat_interleave(T), ref)
    with torch.no_grad():
        read = judge(data.to_float(frames)).argmax(1).view(B, T)
    by_frame = (read == labels[:, None]).float().mean(0)
    (speed, spread), (real_speed, real_spread) = motion(videos), motion(real)
    print(f'{what}: frame class accuracy {acc:.3f}, frame FID {fid:.1f}')
    print(f'real Moving MNIST videos, same judge, {len(picks)} videos of {T} frames: frame class accuracy '
          f'{real_acc:.3f}, frame FID {real_fid:.1f}')
    print('accuracy by frame: ' + '  '.join(f'{t + 1}: {a:.2f}' for t, a in enumerate(by_frame.tolist())))
    print(f'most frequent misreadings: {misreadings(confusion)}')
    print(f'motion of the center of mass, pixels a frame: generated speed {speed:.2f}, spread {spread:.2f}; '
          f'real speed {real_speed:.2f}, spread {real_spread:.2f}')
    return acc, fid, real_acc, real_fid, (speed, spread, real_speed, real_spread), by_frame.tolist()


@torch.no_grad()
def judge_predictions(judge, model, digits, labels, K, T, seed, settings, batch=250):
    """Frame prediction: the real videos of the test digits (B, 1, 14, 14), T frames each (the
    ones judge_videos judges beside); the model is given the first K frames and makes the rest,
    each frame ahead scored against the true frame, beside repeating frame K."""
    config, dev = model.config, next(model.parameters()).device
    real = real_videos(digits, T)                                 # (B, T, 1, 32, 32)
    prefix = acdit.patchify(data.to_float(real), config)[:, :K * config.block_len]
    t0 = time.perf_counter()
    pred = torch.cat([acdit.sample(model, labels[i:i + batch].to(dev), prefix=prefix[i:i + batch].to(dev),
                                   n_frames=T, generator=torch.Generator(dev).manual_seed(seed + i), **settings).cpu()
                      for i in range(0, len(labels), batch)])
    seconds, truth = time.perf_counter() - t0, real[:, K:]
    rows = {'predicted': data.to_uint8(pred)[:, K:], f'frame {K} repeated': real[:, K - 1:K].expand_as(truth),
            'true frames': truth}
    B, ahead, true_com = len(truth), T - K, center_of_mass(truth[:, :, 0])
    scores = {}
    for name, frames in rows.items():
        read = judge(data.to_float(frame_digits(frames))).argmax(1).view(B, ahead)
        scores[name] = {'class accuracy': (read == labels[:, None]).float().mean(0),
                        'center-of-mass error (px)': (center_of_mass(frames[:, :, 0]) - true_com).norm(dim=-1).mean(0),
                        'pixel MSE (0..1)': ((frames.float() - truth.float()) / 255).pow(2).mean((0, 2, 3, 4))}
    print(f"frame prediction: {B} real test videos, given {K} of {T} frames; {settings['sampler']} "
          f"{settings['steps']} steps/frame, CFG {settings['cfg_scale']} (sampling {seconds:.0f}s)")
    print(f"{'frames ahead':<44}" + ''.join(f'{h + 1:>7}' for h in range(ahead)) + '    mean')
    for metric in scores['predicted']:
        for name in rows:
            if name != 'true frames' or metric == 'class accuracy':   # the truth's errors are 0
                v = scores[name][metric]
                print(f'{metric + ", " + name:<44}' + ''.join(f'{x:7.3f}' for x in v.tolist()) + f'{v.mean():8.3f}')
    return {name: {m: v.tolist() for m, v in s.items()} for name, s in scores.items()}


if __name__ == '__main__':
    cli.run_cli(main)
