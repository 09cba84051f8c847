"""
Judge MNIST samples with an independent classifier: class accuracy and FID, beside the
same judge's numbers for real test images (the best any model can score).

    python evaluate.py --ckpt=out/ckpt.pt --data_dir=path/to/mnist      # 1000 samples
    python evaluate.py --npz=out/samples.npz --data_dir=path/to/mnist   # images from generate.py

A small CNN (nothing to do with ACDiT) is trained once on the MNIST training set and
cached as judge.pt (about a minute on 2 CPU cores). The checkpoint then samples
n_per_class images of every class with the settings its run sampled with, and we report
  - accuracy: how often the judge reads the class that was asked for;
  - FID: the Frechet distance between the judge's penultimate features of the samples
    and of the MNIST test set (lower is better; biased upward for few samples, so
    compare numbers made with the same number of samples only).
"""

import numpy as np
import torch

import cli
import data
from judge import get_judge, judge_images, misreadings, sample_images

# ----------------------------------------------------------------------------- config start
ckpt = 'out/ckpt.pt'  # checkpoint written by train.py
npz = ''  # if set, judge these images (generate.py --npz) instead of sampling from ckpt
data_dir = 'data'  # where the MNIST files are (the judge trains on them, FID compares with them)
judge = 'judge.pt'  # the judge's weights: trained and saved here on first use, then reused
n_per_class = 100  # samples per class (1000 in all: FID needs a few hundred)
cfg_scale = 'auto'  # classifier-free guidance; 'auto' = what the checkpoint's run sampled with
sampler = 'auto'  # 'ddpm', 'ddim' or 'dpm++'; 'auto' as above
steps = 'auto'  # denoising steps per block; 'auto' as above
cfg_interval = ''  # 'lo,hi': guide only the steps with lo <= t <= hi ('' = every step)
seed = 0  # seeds the sampling noise
weights = 'ema'  # 'ema' (the averaged weights) or 'model' (the raw ones)
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda' or 'mps'
# ----------------------------------------------------------------------------- config end


def main(argv=None):
    opt = cli.parse_args(argv, __file__, __doc__)
    if opt is None:
        return None
    interval = cli.check_sampling_options(opt)  # a bad option fails before the checkpoint loads
    if opt.npz:
        try:
            with np.load(opt.npz) as f:
                images, labels = torch.from_numpy(f['images']), torch.from_numpy(f['labels']).long()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise cli.CheckpointError(f'{opt.npz} is not an NPZ of images and labels as generate.py '
                                      f'--npz writes ({type(e).__name__}: {e})') from None
        cli.check(images.dtype == torch.uint8 and tuple(images.shape[1:]) == (28, 28, 1),
                  f'{opt.npz}: the judge knows MNIST only, uint8 images (N, 28, 28, 1); got '
                  f'{images.dtype} {tuple(images.shape)}')
        images = images.permute(0, 3, 1, 2)
        cli.check(labels.shape == (len(images),) and bool(((labels >= 0) & (labels < 10)).all()),
                  f'{opt.npz}: expected one label in 0..9 per image')
        what = f'{opt.npz}: {len(images)} images'
    else:
        dev = cli.pick_device(opt.device)
        model, ckpt = cli.load_model(opt.ckpt, opt.weights, dev)
        mcfg = model.cfg
        cli.check((mcfg.img_size, mcfg.in_channels, mcfg.n_classes) == (28, 1, 10),
                  'the judge knows MNIST only (28x28x1, 10 classes)')
        cfg_scale, steps, sampler = cli.sampling_settings(opt, ckpt)
    judge = get_judge(opt.data_dir, opt.judge)  # before sampling: a bad --data_dir fails at once
    test_x, test_y = data.load_dataset('mnist', opt.data_dir, 'test')
    if not opt.npz:
        images, labels, seconds = sample_images(model, opt.n_per_class, cfg_scale, steps, sampler, opt.seed,
                                                cfg_interval=interval)
        what = (f"{opt.ckpt} (iter {ckpt.get('iter_num')}, {opt.weights}): {len(images)} samples, {sampler} "
                f'{steps} steps/block, CFG {cfg_scale}{f" on t in {list(interval)}" if interval else ""} '
                f'(sampling {seconds:.0f}s)')
    acc, fid, confusion = judge_images(judge, images, labels, test_x)
    # the ceiling: as many real test images, the first of each class in the same proportions
    picks = torch.cat([(test_y == y).nonzero()[:int((labels == y).sum()), 0] for y in range(10)])
    real_acc, real_fid, _ = judge_images(judge, test_x[picks], test_y[picks], test_x)
    print(f'{what}: class accuracy {acc:.3f}, FID {fid:.1f}')
    print(f'real test images, same judge, {len(picks)} images: class accuracy {real_acc:.3f}, FID {real_fid:.1f}')
    per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
    print('accuracy per class: ' + '  '.join(f'{c}: {a:.2f}' for c, a in enumerate(per_class.tolist())))
    print(f'most frequent misreadings: {misreadings(confusion)}')
    return acc, fid, real_acc, real_fid


if __name__ == '__main__':
    cli.run_cli(main)
