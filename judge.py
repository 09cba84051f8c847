"""
The judge: a small CNN, independent of ACDiT, that reads MNIST digits. It gives a model's
samples a class accuracy (how often it reads the class that was asked for) and an FID in
its own penultimate features (lower is better). evaluate.py and tradeoff.py use it. For
Moving MNIST it reads every frame's digit, and `motion` measures how the digit moves.
"""

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import acdit
import cli
import data


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


def get_judge(data_dir, path='judge.pt'):
    """The judge, trained on first use (seeded, one epoch) and cached at path. Multithreaded
    CPU kernels make a retrained judge differ slightly: keep judge.pt to compare numbers."""
    torch.manual_seed(0)  # the initial weights too: every fresh judge starts the same
    judge = Judge()
    if os.path.exists(path):
        judge.load_state_dict(cli.load_checkpoint(path))
        return judge.eval()
    print(f'training the judge classifier (once; cached as {path})', flush=True)
    x, y = data.load_dataset('mnist', data_dir, 'train')
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(128):
        loss = F.cross_entropy(judge(data.to_float(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cli.save_checkpoint(path, judge.state_dict())
    return judge.eval()


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
def judge_images(judge, images, labels, test_x):
    """uint8 images (n, 1, 28, 28) asked for as labels (n,) -> (accuracy, FID against test_x,
    confusion), confusion[i, j] counting images of class i that the judge read as j."""
    x = data.to_float(images)
    read = judge(x).argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.long).index_put_((labels, read), torch.ones_like(read),
                                                                 accumulate=True)
    fid = frechet_distance(judge.features(x), judge.features(data.to_float(test_x)))
    return confusion.trace().item() / len(labels), fid, confusion


@torch.no_grad()
def sample_images(model, n_per_class, cfg_scale, steps, sampler, seed=0, batch=250, n_frames=None):
    """n_per_class uint8 samples of each class (as saved to a PNG; videos for a video model, of
    n_frames frames if given), their labels, and the seconds."""
    dev = next(model.parameters()).device
    labels = torch.arange(10).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    imgs = torch.cat([acdit.sample(model, labels[i:i + batch].to(dev), cfg_scale=cfg_scale, sampler=sampler,
                                   steps=steps, generator=torch.Generator(dev).manual_seed(seed + i),
                                   n_frames=n_frames).cpu()
                      for i in range(0, len(labels), batch)])
    return data.to_uint8(imgs), labels, time.perf_counter() - t0


def misreadings(confusion, top=4):
    """The most frequent confusions as text, e.g. '5 read as 3: 13/100'."""
    off = confusion.clone().fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)  # ties: lower classes first
    per_class = confusion.sum(1)
    return ', '.join(f'{i // 10} read as {i % 10}: {c}/{per_class[i // 10]}'
                     for c, i in zip(counts[:top].tolist(), flat[:top].tolist()) if c > 0) or 'none'


# -----------------------------------------------------------------------------
# video: the judge reads each frame's digit, and the digit's motion is measured

def center_of_mass(frames):
    """Pixels (..., H, W) -> the intensity-weighted (row, col) of each frame, (..., 2)."""
    f = frames.float()
    mass = f.sum((-2, -1)).clamp(min=1e-6)
    rows = (f.sum(-1) * torch.arange(f.shape[-2], device=f.device)).sum(-1) / mass
    cols = (f.sum(-2) * torch.arange(f.shape[-1], device=f.device)).sum(-1) / mass
    return torch.stack([rows, cols], dim=-1)


def frame_digits(videos, size=14):
    """uint8 videos (B, T, 1, H, W) -> every frame's digit as the judge reads digits: the
    size x size window around the frame's center of mass (where a Moving MNIST digit is),
    scaled up to 28x28. (B*T, 1, 28, 28) uint8, frame by frame."""
    frames = videos.flatten(0, 2)                                 # (B*T, H, W)
    H, W = frames.shape[-2:]
    com = center_of_mass(frames).round().long()
    top, left = (com[:, 0] - size // 2).clamp(0, H - size), (com[:, 1] - size // 2).clamp(0, W - size)
    rows, cols = top[:, None] + torch.arange(size), left[:, None] + torch.arange(size)
    crops = frames[torch.arange(len(frames))[:, None, None], rows[:, :, None], cols[:, None, :]]
    up = F.interpolate(crops[:, None].float(), size=(28, 28), mode='bilinear', align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def motion(videos):
    """How steadily the digit moves in uint8 videos (B, T >= 3, 1, H, W): the frame-to-frame
    displacement of its center of mass, |d_t| in pixels. Returns (mean speed, spread): the mean
    of |d_t| and the mean over videos of its standard deviation over t. A Moving MNIST digit
    keeps its speed except at bounces; a frozen digit has speed 0, a jittering one a large spread."""
    assert videos.shape[1] >= 3, "two displacements at least"
    com = center_of_mass(videos[:, :, 0])                         # (B, T, 2)
    speed = (com[:, 1:] - com[:, :-1]).norm(dim=-1)               # (B, T-1)
    return speed.mean().item(), speed.std(dim=1).mean().item()
