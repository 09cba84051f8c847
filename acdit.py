"""
ACDiT in one file (Hu et al., "ACDiT: Interpolating Autoregressive Conditional Modeling and
Diffusion Transformer", arXiv 2412.07720). An image is cut into patches (tokens), consecutive
tokens form blocks; blocks are generated one after another (autoregression), the tokens of a
block together by diffusion conditioned on the earlier, clean blocks. A video is the same model
with one block per frame. Read top to bottom: 1. ACDiTConfig, 2. patchify, 3. SCAM (the mask),
4. DDPMSchedule, 5. the model and its loss, 6. KVCache and sample(). This file trusts its
caller (the scripts check user input) and states its invariants as asserts.
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
    noise_schedule: str = "linear"  # alpha-bar over t: DDPM's 'linear' betas (the paper's) or 'cosine'
    min_snr_gamma: float = 0.0   # 0: the paper's unweighted eps-MSE; > 0: Min-SNR-gamma weights
    prediction: str = "eps"      # the network outputs the noise ('eps', as DDPM and the paper) or the
                                 # clean tokens ('x0': easier when a token holds many pixels)
    rope_base: float = 100.0     # RoPE frequencies rope_base^(-k/K); a grid only a few tokens wide
                                 # wants a small base (not LLMs' 10000) to keep them all turning
    attn_backend: str = "auto"   # 'flex' (FlexAttention), 'sdpa' (dense mask), 'auto' (flex on CUDA)

    def __post_init__(self):  # the derived sizes (dataclasses.replace derives them anew), then the invariants
        self.grid = self.img_size // self.patch_size              # patches per side
        self.block_len = self.block_h * self.block_w              # tokens per block (the paper's B; Bl in shapes)
        self.n_blocks = self.n_frames * (self.grid // self.block_h) * (self.grid // self.block_w)  # N (video: n_frames)
        self.patch_dim = self.patch_size ** 2 * self.in_channels  # values per token (P)
        self.head_dim = self.width // self.n_heads
        self.n_axes = 2 if self.n_frames == 1 else 3              # RoPE's axes: (row, col), or (frame, row, col)
        self.seq_len = (2 * self.n_blocks - 1) * self.block_len   # the training sequence, (2N-1)*Bl
        assert self.img_size % self.patch_size == 0, f"patch_size={self.patch_size} must divide img_size={self.img_size}"
        assert self.grid % self.block_h == 0 and self.grid % self.block_w == 0, \
            f"block_h={self.block_h} and block_w={self.block_w} must divide the {self.grid}x{self.grid} patch grid"
        assert self.n_frames == 1 or self.block_h == self.block_w == self.grid, \
            f"a video block is one whole frame: block_h = block_w = {self.grid} (the patch grid)"
        assert self.prediction == "eps" or self.min_snr_gamma > 0, "x0 prediction wants Min-SNR weights"
        assert self.width % self.n_heads == 0 and self.head_dim % 2 == 0 and self.head_dim >= 2 * self.n_axes, \
            f"width={self.width} / n_heads={self.n_heads} must be an even head dim of at least {2 * self.n_axes}"

# -----------------------------------------------------------------------------
# 2. Patchify into blocks
# Tokens are ordered block-major: block 0's tokens (raster order inside the block), then
# block 1's, ... with blocks in raster order over the image. A video is patchified frame by
# frame, and each frame is one block.


def patchify(imgs, config):
    """(B, C, H, W) images -> (B, N*Bl, P) tokens, block-major; for a video model, (B, T, C, H, W)
    videos of any length T -> (B, T*Bl, P), a block per frame."""
    p, bh, bw, g, C = config.patch_size, config.block_h, config.block_w, config.grid, config.in_channels
    assert imgs.shape[-3:] == (C, config.img_size, config.img_size) and imgs.ndim == (4 if config.n_frames == 1 else 5)
    x = imgs.reshape(-1, C, g // bh, bh, p, g // bw, bw, p)     # (B*T, C, blocks down, bh, p, ...)
    x = x.permute(0, 2, 5, 3, 6, 4, 7, 1)  # (B*T, blocks down, blocks across, bh, bw, p, p, C)
    return x.reshape(imgs.shape[0], -1, config.patch_dim)


def unpatchify(tokens, config):
    """Inverse of patchify: (B, N*Bl, P) -> (B, C, H, W), or (B, T, C, H, W) for video, where
    T may exceed n_frames (a video sampled past its trained length)."""
    p, bh, bw, g, C = config.patch_size, config.block_h, config.block_w, config.grid, config.in_channels
    B, T = tokens.shape[0], tokens.shape[1] // (g * g)          # T frames (1 for an image)
    x = tokens.reshape(B * T, g // bh, g // bw, bh, bw, p, p, C)
    x = x.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B*T, C, blocks down, bh, p, blocks across, bw, p)
    frame = (C, config.img_size, config.img_size)
    return x.reshape(B, *frame) if config.n_frames == 1 else x.reshape(B, T, *frame)


def token_coords(config, pos):
    """Grid coordinates of block-major token positions pos (L,): (L, 2) (row, col) for images,
    (L, 3) (frame, row, col) for video. Past the trained length the frame counts on."""
    frame, in_frame = pos // config.grid ** 2, pos % config.grid ** 2
    blk, j = in_frame // config.block_len, in_frame % config.block_len  # block in the frame, place in it
    blocks_per_row = config.grid // config.block_w
    row = (blk // blocks_per_row) * config.block_h + j // config.block_w
    col = (blk % blocks_per_row) * config.block_w + j % config.block_w
    return torch.stack([row, col] if config.n_frames == 1 else [frame, row, col], dim=1)

# -----------------------------------------------------------------------------
# 3. SCAM: the Skip-Causal Attention Mask (paper Sec. 3, Fig. 2)
# Training sequence: [c_0 .. c_{N-2} | n_0 .. n_{N-1}], clean blocks then noised blocks,
# length (2N-1)*Bl (the last clean block is never attended, so it is dropped). q = query block, k = key block:
#   clean  c_q -> clean  c_k  iff k <= q   (block-causal)
#   noised n_q -> clean  c_k  iff k <  q   (all earlier clean context)
#   noised n_q -> noised n_k  iff k == q   (itself, bidirectional)
# Its clean rows alone are the block-causal mask: the sampler uses them to push several
# clean blocks through the network in one pass (ACDiT.commit).


def scam_mask_mod(n_blocks, block_len):
    """SCAM as a FlexAttention mask_mod(b, h, q_idx, kv_idx) -> True where q may attend to kv."""
    clean_len = (n_blocks - 1) * block_len  # positions before this are clean, from here noised

    def block_of(idx):  # (is_noised, block id) of a sequence position
        noised = idx >= clean_len
        return noised, torch.where(noised, idx - clean_len, idx) // block_len

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


@torch.compiler.disable  # built eagerly once per shape, never traced by torch.compile
@functools.lru_cache(maxsize=16)
def scam_mask(n_blocks, block_len, device, backend):
    """The training mask, built once and reused every step: for 'flex' a FlexAttention BlockMask
    (which skips fully masked 128x128 tiles), else the dense mask."""
    if backend != "flex":
        return dense_scam_mask(n_blocks, block_len, device)
    L = (2 * n_blocks - 1) * block_len
    return create_block_mask(scam_mask_mod(n_blocks, block_len), None, None, L, L, device=device)


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
    """DDPM's linear betas (Ho et al. 2020) or 'cosine' (Nichol & Dhariwal 2021); float64, cast on use."""

    def __init__(self, n_timesteps=1000, beta_start=1e-4, beta_end=0.02, kind="linear"):
        self.n_timesteps = n_timesteps
        betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)
        if kind == "cosine":  # alpha-bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008
            f = torch.cos((torch.arange(n_timesteps + 1, dtype=torch.float64) / n_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)         # the cap keeps the last step finite
        self.alpha_bar_table = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, dim=0)])

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
        assert 1 <= steps <= self.n_timesteps
        return torch.linspace(self.n_timesteps - 1, 0, steps).round().long().tolist()

    def step(self, x, eps, t, t_prev, eta=0.0, generator=None, clip_x0=True, prev=None):
        """One reverse step x_t -> x_{t_prev}; returns (x_prev, x0_pred). DDIM (Song et al. 2021)
        from the predicted x0: eta=0 deterministic, eta=1 DDPM's ancestral step. prev=(t_last,
        x0_last), this block's previous prediction, makes it DPM-Solver++(2M) (Lu et al. 2022):
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
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_prev, x0


SAMPLERS = {"ddim": 0.0, "ddpm": 1.0, "dpm++": 0.0}  # sampler name -> eta of DDPMSchedule.step

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


def rope(config, pos):
    """Rotary position embedding (RoPE) for block-major token positions pos (L,): 2D (row,
    column) for images, 3D (frame, row, column) for video. The head dim's rotation pairs are
    shared out among the axes as equally as they go (the first axes get any extra), and each
    axis' slice [x1, x2] does its own rotate-half, so q.k depends only on the offset between
    two tokens. Returns what apply_rope needs: cos, sin (L, hd) and the rotate-half index."""
    coords = token_coords(config, pos).float()                   # (L, axes)
    n_pairs = config.head_dim // 2
    cos, sin, perm = [], [], []
    for axis in range(config.n_axes):
        k, s = n_pairs // config.n_axes + (axis < n_pairs % config.n_axes), len(perm)  # k pairs from dim s
        ang = coords[:, axis:axis + 1] * config.rope_base ** (-torch.arange(k, device=pos.device) / k)
        cos, sin = cos + [ang.cos(), ang.cos()], sin + [-ang.sin(), ang.sin()]
        perm += [*range(s + k, s + 2 * k), *range(s, s + k)]     # [x1, x2] -> [x2, x1]
    return torch.cat(cos, -1), torch.cat(sin, -1), torch.tensor(perm, device=pos.device)


def apply_rope(x, cos, sin, perm):
    """Rotate x: (B, H, L, hd) by the tables rope() gave for its L positions."""
    return x * cos.to(x.dtype) + x[..., perm] * sin.to(x.dtype)


def attend(q, k, v, mask):
    """Scaled dot-product attention, the one place the two backends differ: a BlockMask runs
    FlexAttention, a dense bool mask (or None) runs SDPA."""
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if torch.compiler.is_compiling():  # inside torch.compile(model): traced and fused already
        if q.device.type == "cpu":  # torch's CPU kernel drops the offset of a lone view: V gets its own buffer
            v = v.contiguous()      # (a real copy: V is a permuted slice of the fused qkv)
        return flex_attention(q, k, v, block_mask=mask)
    if q.device.type != "cuda":  # off CUDA flex is only a correctness reference: run it eagerly, quietly
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, block_mask=mask)
    return compiled_flex()(q, k, v, block_mask=mask)            # eager flex is slow on CUDA


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)  # QK-norm, for stability at high lr
        self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)

    def forward(self, x, rotation, mask, cache=None, layer=0):
        """x: (B, L, D). With a KVCache, attention reads the cached blocks' keys/values and
        this sequence's own, written after them."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)                     # (B, H, L, hd)
        q, k = apply_rope(q, *rotation), apply_rope(k, *rotation)
        if cache is not None:
            k, v = cache.cat(layer, k, v)                         # (B, H, Lc + L, hd)
        y = attend(q, k, v, mask)                                 # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.fc1 = nn.Linear(config.width, hidden)
        self.fc2 = nn.Linear(hidden, config.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ACDiTBlock(nn.Module):
    """Pre-norm transformer block. Noised tokens get adaLN-Zero shift/scale/gate from their
    block's condition; clean tokens get the identity (shift 0, scale 0, gate 1), so their K/V
    depend on neither the timestep nor the label: what makes the KV cache exact, and the same
    for both halves of classifier-free guidance."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(config)
        self.norm2 = nn.RMSNorm(config.width, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(config)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.width, 6 * config.width))
        identity = torch.zeros(6, config.width)
        identity[[2, 5]] = 1.0                                    # the two gates
        self.register_buffer("identity", identity.view(-1), persistent=False)

    def forward(self, x, cond, n_clean_blocks, rotation, mask, cache=None, layer=0):
        """x: (B, L, D), its first n_clean_blocks blocks clean; cond: (B, Nn, D), one
        condition per noised block (Nn = 0 when every block is clean)."""
        B, _, D = x.shape
        noised_mod = self.adaLN_modulation(cond)                  # (B, Nn, 6D)
        clean_mod = self.identity.to(noised_mod.dtype).expand(B, n_clean_blocks, 6 * D)
        mod = torch.cat([clean_mod, noised_mod], dim=1).unsqueeze(2)  # (B, blocks, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate(self.attn(modulate(self.norm1(x), shift1, scale1), rotation, mask, cache, layer), gate1)
        return x + gate(self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)


class TimestepEmbedder(nn.Module):
    """Timestep -> vector: sinusoidal features then a 2-layer MLP, as in DiT."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        # the sinusoid in the weights' dtype (at least float32: bf16 cannot hold t * freq)
        dtype = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = t[..., None].to(dtype) * freqs                     # (..., half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale, linear back to patch values; noised tokens only."""

    def __init__(self, config):
        super().__init__()
        self.norm = nn.RMSNorm(config.width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.width, 2 * config.width))
        self.linear = nn.Linear(config.width, config.patch_dim)

    def forward(self, x, cond):
        shift, scale = self.adaLN_modulation(cond).unsqueeze(2).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ACDiT(nn.Module):
    """A DiT over [clean | noised] blocks: one SCAM forward in training (forward), a KV cache
    of the clean blocks in sampling (denoise_block and commit)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.width)
        self.t_embed = TimestepEmbedder(config.width)
        self.y_embed = nn.Embedding(config.n_classes + 1, config.width)  # +1: the null label for CFG
        self.blocks = nn.ModuleList([ACDiTBlock(config) for _ in range(config.depth)])
        self.final = FinalLayer(config)
        self.schedule = DDPMSchedule(config.n_timesteps, config.beta_start, config.beta_end, config.noise_schedule)
        self.null_label = config.n_classes
        self.init_weights()

    def init_weights(self):
        """DiT init: xavier linears, N(0, 0.02) embeddings, adaLN-Zero (zero modulation and a
        zero output layer, so every block starts as the identity on noised tokens)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final.adaLN_modulation[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def backend(self, device):
        """attn_backend resolved: 'auto' is flex on CUDA and the dense-mask SDPA path elsewhere
        (FlexAttention has no backward off CUDA)."""
        if self.config.attn_backend == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return self.config.attn_backend

    def condition(self, t, y):
        """Per-block condition: timestep embedding + label embedding. t: (B, Nn), y: (B,)."""
        return self.t_embed(t) + self.y_embed(y)[:, None]        # (B, Nn, D)

    def run(self, tokens, cond, n_clean_blocks, pos, mask, cache=None):
        """Embed tokens (B, L, P) at positions pos (L,) and run the transformer stack; the first
        n_clean_blocks blocks are clean. Returns (B, L, D)."""
        rotation = rope(self.config, pos)
        x = self.patch_embed(tokens)                              # (B, L, D)
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, n_clean_blocks, rotation, mask, cache, layer)
        return x

    def forward(self, noised, t, y, clean=None):
        """Training: eps for every block in one SCAM pass over [clean | noised].
        noised (B, N*Bl, P) all N blocks, each at its timestep t (B, N); clean (B, (N-1)*Bl, P)
        the clean blocks 0..N-2 (None when N = 1); y (B,) labels. Returns (B, N*Bl, P)."""
        config, Bl = self.config, self.config.block_len
        n_clean_blocks = config.n_blocks - 1
        assert noised.shape[1] == config.n_blocks * Bl and t.shape[1] == config.n_blocks
        tokens = torch.cat([clean, noised], dim=1) if n_clean_blocks else noised      # (B, (2N-1)*Bl, P)
        # clean and noised copies of a block share its positions
        pos = torch.cat([torch.arange(n_clean_blocks * Bl), torch.arange(config.n_blocks * Bl)]).to(noised.device)
        mask = scam_mask(config.n_blocks, Bl, noised.device, self.backend(noised.device))
        cond = self.condition(t, y)
        x = self.run(tokens, cond, n_clean_blocks, pos, mask)
        return self.as_eps(self.final(x[:, n_clean_blocks * Bl:], cond), noised, t)  # (B, N*Bl, P)

    def denoise_block(self, x, t, y, cache):
        """Sampling: eps for the next block x (B, Bl, P) at timestep t (B, 1), attending to
        the clean blocks' keys/values in cache and to itself (no mask)."""
        cond = self.condition(t, y)
        h = self.run(x, cond, 0, cache.positions(x.shape[1], x.device), None, cache)
        return self.as_eps(self.final(h, cond), x, t)             # (B, Bl, P)

    def as_eps(self, out, xt, t):
        """The network's output as eps: itself, or with prediction='x0' the eps that x_t and the
        predicted clean tokens imply (Li & He 2025: high-dimensional tokens are easier to predict
        clean than as noise). out, xt: (B, Nn*Bl, P); t: (B, Nn)."""
        if self.config.prediction == "eps":
            return out
        B, L, P = out.shape
        dtype = torch.promote_types(out.dtype, torch.float32)     # near t = 0 this divides by 0.01
        x0, xt = out.to(dtype).view(B, t.shape[1], -1, P), xt.to(dtype).view(B, t.shape[1], -1, P)
        ab = self.schedule.alpha_bar(t, x0)[..., None, None]      # (B, Nn, 1, 1)
        return ((xt - ab.sqrt() * x0) / (1 - ab).sqrt()).view(B, L, P)

    @torch.no_grad()
    def commit(self, tokens, cache):
        """Push finished clean blocks (B, n*Bl, P) through the unmodulated clean path and keep
        their per-layer K/V in the cache. Several blocks go in one pass, block-causal among
        themselves (SCAM's clean rows), attending to the cache as well."""
        Bl, n = self.config.block_len, tokens.shape[1] // self.config.block_len
        assert tokens.shape[1] == n * Bl and cache.n_cached + n <= cache.capacity
        if n == 0:
            return
        mask = None  # one block sees the whole cache and itself
        if n > 1:    # SCAM's clean rows for the new blocks, over every clean block up to them
            slots = torch.arange(cache.n_cached * Bl, (cache.n_cached + n) * Bl, device=tokens.device)
            kv = torch.arange((cache.n_cached + n) * Bl, device=tokens.device)
            mask = scam_mask_mod(self.config.n_blocks, Bl)(None, None, slots[:, None], kv[None, :])
        no_cond = tokens.new_zeros(tokens.shape[0], 0, self.config.width)  # no noised blocks
        self.run(tokens, no_cond, n, cache.positions(n * Bl, tokens.device), mask, cache)
        cache.keep(n)

    def training_loss(self, imgs, labels, weighted=True):
        """DDPM loss with ACDiT's per-block timesteps: imgs (B, C, H, W) (or videos (B, T, C, H, W))
        in [-1, 1], labels (B,). weighted=False gives the plain eps-MSE whatever min_snr_gamma is
        (train.py's eval loss, so that runs with and without the weighting compare)."""
        config = self.config
        x0 = patchify(imgs, config)                               # (B, N*Bl, P)
        B = x0.shape[0]
        t = torch.randint(0, config.n_timesteps, (B, config.n_blocks), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.schedule.add_noise(x0, t, noise)
        drop = torch.rand(B, device=x0.device) < config.label_dropout   # for CFG
        y = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        eps = self(xt, t, y, clean=x0[:, :(config.n_blocks - 1) * config.block_len])  # c_0..c_{N-2}
        err = (eps.float() - noise.float()).pow(2).view(B, config.n_blocks, -1).mean(-1)  # (B, N)
        if config.min_snr_gamma == 0 or not weighted:
            return err.mean()
        # Min-SNR-gamma (Hang et al. 2023): weight each block's eps-MSE by min(SNR_t, gamma) / SNR_t,
        # so the nearly clean timesteps stop dominating and the noisy ones, where a block's shape
        # and class get decided, get a larger share of the gradient
        snr = (ab := self.schedule.alpha_bar(t, err)) / (1 - ab)  # (B, N)
        return (snr.clamp(max=config.min_snr_gamma) / snr * err).mean()

# -----------------------------------------------------------------------------
# 6. Sampling: block by block, with the KV cache of clean blocks


class KVCache:
    """Per-layer keys/values (after QK-norm and RoPE) of the committed clean blocks, and their
    positions. The buffers hold N blocks, written in place: a denoising step writes its block's
    K/V after the committed ones (cat) and attends to a view; commit overwrites that slot."""

    def __init__(self, config):
        self.block_len = config.block_len
        self.capacity = config.n_blocks - 1  # committed blocks at most: the last block is never attended
        self.n_cached = 0                    # committed blocks held
        self.dropped = 0                     # blocks slid out of the front (video past its length)
        self.k, self.v = [None] * config.depth, [None] * config.depth   # per layer: (B, H, N*Bl, hd)

    def positions(self, n_tokens, device):
        """Positions (n_tokens,) of the tokens after the held blocks; past a slid window they
        count on, so a new frame's offset to every kept frame is one seen in training."""
        start = (self.dropped + self.n_cached) * self.block_len
        return torch.arange(start, start + n_tokens, device=device)

    def cat(self, layer, k, v):
        """Layer's held keys/values followed by k, v (B, H, L, hd), written after them in place:
        views (B, H, n_cached*Bl + L, hd). They stay only once keep() counts them."""
        if self.k[layer] is None:  # allocated on first use, in k's batch size, dtype and device
            shape = (k.shape[0], k.shape[1], (self.capacity + 1) * self.block_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        start = self.n_cached * self.block_len
        end = start + k.shape[2]
        self.k[layer][:, :, start:end], self.v[layer][:, :, start:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep(self, n):
        """Count the n blocks just written by cat() as committed."""
        self.n_cached += n

    def drop_oldest(self):
        """Forget the oldest block: how a video goes past its trained length. Kept keys keep their
        RoPE rotations and new blocks count positions on, so every query-key offset is one seen in
        training. (Past the first layer kept keys still carry what they saw of the dropped frames.)"""
        assert self.n_cached > 0
        end, Bl = self.n_cached * self.block_len, self.block_len
        for buf in self.k + self.v:
            buf[:, :, :end - Bl] = buf[:, :, Bl:end].clone()
        self.n_cached, self.dropped = self.n_cached - 1, self.dropped + 1


@torch.no_grad()
def sample(model, labels, cfg_scale=2.0, sampler="ddpm", steps=50, generator=None, use_cache=True,
           prefix=None, n_frames=None, callback=None):
    """Generate images (B, C, H, W), or videos (B, T, C, H, W), in [-1, 1] for labels (B,), block
    by block. Each block starts as noise and takes `steps` strided steps of DDPM, DDIM or
    DPM-Solver++(2M) (`sampler`) with classifier-free guidance eps_u + cfg_scale * (eps_c - eps_u)
    (1.0 = none). use_cache=False is the reference: every step rebuilds the KV cache from the clean
    blocks. Both draw the same noise from `generator`, so they agree. prefix (B, K*Bl, P): the
    first K blocks, given clean (prefix completion). n_frames (video): frames to make; past the
    trained length the cache window slides on (KVCache.drop_oldest). callback(block, step, clean,
    x, x0) sees every step: the finished blocks, the current x_t and its predicted x_0."""
    config, Bl = model.config, model.config.block_len
    weight = next(model.parameters())
    # the trajectory stays in at least float32 even for a bf16/fp16 model: in half precision
    # alpha-bar rounds to 1 near t = 0 and the update would divide by zero
    dtype = torch.promote_types(weight.dtype, torch.float32)
    labels = torch.as_tensor(labels, device=weight.device).long().view(-1)
    B, n_total = len(labels), n_frames or config.n_blocks           # blocks to generate
    clean = torch.zeros(B, 0, config.patch_dim) if prefix is None else prefix   # (B, K*Bl, P)
    clean = clean.to(weight.device, dtype)
    assert use_cache or n_total <= config.n_blocks, "past the trained length only with the cache"
    assert clean.shape[1] % Bl == 0 and clean.shape[1] < min(n_total, config.n_blocks) * Bl
    guided = cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_label)]) if guided else labels

    def rows(x):  # under guidance every pass runs [conditional; unconditional]: 2B rows
        return (torch.cat([x, x]) if guided else x).to(weight.dtype)

    def cache_of(blocks):  # a cache holding the clean blocks, filled in one pass
        cache = KVCache(config)
        model.commit(rows(blocks), cache)
        return cache

    cache = cache_of(clean) if use_cache else None
    ts = model.schedule.sampling_timesteps(steps)
    for i in range(clean.shape[1] // Bl, n_total):
        x = torch.randn(B, Bl, config.patch_dim, generator=generator, device=weight.device, dtype=dtype)
        prev = None                                               # DPM-Solver++'s last (t, x0)
        for s, t in enumerate(ts):
            t_prev = ts[s + 1] if s + 1 < len(ts) else -1         # -1: the last step lands on x_0
            if not use_cache:  # the reference: rebuild the cache from scratch every step
                cache = cache_of(clean)
            eps = model.denoise_block(rows(x), torch.full((len(y), 1), t, device=x.device), y, cache).to(dtype)
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            x, x0 = model.schedule.step(x, eps, t, t_prev, SAMPLERS[sampler], generator, prev=prev)
            prev = (t, x0) if sampler == "dpm++" else None
            if callback is not None:
                callback(i, s, clean, x, x0)
        clean = torch.cat([clean, x], dim=1)                      # (B, (i+1)*Bl, P)
        if use_cache and i < n_total - 1:                         # the last block is never attended
            if cache.n_cached == cache.capacity:                  # full: slide the window on
                cache.drop_oldest()
            model.commit(rows(x), cache)
    return unpatchify(clean, config)
