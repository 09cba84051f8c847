"""
Judge MNIST samples with an independent classifier: class accuracy and FID.

    python evaluate.py --ckpt=out/ckpt.pt --data_dir=../shared/data/mnist

A small CNN (nothing to do with ACDiT) is trained once on the MNIST training set and
cached as judge.pt (about a minute on 2 CPU cores). The checkpoint
then samples n_per_class images of every class with the settings train.py sampled
with, and we report
  - accuracy: how often the judge recognizes the class that was asked for;
  - FID: the Frechet distance between the judge's penultimate features of the samples
    and of the MNIST test set (lower is better; with few samples it is biased upward,
    so compare numbers made with the same n_per_class only).
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import acdit
import generate
import train


class Judge(nn.Module):
    """Two conv layers and two linears: about 98% test accuracy after one epoch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x):                                        # (B, 1, 28, 28) in [-1, 1]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))                     # (B, 128)

    def forward(self, x):
        return self.fc2(self.features(x))


def get_judge(data_dir, path="judge.pt"):
    """The judge, trained on first use (seeded, one epoch) and cached at path. Multithreaded
    CPU kernels make a retrained judge differ slightly: keep judge.pt to compare numbers."""
    torch.manual_seed(0)  # the judge's initial weights too: every fresh judge is the same
    judge = Judge()
    if os.path.exists(path):
        judge.load_state_dict(torch.load(path, weights_only=True))
        return judge.eval()
    print(f"training the judge classifier (once; cached as {path})", flush=True)
    x, y = train.load_dataset("mnist", data_dir, "train")
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for idx in torch.randperm(len(x), generator=gen).split(128):
        loss = F.cross_entropy(judge(train.to_float(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = train.load_dataset("mnist", data_dir, "test")
    judge.eval()
    with torch.no_grad():
        acc = (judge(train.to_float(xt)).argmax(1) == yt).float().mean().item()
    print(f"judge test accuracy: {acc:.4f}")
    train.save_checkpoint(path, judge.state_dict())
    return judge


def frechet_distance(f1, f2):
    """FID between two feature sets (n, d): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    s1_half = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * cross).item()


@torch.no_grad()
def judge_model(model, judge, test_x, n_per_class=50, cfg_scale=2.0, steps=50, sampler="ddim",
                seed=0, batch=250):
    """Sample n_per_class images of each class; return (accuracy, FID, sampling seconds,
    confusion), confusion[i, j] counting samples asked for as class i that the judge read as j."""
    labels = torch.arange(10).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    imgs = torch.cat([acdit.sample(model, labels[i:i + batch], cfg_scale=cfg_scale, sampler=sampler,
                                   steps=steps, generator=torch.Generator().manual_seed(seed + i))
                      for i in range(0, len(labels), batch)])
    seconds = time.perf_counter() - t0
    imgs = train.to_float(train.to_uint8(imgs))                   # judged as saved to a PNG
    read = judge(imgs).argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.long).index_put_((labels, read), torch.ones_like(read),
                                                                 accumulate=True)
    acc = confusion.trace().item() / len(labels)
    fid = frechet_distance(judge.features(imgs), judge.features(train.to_float(test_x)))
    return acc, fid, seconds, confusion


def misreadings(confusion, top=4):
    """The most frequent confusions as text, e.g. '5 read as 3: 13/100'."""
    off = confusion.clone().fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)  # ties: lower classes first
    per_class = confusion.sum(1)
    return ", ".join(f"{i // 10} read as {i % 10}: {c}/{per_class[i // 10]}"
                     for c, i in zip(counts[:top].tolist(), flat[:top].tolist()) if c > 0) or "none"


# (key, default, meaning), shown by --help; the sampling options are generate.py's own
SAMPLING_OPTIONS = [o for o in generate.OPTIONS if o[0] in ("cfg_scale", "sampler", "steps")]
OPTIONS = [
    ("ckpt", "out/ckpt.pt", "checkpoint written by train.py"),
    ("data_dir", "data", "where the MNIST files are (the judge trains on them, FID compares with them)"),
    ("judge", "judge.pt", "the judge's weights: trained and saved here on first use, then reused"),
    ("n_per_class", 50, "samples per class (FID needs a few hundred in all)"),
    *SAMPLING_OPTIONS,
    ("seed", 0, "seeds the sampling noise"),
    ("weights", "ema", "'ema' (the averaged weights) or 'model' (the raw ones)"),
]


def main(argv):
    opt = generate.parse_args(argv, __doc__, OPTIONS)
    if opt is None:  # --help was printed
        return
    generate.check_options(opt)  # a bad option fails before the checkpoint loads
    model, ckpt = generate.load_model(opt.ckpt, opt.weights)
    mcfg = model.cfg
    if (mcfg.img_size, mcfg.in_channels, mcfg.n_classes) != (28, 1, 10):
        raise train.ConfigError("the judge knows MNIST only (28x28x1, 10 classes)")
    cfg_scale, steps, sampler = generate.check_options(opt, ckpt.get("config") or {})
    judge = get_judge(opt.data_dir, opt.judge)
    test_x, _ = train.load_dataset("mnist", opt.data_dir, "test")
    acc, fid, seconds, confusion = judge_model(model, judge, test_x, opt.n_per_class, cfg_scale,
                                               steps, sampler, opt.seed)
    print(f"{opt.ckpt} (iter {ckpt.get('iter_num')}, {opt.weights}): "
          f"{10 * opt.n_per_class} samples, {sampler} {steps} steps/block, CFG {cfg_scale}: "
          f"class accuracy {acc:.3f}, FID {fid:.1f} (sampling {seconds:.0f}s)")
    per_class = confusion.diagonal() / confusion.sum(1)
    print("accuracy per class: " + "  ".join(f"{c}: {a:.2f}" for c, a in enumerate(per_class.tolist())))
    print(f"most frequent misreadings: {misreadings(confusion)}")


if __name__ == "__main__":
    generate.run_cli(lambda: main(sys.argv[1:]))  # one-line errors, no tracebacks
