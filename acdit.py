"""
ACDiT in one file: an autoregressive blockwise conditional diffusion transformer.

Hu et al., "ACDiT: Interpolating Autoregressive Conditional Modeling and
Diffusion Transformer" (arXiv 2412.07720). An image is cut into patches
(tokens); consecutive tokens form blocks. Blocks are generated one after
another (autoregression), and the tokens of one block are generated together by
a diffusion process conditioned on all earlier, already clean blocks. A video is
the same model with one block per frame and a time axis in RoPE (n_frames > 1).

Read top to bottom:
  1. ACDiTConfig          the knobs, checked up front
  2. patchify/unpatchify  image <-> tokens in block-major order
  3. SCAM                 the Skip-Causal Attention Mask, FlexAttention + dense
  4. DDPMSchedule         noise schedule, training noise, the reverse step
                          (DDPM, DDIM, DPM-Solver++)
  5. the model            a DiT with 2D/3D RoPE, RMSNorm, QK-norm and adaLN-Zero
                          on noised tokens only; the training loss
  6. KVCache + sample()   block-by-block generation, cached and uncached
"""

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ACDiTConfig:
    img_size: int = 28           # square images (or video frames), pixels per side
    in_channels: int = 1
    n_frames: int = 1            # 1: images; > 1: videos of n_frames frames, one block per frame
    patch_size: int = 4          # each token is a p x p x C patch
    block_h: int = 1             # block height in patches
    block_w: int = 7             # block width in patches (1 x grid = row strips)
    depth: int = 4               # transformer layers
    width: int = 128             # hidden size D
    n_heads: int = 4
    mlp_ratio: float = 4.0
    n_classes: int = 10          # class labels 0..n_classes-1; n_classes is the null label
    label_dropout: float = 0.1   # p(label -> null) in training, for classifier-free guidance
    n_timesteps: int = 1000      # DDPM steps T
    beta_start: float = 1e-4     # linear beta schedule, as in DDPM
    beta_end: float = 0.02
    min_snr_gamma: float = 0.0   # 0: the paper's unweighted eps-MSE; > 0: Min-SNR-gamma loss weights
                                 # (Hang et al. 2023), which down-weight the nearly clean timesteps
    rope_base: float = 100.0     # RoPE frequencies rope_base^(-k/K); a grid is only a few tokens wide, so
                                 # a small base (not LLMs' 10000) keeps most frequencies turning
    attn_backend: str = "auto"   # 'flex' (FlexAttention), 'sdpa' (dense mask), 'auto' (flex on CUDA)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ACDiTConfig: {msg}")

        for name in ("img_size", "in_channels", "n_frames", "patch_size", "block_h", "block_w",
                     "depth", "width", "n_heads", "n_classes", "n_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name}={v!r} must be a positive integer")
        if self.img_size % self.patch_size:
            bad(f"patch_size={self.patch_size} does not divide img_size={self.img_size}; "
                f"pick a divisor of {self.img_size}")
        g = self.grid
        if g % self.block_h or g % self.block_w:
            bad(f"block {self.block_h}x{self.block_w} (patches) does not tile the {g}x{g} patch "
                f"grid (img_size={self.img_size} / patch_size={self.patch_size}); "
                f"block_h and block_w must divide {g}")
        if self.n_frames > 1 and (self.block_h, self.block_w) != (g, g):
            bad(f"a video block is one whole frame: block_h = block_w = {g} (the patch grid), "
                f"got {self.block_h}x{self.block_w}")
        if self.width % self.n_heads:
            bad(f"width={self.width} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 4:
            bad(f"head dim width/n_heads = {self.width}/{self.n_heads} = {self.head_dim} must be "
                f"a multiple of 4: RoPE rotates pairs of dims, as many on the row axis as on the column axis")
        if self.n_frames > 1 and self.head_dim < 6:
            bad(f"head dim {self.head_dim} is too small for video: 3D RoPE needs a pair of dims "
                f"for each of its three axes (frame, row, column); raise width or lower n_heads "
                f"so that width/n_heads >= 8")
        if not 0.0 <= self.label_dropout < 1.0:
            bad(f"label_dropout={self.label_dropout} must be in [0, 1)")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            bad(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not self.min_snr_gamma >= 0.0:
            bad(f"min_snr_gamma={self.min_snr_gamma} must be >= 0 (0 turns the weighting off)")
        if not self.rope_base > 1.0:
            bad(f"rope_base={self.rope_base} must be greater than 1 (RoPE frequencies are rope_base^(-k/K))")
        if not self.mlp_ratio > 0:
            bad(f"mlp_ratio={self.mlp_ratio} must be positive")
        if self.attn_backend not in ("auto", "flex", "sdpa"):
            bad(f"attn_backend={self.attn_backend!r}; choose 'auto', 'flex' or 'sdpa'")

    @property
    def grid(self):        # patches per side
        return self.img_size // self.patch_size

    @property
    def n_blocks(self):    # N (for video: n_frames)
        return self.n_frames * (self.grid // self.block_h) * (self.grid // self.block_w)

    @property
    def block_len(self):   # tokens per block (the paper's B; Bl in the shape comments)
        return self.block_h * self.block_w

    @property
    def patch_dim(self):   # values per token (P)
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def head_dim(self):
        return self.width // self.n_heads

    @property
    def seq_len(self):     # training sequence length (2N-1)*Bl
        return (2 * self.n_blocks - 1) * self.block_len

# -----------------------------------------------------------------------------
# 2. Patchify into blocks
# Tokens are ordered block-major: block 0's tokens (raster order inside the
# block), then block 1's, ... with blocks in raster order over the image.
# A video is patchified frame by frame, and each frame is one block.


def patchify(imgs, cfg):
    """(B, C, H, W) images, or (B, T, C, H, W) videos -> (B, N*Bl, P) tokens, block-major."""
    frame = (cfg.in_channels, cfg.img_size, cfg.img_size)
    want = frame if cfg.n_frames == 1 else (cfg.n_frames, *frame)
    if tuple(imgs.shape[1:]) != want:
        raise ValueError(f"expected {'images' if cfg.n_frames == 1 else 'videos'} of shape (B, "
                         f"{', '.join(map(str, want))}), got {tuple(imgs.shape)}")
    p, bh, bw, g = cfg.patch_size, cfg.block_h, cfg.block_w, cfg.grid
    x = imgs.reshape(imgs.shape[0] * cfg.n_frames, cfg.in_channels, g // bh, bh, p, g // bw, bw, p)
    x = x.permute(0, 2, 5, 3, 6, 4, 7, 1)  # (B*T, blocks down, blocks across, bh, bw, p, p, C): frames fold into B
    return x.reshape(imgs.shape[0], cfg.n_blocks * cfg.block_len, cfg.patch_dim)


def unpatchify(tokens, cfg):
    """Exact inverse of patchify: (B, N*Bl, P) -> (B, C, H, W), or (B, T, C, H, W) for video,
    where T may exceed n_frames (a video sampled past its trained length)."""
    p, bh, bw, C, g = cfg.patch_size, cfg.block_h, cfg.block_w, cfg.in_channels, cfg.grid
    B, T = tokens.shape[0], tokens.shape[1] // (g * g)          # T frames (1 for an image)
    x = tokens.reshape(B * T, g // bh, g // bw, bh, bw, p, p, C)
    x = x.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B*T, C, blocks down, bh, p, blocks across, bw, p)
    frame = (C, cfg.img_size, cfg.img_size)
    return x.reshape(B, *frame) if cfg.n_frames == 1 else x.reshape(B, T, *frame)


def token_coords(cfg, n_tokens=None):
    """Grid coordinates of the first n_tokens tokens (default all N*Bl) in block-major order:
    (row, col) for images, (frame, row, col) for video; (n_tokens, 2 or 3)."""
    idx = torch.arange(cfg.n_blocks * cfg.block_len if n_tokens is None else n_tokens)
    frame, in_frame = idx // cfg.grid ** 2, idx % cfg.grid ** 2  # an image is frame 0 (and has no frame axis)
    blk, j = in_frame // cfg.block_len, in_frame % cfg.block_len  # block id in the frame, position in it
    blocks_per_row = cfg.grid // cfg.block_w
    row = (blk // blocks_per_row) * cfg.block_h + j // cfg.block_w
    col = (blk % blocks_per_row) * cfg.block_w + j % cfg.block_w
    return torch.stack([row, col] if cfg.n_frames == 1 else [frame, row, col], dim=1)

# -----------------------------------------------------------------------------
# 3. SCAM: the Skip-Causal Attention Mask (paper Sec. 3, Fig. 2)
# Training sequence: [c_0 .. c_{N-2} | n_0 .. n_{N-1}], clean blocks then
# noised blocks, length (2N-1)*Bl (the last clean block is never attended, so
# it is dropped). q = query block, k = key block:
#   clean  c_q -> clean  c_k  iff k <= q   (block-causal)
#   noised n_q -> clean  c_k  iff k <  q   (all earlier clean context)
#   noised n_q -> noised n_k  iff k == q   (itself, bidirectional)
# Its clean rows alone are the block-causal mask: the sampler uses them to push
# several clean blocks through the network in one pass (ACDiT.commit).


def scam_mask_mod(n_blocks, block_len):
    """SCAM as a FlexAttention mask_mod(b, h, q_idx, kv_idx) -> True where q may attend to kv."""
    n_clean = (n_blocks - 1) * block_len  # positions before this are clean, from here noised

    def block_of(idx):  # (is_noised, block id) of a sequence position
        noised = idx >= n_clean
        return noised, torch.where(noised, idx - n_clean, idx) // block_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_noised, q_blk = block_of(q_idx)
        k_noised, k_blk = block_of(kv_idx)
        clean_to_clean = ~q_noised & ~k_noised & (k_blk <= q_blk)
        noised_to_clean = q_noised & ~k_noised & (k_blk < q_blk)
        noised_to_self = q_noised & k_noised & (k_blk == q_blk)
        return clean_to_clean | noised_to_clean | noised_to_self

    return mask_mod


def dense_scam_mask(n_blocks, block_len, device=None):
    """SCAM as a dense bool tensor (L, L) for F.scaled_dot_product_attention: True = attend."""
    idx = torch.arange((2 * n_blocks - 1) * block_len, device=device)
    return scam_mask_mod(n_blocks, block_len)(None, None, idx[:, None], idx[None, :])


def flex_scam_mask(n_blocks, block_len, device):
    """SCAM as a FlexAttention BlockMask (skips fully masked 128x128 tiles)."""
    L = (2 * n_blocks - 1) * block_len
    return create_block_mask(scam_mask_mod(n_blocks, block_len), B=None, H=None,
                             Q_LEN=L, KV_LEN=L, device=device)


@torch.compiler.disable  # built eagerly once per shape, never traced by torch.compile
@functools.lru_cache(maxsize=16)
def scam_mask(n_blocks, block_len, device, backend):
    """The training mask for the backend in use, built once and reused every step."""
    make = flex_scam_mask if backend == "flex" else dense_scam_mask
    return make(n_blocks, block_len, device=device)


def print_scam(n_blocks):
    """Print SCAM at block level (rows: queries, columns: keys, '#' = attends), e.g.
    python -c "import acdit; acdit.print_scam(4)"."""
    names = [f"c{i}" for i in range(n_blocks - 1)] + [f"n{i}" for i in range(n_blocks)]
    w = max(len(s) for s in names) + 1
    print(" " * w + " ".join(s.rjust(w - 1) for s in names))
    for name, row in zip(names, dense_scam_mask(n_blocks, 1).tolist()):
        print(name.ljust(w) + " ".join(("#" if a else ".").rjust(w - 1) for a in row))

# -----------------------------------------------------------------------------
# 4. DDPM: the noise schedule, forward noising, and the reverse step


class DDPMSchedule:
    """Linear-beta DDPM schedule (Ho et al. 2020), kept in float64 and cast on use."""

    def __init__(self, n_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        self.n_timesteps = n_timesteps
        betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)
        # alpha-bar_t for t = -1 ('clean', 1.0), 0, ..., T-1
        self.alpha_bar_table = torch.cat([torch.ones(1, dtype=torch.float64),
                                          torch.cumprod(1.0 - betas, dim=0)])

    def alpha_bar(self, t, like):
        """alpha-bar at integer t (tensor or int; -1 = clean) as like's dtype, on like's device."""
        table = self.alpha_bar_table.to(like.dtype).to(like.device)  # cast first: MPS has no float64
        return table[torch.as_tensor(t, device=like.device) + 1]

    def add_noise(self, x0, t, noise):
        """q(x_t | x_0) with one timestep per block. x0, noise: (B, Nn*Bl, P); t: (B, Nn)."""
        B, L, P = x0.shape
        ab = self.alpha_bar(t, x0)[..., None, None]             # (B, Nn, 1, 1)
        xt = ab.sqrt() * x0.view(B, t.shape[1], -1, P) + (1 - ab).sqrt() * noise.view(B, t.shape[1], -1, P)
        return xt.view(B, L, P)

    def sampling_timesteps(self, steps):
        """`steps` evenly strided timesteps from T-1 down to 0."""
        T = self.n_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} must be between 1 and {T}")
        return torch.linspace(T - 1, 0, steps).round().long().tolist()

    def step(self, x, eps, t, t_prev, eta=0.0, generator=None, clip_x0=True, prev=None):
        """One reverse step x_t -> x_{t_prev}; returns (x_prev, x0_pred).

        DDIM (Song et al. 2021) from the predicted x0: eta=0 deterministic, eta=1 DDPM's
        ancestral sampling on the strided schedule. prev=(t_last, x0_last), the previous
        step's prediction in this block, turns it into DPM-Solver++(2M) (Lu et al. 2022):
        the same update from x0 extrapolated linearly in log-SNR (its first order is DDIM)."""
        ab, ab_prev = self.alpha_bar(t, x), self.alpha_bar(t_prev, x)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip_x0:  # pixels live in [-1, 1]
            x0 = x0.clamp(-1, 1)
        d = x0
        if prev is not None and t_prev >= 0:  # the final step (to t = -1) stays first order
            t_last, x0_last = prev
            lam = lambda s: 0.5 * math.log(self.alpha_bar_table[s + 1] / (1 - self.alpha_bar_table[s + 1]))
            r = (lam(t) - lam(t_last)) / (lam(t_prev) - lam(t))  # h_last / h
            d = x0 + (x0 - x0_last) / (2 * r)
        eps = (x - ab.sqrt() * d) / (1 - ab).sqrt()               # the eps consistent with d
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x_prev = ab_prev.sqrt() * d + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator,
                                                  device=x.device, dtype=x.dtype)
        return x_prev, x0

# -----------------------------------------------------------------------------
# 5. The model: DiT with ACDiT's changes


def modulate(x, shift, scale):
    """DiT's adaLN: x * (1 + scale) + shift, one (shift, scale) per block of tokens.
    x: (B, L, D); shift, scale: (B, L // Bl, 1, D)."""
    B, L, D = x.shape
    return (x.view(B, shift.shape[1], -1, D) * (1 + scale) + shift).view(B, L, D)


def gate(x, g):
    """adaLN-Zero's residual gate, one per block like modulate. g: (B, L // Bl, 1, D)."""
    B, L, D = x.shape
    return (x.view(B, g.shape[1], -1, D) * g).view(B, L, D)


class RoPE(nn.Module):
    """Rotary position embedding over the patch grid: 2D (row, column) for images, 3D
    (frame, row, column) for video. The head dim's rotation pairs are shared out among the
    axes as equally as they go (the first axes get any extra: a 32-dim head gives a video
    6, 5, 5), and each axis' slice does its own rotate-half, so q.k depends only on the
    offset between two tokens. Clean and noised copies of a token get the same rotation."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n_axes, n_pairs = (2 if cfg.n_frames == 1 else 3), cfg.head_dim // 2
        self.pairs = [n_pairs // n_axes + (a < n_pairs % n_axes) for a in range(n_axes)]  # per axis
        perm, s = [], 0  # rotate-half as an index: each axis' slice [x1, x2] -> [x2, x1]
        for k in self.pairs:
            perm, s = perm + [*range(s + k, s + 2 * k), *range(s, s + k)], s + 2 * k
        # non-persistent: rebuilt from the config, follow .to(device), not saved
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        self.register_buffer("cos", torch.empty(0, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(0, cfg.head_dim), persistent=False)
        self.grow(cfg.n_blocks * cfg.block_len)

    def grow(self, n_tokens):
        """Make the cos/sin tables (n_tokens, hd) cover n_tokens positions (sampling a video
        past its trained length needs more); computed in float64, rounded to float32."""
        if n_tokens <= len(self.cos):
            return
        coords = token_coords(self.cfg, n_tokens).double()                # (n, axes)
        cos, sin = [], []
        for axis, k in enumerate(self.pairs):
            ang = coords[:, axis:axis + 1] * self.cfg.rope_base ** (-torch.arange(k, dtype=torch.float64) / k)
            cos, sin = cos + [ang.cos(), ang.cos()], sin + [-ang.sin(), ang.sin()]  # rotate-half's signs
        self.cos = torch.cat(cos, dim=-1).float().to(self.cos)
        self.sin = torch.cat(sin, dim=-1).float().to(self.sin)

    def forward(self, pos):
        """(cos, sin, perm) for token positions pos (L,) in block-major order: the arguments
        apply_rope needs after x; cos, sin are (L, hd)."""
        return self.cos[pos], self.sin[pos], self.perm


def apply_rope(x, cos, sin, perm):
    """Rotate x: (B, H, L, hd) by the tables RoPE gave for its L positions."""
    return x * cos.to(x.dtype) + x[..., perm] * sin.to(x.dtype)


_compiled_flex = None  # torch.compile(flex_attention), made on first use on CUDA


def attend(q, k, v, mask):
    """Scaled dot-product attention. The one place the two backends differ:
    a BlockMask runs FlexAttention, a dense bool mask (or None) runs SDPA."""
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    global _compiled_flex
    if torch.compiler.is_compiling():  # inside torch.compile(model): traced and fused already
        return flex_attention(q, k, v, block_mask=mask)
    if q.device.type == "cuda":  # eager flex materializes all scores; compiled is fused
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # off CUDA flex is only a correctness reference
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, block_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)  # QK-norm, for stability at high lr
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)

    def forward(self, x, rope, mask, cache=None, layer=0):
        """x: (B, L, D). With a KVCache, this sequence's keys/values are written after the
        committed blocks' and attention reads them all (no copy)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)                     # (B, H, L, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.extend(layer, k, v)                      # (B, H, Lc + L, hd)
        y = attend(q, k, v, mask)                                 # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ACDiTBlock(nn.Module):
    """Pre-norm transformer block. Noised tokens get adaLN-Zero shift/scale/gate from
    their block's condition; clean tokens get the identity (shift 0, scale 0, gate 1),
    so their K/V depend on neither the timestep nor the label: what makes the KV cache
    exact, and the same for both halves of classifier-free guidance."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))
        identity = torch.zeros(6, cfg.width)
        identity[[2, 5]] = 1.0                                    # the two gates
        self.register_buffer("identity", identity.view(-1), persistent=False)

    def forward(self, x, c, n_clean_blocks, rope, mask, cache=None, layer=0):
        """x: (B, L, D), its first n_clean_blocks blocks clean; c: (B, Nn, D), one condition
        per noised block (Nn = 0 when every block is clean)."""
        B, _, D = x.shape
        noised = self.adaLN_modulation(c)                         # (B, Nn, 6D)
        clean = self.identity.to(noised.dtype).expand(B, n_clean_blocks, 6 * D)
        mod = torch.cat([clean, noised], dim=1).unsqueeze(2)      # (B, blocks, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask, cache, layer)
        x = x + gate(h, gate1)
        return x + gate(self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)


class TimestepEmbedder(nn.Module):
    """Timestep -> vector: sinusoidal features then a 2-layer MLP, as in DiT."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = t[..., None].float() * freqs                       # (..., half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale, linear back to patch values; noised tokens only."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ACDiT(nn.Module):
    """A DiT over [clean | noised] blocks: one SCAM forward in training, a KV cache of the
    clean blocks in sampling."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)
        self.t_embed = TimestepEmbedder(cfg.width)
        self.y_embed = nn.Embedding(cfg.n_classes + 1, cfg.width)  # +1: the null label for CFG
        self.rope = RoPE(cfg)
        self.blocks = nn.ModuleList([ACDiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self.schedule = DDPMSchedule(cfg.n_timesteps, cfg.beta_start, cfg.beta_end)
        self.init_weights()

    def init_weights(self):
        """DiT init: xavier linears, N(0, 0.02) embeddings, adaLN-Zero (zero modulation and
        zero output layer, so every block starts as the identity on noised tokens)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + \
                [self.final.adaLN_modulation[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @property
    def null_label(self):
        return self.cfg.n_classes

    def backend(self, device):
        """Resolve attn_backend: flex on CUDA, the dense-mask SDPA path elsewhere."""
        want = self.cfg.attn_backend
        if want == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        if want == "flex" and device.type != "cuda" and torch.is_grad_enabled():
            raise RuntimeError(f"attn_backend='flex' cannot train on {device.type}: FlexAttention "
                               f"has no backward there. Use attn_backend='sdpa' (or 'auto').")
        return want

    def next_positions(self, cache, n_tokens, device):
        """Positions (n_tokens,) of the tokens that come after the cache's blocks. They count on
        past a slid window (video), so RoPE's tables grow to cover them."""
        start = (cache.dropped + cache.n_blocks) * self.cfg.block_len
        self.rope.grow(start + n_tokens)
        return torch.arange(start, start + n_tokens, device=device)

    def _run(self, tokens, c, n_clean_blocks, pos, mask, cache):
        """Embed tokens (B, L, P) at block-major positions pos (L,) and run the transformer
        stack; the first n_clean_blocks blocks are clean. Returns (B, L, D)."""
        rope = self.rope(pos)
        x = self.patch_embed(tokens)                              # (B, L, D)
        for i, block in enumerate(self.blocks):
            x = block(x, c, n_clean_blocks, rope, mask, cache, i)
        return x

    def forward(self, noised, t, y, clean=None, cache=None):
        """Predict the noise eps of noised blocks, in one of two layouts:
        training:  noised (B, N*Bl, P) every block noised, t (B, N) its timesteps, and
                   clean (B, (N-1)*Bl, P) the clean blocks 0..N-2: one SCAM forward;
        sampling:  noised (B, Bl, P) block i, t (B, 1), and the clean blocks 0..i-1 as
                   their keys/values in `cache`: only block i's tokens run.
        y: (B,) labels (null_label = unconditional). Returns eps shaped like noised."""
        cfg, Bl, B = self.cfg, self.cfg.block_len, noised.shape[0]
        n_noised = 1 if cache is not None else cfg.n_blocks
        if noised.shape[1:] != (n_noised * Bl, cfg.patch_dim) or t.shape != (B, n_noised):
            layout = "sampling with a cache: one block" if cache is not None else "training: all N blocks"
            raise ValueError(f"{layout} noised, so noised {(B, n_noised * Bl, cfg.patch_dim)} and one timestep "
                             f"per noised block {(B, n_noised)}; got {tuple(noised.shape)} and {tuple(t.shape)}")
        c = self.t_embed(t) + self.y_embed(y)[:, None]            # (B, Nn, D) per-block condition
        if cache is not None:  # attend to [cache, own block]: no mask
            x = self._run(noised, c, 0, self.next_positions(cache, Bl, noised.device), None, cache)
            return self.final(x, c)
        n_clean = cfg.n_blocks - 1
        if n_clean and (clean is None or clean.shape != (B, n_clean * Bl, cfg.patch_dim)):
            raise ValueError(f"training needs the clean blocks 0..N-2, {(B, n_clean * Bl, cfg.patch_dim)}, "
                             f"got {None if clean is None else tuple(clean.shape)}")
        tokens = torch.cat([clean, noised], dim=1) if n_clean else noised   # (B, (2N-1)*Bl, P)
        # clean and noised copies of a block share its positions
        pos = torch.cat([torch.arange(n_clean * Bl), torch.arange(cfg.n_blocks * Bl)]).to(noised.device)
        mask = scam_mask(cfg.n_blocks, Bl, noised.device, self.backend(noised.device))
        x = self._run(tokens, c, n_clean, pos, mask, None)
        return self.final(x[:, n_clean * Bl:], c)               # (B, N*Bl, P)

    @torch.no_grad()
    def commit(self, tokens, cache):
        """Push finished clean blocks (B, n*Bl, P) through the unmodulated clean path and
        append their per-layer K/V to the cache. Several blocks go in one pass, block-causal
        among themselves (SCAM's clean rows), attending to the cache as well."""
        Bl, n = self.cfg.block_len, tokens.shape[1] // self.cfg.block_len
        start = cache.n_blocks
        if tokens.shape[1] != n * Bl or start + n > self.cfg.n_blocks - 1:
            raise ValueError(f"cannot commit {tokens.shape[1]} tokens after {start} blocks: "
                             f"whole blocks of {Bl}, and the last block is never committed")
        if n == 0:
            return
        slots = torch.arange(start * Bl, (start + n) * Bl, device=tokens.device)  # where they go in the cache
        mask = None  # one block sees the whole cache and itself
        if n > 1:    # SCAM's clean rows for the new blocks, over every clean block up to them
            kv = torch.arange((start + n) * Bl, device=tokens.device)
            mask = scam_mask_mod(self.cfg.n_blocks, Bl)(None, None, slots[:, None], kv[None, :])
        none = tokens.new_zeros(tokens.shape[0], 0, self.cfg.width)  # no noised blocks: no condition
        self._run(tokens, none, n, self.next_positions(cache, n * Bl, tokens.device), mask, cache)
        cache.n_blocks += n

    def training_loss(self, imgs, labels, weighted=True):
        """DDPM loss with ACDiT's per-block timesteps: imgs (B, C, H, W) (or videos (B, T, C, H, W))
        in [-1, 1], labels (B,).
        weighted=False gives the plain eps-MSE whatever min_snr_gamma is (train.py's eval
        loss, so that runs with and without the weighting compare)."""
        cfg = self.cfg
        x0 = patchify(imgs, cfg)                                  # (B, N*Bl, P)
        B = x0.shape[0]
        t = torch.randint(0, cfg.n_timesteps, (B, cfg.n_blocks), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.schedule.add_noise(x0, t, noise)
        drop = torch.rand(B, device=x0.device) < cfg.label_dropout   # for CFG
        y = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        eps = self(xt, t, y, clean=x0[:, :(cfg.n_blocks - 1) * cfg.block_len])  # c_0..c_{N-2}
        err = (eps.float() - noise.float()).pow(2).view(B, cfg.n_blocks, -1).mean(-1)  # (B, N)
        if cfg.min_snr_gamma == 0 or not weighted:
            return err.mean()
        # Min-SNR-gamma: weight each block's eps-MSE by min(SNR_t, gamma) / SNR_t, so the
        # nearly clean timesteps (high SNR) stop dominating and the noisy ones, where the
        # block's shape and class get decided, get a larger share of the gradient.
        ab = self.schedule.alpha_bar(t, err)                      # (B, N)
        snr = ab / (1 - ab)
        return (snr.clamp(max=cfg.min_snr_gamma) / snr * err).mean()

# -----------------------------------------------------------------------------
# 6. Sampling: block by block, with the KV cache of clean blocks


class KVCache:
    """Per-layer keys/values (after QK-norm and RoPE) of the committed clean blocks, in
    buffers sized for the whole image (or video), allocated on first use and written in place: a
    denoising step writes its block's K/V into the free slot after the committed blocks
    (commit later overwrites it with the clean block's) and attends to a view, no copy."""

    def __init__(self, cfg, rows=None):
        self.rows = rows                    # batch rows of the buffers (default: the first write's)
        self.total_len = cfg.n_blocks * cfg.block_len
        self.block_len = cfg.block_len
        self.n_blocks = 0                   # committed blocks
        self.dropped = 0                    # blocks slid out of the front (video past its length)
        self.k = [None] * cfg.depth         # per layer: (B, H, N*Bl, hd)
        self.v = [None] * cfg.depth

    def extend(self, layer, k, v):
        """Write k, v (B, H, L, hd) after the committed blocks; return layer's keys and values
        up to their end, as views (B, H, n_blocks*Bl + L, hd)."""
        if self.k[layer] is None:
            shape = (self.rows or k.shape[0], k.shape[1], self.total_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        B, start = k.shape[0], self.n_blocks * self.block_len  # B may be fewer rows than the buffer's
        end = start + k.shape[2]
        self.k[layer][:B, :, start:end] = k
        self.v[layer][:B, :, start:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]

    def drop_oldest(self):
        """Slide the window one block on by forgetting the oldest committed block: how a video
        goes past its trained length. The kept keys keep their RoPE rotations and new blocks
        their absolute positions, so every query-key offset stays one seen in training. (In
        layers after the first, the kept keys still carry what they saw of the dropped frames:
        not the same as starting afresh from the last frames as a prefix.)"""
        if self.n_blocks == 0:
            raise ValueError("drop_oldest: the cache holds no committed block to drop")
        end = self.n_blocks * self.block_len
        for buf in self.k + self.v:
            if buf is not None:
                buf[:, :, :end - self.block_len] = buf[:, :, self.block_len:end].clone()
        self.n_blocks, self.dropped = self.n_blocks - 1, self.dropped + 1

    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v if t is not None)


SAMPLERS = {"ddim": 0.0, "ddpm": 1.0, "dpm++": 0.0}  # sampler name -> eta of DDPMSchedule.step


@torch.no_grad()
def sample(model, labels, cfg_scale=2.0, sampler="ddpm", steps=50, generator=None,
           use_cache=True, prefix=None, clip_x0=True, callback=None, cfg_interval=None, n_frames=None):
    """Generate images for `labels` (B,), block by block. Returns (B, C, H, W), or videos
    (B, T, C, H, W), in [-1, 1] when clip_x0 (the default).

    Each block starts as Gaussian noise and is denoised in `steps` strided steps with
    classifier-free guidance (eps_u + cfg_scale * (eps_c - eps_u); 1.0 = no guidance) by
    DDPM, DDIM or DPM-Solver++(2M) (`sampler`). use_cache=True keeps the clean blocks' K/V
    in a KVCache, committed once per block; use_cache=False is the reference: every step
    rebuilds the cache from the clean blocks in one pass. Both draw the same noise from
    `generator` (a torch.Generator on the model's device), so they agree.
    prefix: (B, K*Bl, P) tokens of the first K blocks, given clean (prefix completion): they
    fill the cache in one pass and blocks K..N-1 are generated; they come out unchanged.
    cfg_scale may also be a list or tuple, one scale per block (per-block guidance: block i is
    guided by cfg_scale[i]; a block at 1.0 runs the conditional half alone).
    cfg_interval=(t_lo, t_hi) guides only the steps with t_lo <= t <= t_hi (Kynkaanniemi et al.
    2024); the other steps run the conditional half alone.
    n_frames (video only, default cfg.n_frames): frames to generate; past the trained length
    the cache window slides on (KVCache.drop_oldest), keeping the last cfg.n_frames - 1 frames.
    callback(block, step, clean, x, x0), if given, sees every intermediate state:
    clean (B, i*Bl, P) finished blocks, x the current block's x_t, x0 its predicted x_0."""
    cfg = model.cfg
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; choose one of {list(SAMPLERS)}")
    p = next(model.parameters())
    # the trajectory stays in at least float32 even for a bf16/fp16 model: in half precision
    # alpha-bar rounds to 1 near t = 0 and the update would divide by zero
    dtype = torch.promote_types(p.dtype, torch.float32)
    labels = torch.as_tensor(labels, device=p.device).long().view(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.n_classes):
        raise ValueError(f"labels must be in 0..{cfg.n_classes - 1}, got {labels.tolist()}")
    B, Bl = labels.shape[0], cfg.block_len
    n_total = cfg.n_blocks if n_frames is None else n_frames          # blocks to generate
    if n_frames is not None:
        if cfg.n_frames == 1:
            raise ValueError(f"n_frames={n_frames}: this model makes images (cfg.n_frames=1); n_frames is for video")
        if not isinstance(n_frames, int) or n_frames < 1:
            raise ValueError(f"n_frames={n_frames!r} must be a positive integer")
        if n_frames > cfg.n_frames and not use_cache:
            raise ValueError(f"n_frames={n_frames}: the uncached reference samples at most the trained "
                             f"{cfg.n_frames} frames; past them use use_cache=True (the cache window slides)")
    clean = torch.zeros(B, 0, cfg.patch_dim, device=p.device, dtype=dtype) if prefix is None else \
        prefix.to(p.device, dtype)                                # (B, K*Bl, P)
    most = min(cfg.n_blocks, n_total) - 1                          # a prefix leaves a block to generate
    if clean.ndim != 3 or clean.shape[0] != B or clean.shape[1] % Bl or clean.shape[1] > most * Bl \
            or clean.shape[2] != cfg.patch_dim:
        raise ValueError(f"prefix {tuple(clean.shape)}: expected (B={B}, K*{Bl}, {cfg.patch_dim}) "
                         f"for K <= {most} given blocks")
    if cfg_interval is not None and not (len(cfg_interval) == 2 and 0 <= cfg_interval[0] <= cfg_interval[1]):
        raise ValueError(f"cfg_interval={cfg_interval!r}: expected timesteps (lo, hi) with 0 <= lo <= hi")
    scales = [float(w) for w in cfg_scale] if isinstance(cfg_scale, (list, tuple)) else [float(cfg_scale)] * n_total
    if len(scales) != n_total:
        raise ValueError(f"cfg_scale has {len(scales)} scales; per-block guidance needs one per block ({n_total})")
    ts = model.schedule.sampling_timesteps(steps)
    guided = any(w != 1.0 for w in scales)
    y = torch.cat([labels, torch.full_like(labels, model.null_label)]) if guided else labels

    def rows(x):  # under CFG every pass runs [conditional; unconditional]: 2B rows
        return torch.cat([x, x]).to(p.dtype) if guided else x.to(p.dtype)

    was_training = model.training
    model.eval()
    cache = KVCache(cfg, y.shape[0])
    if use_cache:
        model.commit(rows(clean), cache)                          # the prefix, in one pass
    try:
        for i in range(clean.shape[1] // Bl, n_total):
            x = torch.randn(B, Bl, cfg.patch_dim, generator=generator, device=p.device, dtype=dtype)
            prev = None                                           # DPM-Solver++'s last (t, x0)
            for s, t in enumerate(ts):
                t_prev = ts[s + 1] if s + 1 < len(ts) else -1     # -1: the last step lands on x_0
                if not use_cache:  # the reference: rebuild the cache from scratch every step
                    cache = KVCache(cfg, y.shape[0])
                    model.commit(rows(clean), cache)
                guide = scales[i] != 1.0 and (cfg_interval is None or cfg_interval[0] <= t <= cfg_interval[1])
                n = y.shape[0] if guide else B                    # unguided: the conditional rows only
                tt = torch.full((n, 1), t, device=p.device)
                eps = model(rows(x) if guide else x.to(p.dtype), tt, y[:n], cache=cache).to(dtype)
                if guide:
                    eps_c, eps_u = eps.chunk(2)
                    eps = eps_u + scales[i] * (eps_c - eps_u)
                x, x0 = model.schedule.step(x, eps, t, t_prev, SAMPLERS[sampler], generator,
                                            clip_x0, prev)
                if sampler == "dpm++":
                    prev = (t, x0)
                if callback is not None:
                    callback(i, s, clean, x, x0)
            clean = torch.cat([clean, x], dim=1)                  # (B, (i+1)*Bl, P)
            if use_cache and i < n_total - 1:                     # the last block is never attended
                if cache.n_blocks == cfg.n_blocks - 1:            # full: slide the window on
                    cache.drop_oldest()
                model.commit(rows(x), cache)
    finally:
        model.train(was_training)
    return unpatchify(clean, cfg)
