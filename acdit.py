"""
ACDiT in one file: an autoregressive blockwise conditional diffusion transformer.

Hu et al., "ACDiT: Interpolating Autoregressive Conditional Modeling and
Diffusion Transformer" (arXiv 2412.07720). An image is cut into patches
(tokens); consecutive tokens form blocks. Blocks are generated one after
another (autoregression), and the tokens of one block are generated together by
a diffusion process conditioned on all earlier, already clean blocks.

Read top to bottom:
  1. ACDiTConfig          the knobs, checked up front
  2. patchify/unpatchify  image <-> tokens in block-major order
  3. SCAM                 the Skip-Causal Attention Mask, FlexAttention + dense
  4. the model            a DiT with 2D RoPE, RMSNorm, QK-norm and adaLN-Zero
                          on noised tokens only
  5. DDPMSchedule         noise schedule, training noise, sampler updates
  6. KVCache + sample()   block-by-block generation, cached and uncached
"""

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention arrived in torch 2.5; without it the dense-mask path still works
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    HAS_FLEX = True
except ImportError:
    HAS_FLEX = False
    BlockMask = ()  # so isinstance(x, BlockMask) is simply False

ATTN_BACKENDS = ("auto", "flex", "sdpa")

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ACDiTConfig:
    img_size: int = 28           # square images, pixels per side
    in_channels: int = 1
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
    attn_backend: str = "auto"   # 'flex' (FlexAttention), 'sdpa' (dense mask), 'auto'

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ACDiTConfig: {msg}")

        for name in ("img_size", "in_channels", "patch_size", "block_h", "block_w",
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
        if self.width % self.n_heads:
            bad(f"width={self.width} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 4:
            bad(f"head dim width/n_heads = {self.width}/{self.n_heads} = {self.head_dim} must be "
                f"a multiple of 4: 2D RoPE rotates pairs of dims on each of the two axes")
        if not 0.0 <= self.label_dropout < 1.0:
            bad(f"label_dropout={self.label_dropout} must be in [0, 1)")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            bad(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not self.min_snr_gamma >= 0.0:
            bad(f"min_snr_gamma={self.min_snr_gamma} must be >= 0 (0 turns the weighting off)")
        if not self.rope_base > 1.0:
            bad(f"rope_base={self.rope_base} must be greater than 1 (RoPE frequencies are rope_base^(-k/K))")
        if self.mlp_ratio <= 0:
            bad(f"mlp_ratio={self.mlp_ratio} must be positive")
        if self.attn_backend not in ATTN_BACKENDS:
            bad(f"attn_backend={self.attn_backend!r}; choose one of {ATTN_BACKENDS}")
        if self.attn_backend == "flex" and not HAS_FLEX:
            bad(f"attn_backend='flex' needs torch >= 2.5 (this is {torch.__version__}); use 'sdpa'")

    @property
    def grid(self):        # patches per side
        return self.img_size // self.patch_size

    @property
    def n_blocks(self):    # N
        return (self.grid // self.block_h) * (self.grid // self.block_w)

    @property
    def block_len(self):   # tokens per block (the paper's B)
        return self.block_h * self.block_w

    @property
    def patch_dim(self):   # values per token
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def head_dim(self):
        return self.width // self.n_heads

    @property
    def seq_len(self):     # training sequence length (2N-1)*B
        return (2 * self.n_blocks - 1) * self.block_len

# -----------------------------------------------------------------------------
# 2. Patchify into blocks
# Tokens are ordered block-major: block 0's tokens (raster order inside the
# block), then block 1's, ... with blocks in raster order over the image.


def patchify(imgs, cfg):
    """(B, C, H, W) images -> (B, N*Bl, p*p*C) tokens in block-major order."""
    B, C, H, W = imgs.shape
    if (C, H, W) != (cfg.in_channels, cfg.img_size, cfg.img_size):
        raise ValueError(f"expected images of shape (B, {cfg.in_channels}, {cfg.img_size}, "
                         f"{cfg.img_size}), got {tuple(imgs.shape)}")
    p, bh, bw = cfg.patch_size, cfg.block_h, cfg.block_w
    nby, nbx = cfg.grid // bh, cfg.grid // bw
    x = imgs.reshape(B, C, nby, bh, p, nbx, bw, p)
    x = x.permute(0, 2, 5, 3, 6, 4, 7, 1)  # (B, nby, nbx, bh, bw, p, p, C)
    return x.reshape(B, cfg.n_blocks * cfg.block_len, cfg.patch_dim)


def unpatchify(tokens, cfg):
    """Exact inverse of patchify: (B, N*Bl, p*p*C) -> (B, C, H, W)."""
    B = tokens.shape[0]
    p, bh, bw, C = cfg.patch_size, cfg.block_h, cfg.block_w, cfg.in_channels
    nby, nbx = cfg.grid // bh, cfg.grid // bw
    x = tokens.reshape(B, nby, nbx, bh, bw, p, p, C)
    x = x.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B, C, nby, bh, p, nbx, bw, p)
    return x.reshape(B, C, cfg.img_size, cfg.img_size)


def token_coords(cfg):
    """(row, col) of every token's patch in the patch grid, in block-major order: (N*Bl, 2)."""
    idx = torch.arange(cfg.n_blocks * cfg.block_len)
    blk, j = idx // cfg.block_len, idx % cfg.block_len      # block id, position inside the block
    blocks_per_row = cfg.grid // cfg.block_w
    row = (blk // blocks_per_row) * cfg.block_h + j // cfg.block_w
    col = (blk % blocks_per_row) * cfg.block_w + j % cfg.block_w
    return torch.stack([row, col], dim=1)


# -----------------------------------------------------------------------------
# 3. SCAM: the Skip-Causal Attention Mask (paper Sec. 3, Fig. 2)
# Training sequence: [c_0 .. c_{N-2} | n_0 .. n_{N-1}], clean blocks then
# noised blocks, length (2N-1)*Bl (the last clean block is never attended, so
# it is dropped). q = query block, k = key block:
#   clean  c_q -> clean  c_k  iff k <= q   (block-causal)
#   noised n_q -> clean  c_k  iff k <  q   (all earlier clean context)
#   noised n_q -> noised n_k  iff k == q   (itself, bidirectional)
# The uncached sampler reuses the same rule on a shorter layout: the clean
# prefix c_0..c_{i-1} and only the noised block n_i. `noised_from` says which
# block the first noised token belongs to (0 in training).


def scam_mask_mod(n_blocks, block_len, noised_from=0):
    """SCAM as a FlexAttention mask_mod(b, h, q_idx, kv_idx) -> True where q may attend to kv."""
    n_clean = (n_blocks - 1) * block_len  # tokens before the first noised token

    def block_of(idx):  # (is_noised, block id) of a sequence position
        noised = idx >= n_clean
        blk = torch.where(noised, (idx - n_clean) // block_len + noised_from, idx // block_len)
        return noised, blk

    def mask_mod(b, h, q_idx, kv_idx):
        q_noised, q_blk = block_of(q_idx)
        k_noised, k_blk = block_of(kv_idx)
        clean_to_clean = ~q_noised & ~k_noised & (k_blk <= q_blk)
        noised_to_clean = q_noised & ~k_noised & (k_blk < q_blk)
        noised_to_self = q_noised & k_noised & (k_blk == q_blk)
        return clean_to_clean | noised_to_clean | noised_to_self

    return mask_mod


def scam_len(n_blocks, block_len, noised_from=0):
    """Sequence length of the SCAM layout: n_blocks-1 clean blocks + the noised blocks."""
    if not 0 <= noised_from < n_blocks:
        raise ValueError(f"noised_from={noised_from} must be in [0, n_blocks={n_blocks})")
    return (2 * n_blocks - 1 - noised_from) * block_len


def dense_scam_mask(n_blocks, block_len, device=None, noised_from=0):
    """SCAM as a dense bool tensor (L, L) for F.scaled_dot_product_attention: True = attend."""
    L = scam_len(n_blocks, block_len, noised_from)
    idx = torch.arange(L, device=device)
    return scam_mask_mod(n_blocks, block_len, noised_from)(None, None, idx[:, None], idx[None, :])


def flex_scam_mask(n_blocks, block_len, device, noised_from=0):
    """SCAM as a FlexAttention BlockMask (skips fully masked 128x128 tiles)."""
    if not HAS_FLEX:
        raise RuntimeError(f"FlexAttention needs torch >= 2.5 (this is {torch.__version__})")
    L = scam_len(n_blocks, block_len, noised_from)
    return create_block_mask(scam_mask_mod(n_blocks, block_len, noised_from),
                             B=None, H=None, Q_LEN=L, KV_LEN=L, device=device)


@torch.compiler.disable  # built eagerly and cached, never traced by torch.compile
@functools.lru_cache(maxsize=64)
def cached_scam_mask(n_blocks, block_len, noised_from, device, backend):
    """The mask for one layout, built once per (shape, device, backend) and reused every step."""
    make = flex_scam_mask if backend == "flex" else dense_scam_mask
    return make(n_blocks, block_len, device=device, noised_from=noised_from)


def scam_text(n_blocks):
    """SCAM at block level as text: rows are queries, columns keys, '#' = attends."""
    names = [f"c{i}" for i in range(n_blocks - 1)] + [f"n{i}" for i in range(n_blocks)]
    m = dense_scam_mask(n_blocks, 1)
    w = max(len(s) for s in names) + 1
    lines = [" " * w + " ".join(s.rjust(w - 1) for s in names)]
    for name, row in zip(names, m.tolist()):
        lines.append(name.ljust(w) + " ".join(("#" if a else ".").rjust(w - 1) for a in row))
    return "\n".join(lines)


def print_scam(n_blocks):
    """Print the block-level SCAM picture: python -c "import acdit; acdit.print_scam(4)"."""
    print(scam_text(n_blocks))

# -----------------------------------------------------------------------------
# 4. The model: DiT with ACDiT's changes


def modulate(x, shift, scale):
    """DiT's adaLN: x * (1 + scale) + shift, with one (shift, scale) per block of tokens.
    x: (B, L, D); shift, scale: (B, L // Bl, 1, D), or None for no modulation at all."""
    if shift is None:
        return x
    B, L, D = x.shape
    return (x.view(B, shift.shape[1], -1, D) * (1 + scale) + shift).view(B, L, D)


def gated(x, g):
    """adaLN-Zero's residual gate, one per block like modulate. g: (B, L // Bl, 1, D) or None."""
    if g is None:
        return x
    B, L, D = x.shape
    return (x.view(B, g.shape[1], -1, D) * g).view(B, L, D)


def rotate_halves(x):
    """Rotate-half inside each axis' half of the head dim: [r1, r2, c1, c2] -> [r2, r1, c2, c1]
    (the minus signs of rotate-half live in RoPE2D's sin table)."""
    *lead, hd = x.shape
    return x.reshape(*lead, 2, 2, hd // 4).flip(-2).reshape(*lead, hd)


class RoPE2D(nn.Module):
    """2D rotary position embedding: half of each head's dims rotate with the patch row,
    half with the patch column (proper per-axis rotate-half, so q.k depends only on the
    2D offset). Clean and noised copies of a token get the same rotation."""

    def __init__(self, cfg):
        super().__init__()
        quarter = cfg.head_dim // 4  # rotation frequencies per axis
        freqs = cfg.rope_base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        coords = token_coords(cfg).double()                       # (N*Bl, 2)
        ang_r = coords[:, :1] * freqs                             # (N*Bl, hd/4)
        ang_c = coords[:, 1:] * freqs
        cos = torch.cat([ang_r.cos(), ang_r.cos(), ang_c.cos(), ang_c.cos()], dim=-1)
        sin = torch.cat([-ang_r.sin(), ang_r.sin(), -ang_c.sin(), ang_c.sin()], dim=-1)
        # (N*Bl, hd) each; non-persistent: rebuilt from the config, follow .to(device), not saved
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def forward(self, pos):
        """cos, sin tables (L, hd) for token positions pos (L,) in block-major order."""
        return self.cos[pos], self.sin[pos]


def apply_rope(x, cos, sin):
    """x: (B, H, L, hd); cos, sin: (L, hd) from RoPE2D. Dim i of each axis' half is paired
    with dim i + hd/4 and the pair is rotated by that axis' angle."""
    return x * cos.to(x.dtype) + rotate_halves(x) * sin.to(x.dtype)


_compiled_flex = None  # torch.compile(flex_attention), made on first use on CUDA


def attend(q, k, v, mask):
    """Scaled dot-product attention. The one place the two backends differ:
    a BlockMask runs FlexAttention, a dense bool mask (or None) runs SDPA."""
    if isinstance(mask, BlockMask):
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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)  # QK-norm, for stability at high lr
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)

    def forward(self, x, cos, sin, mask, past_kv=None):
        """x: (B, L, D). past_kv: cached (k, v) of earlier clean tokens, prepended to this
        sequence's own keys/values. Returns the output and this sequence's (k, v)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)                     # (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)                 # (B, H, Lc + L, hd)
            v = torch.cat([past_kv[1], v], dim=2)
        y = attend(q, k, v, mask)                                 # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D)), new_kv


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
    their block's condition; clean tokens get none, so their K/V depend on neither the
    timestep nor the label (what makes the KV cache exact and shareable under CFG)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def adaln_params(self, c, n_clean_blocks):
        """adaLN-Zero (shift1, scale1, gate1, shift2, scale2, gate2), each (B, blocks, 1, D),
        for every block of the sequence: from the condition c (B, Nn, D) for noised blocks,
        and the identity (shift 0, scale 0, gate 1) for clean blocks, which stay unmodulated."""
        if c is None:  # an all-clean sequence (the sampler's commit pass)
            return (None,) * 6
        mod = self.adaLN_modulation(c)                            # (B, Nn, 6D)
        if n_clean_blocks:
            identity = torch.zeros(6, c.shape[-1], device=c.device, dtype=mod.dtype)
            identity[[2, 5]] = 1.0                                # the two gates
            identity = identity.view(1, 1, -1).expand(c.shape[0], n_clean_blocks, -1)
            mod = torch.cat([identity, mod], dim=1)               # (B, blocks, 6D)
        return mod.unsqueeze(2).chunk(6, dim=-1)

    def forward(self, x, c, n_clean_blocks, cos, sin, mask, past_kv=None):
        """x: (B, L, D), its first n_clean_blocks blocks clean. c: (B, Nn, D) per noised block."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln_params(c, n_clean_blocks)
        h, kv = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, mask, past_kv)
        x = x + gated(h, gate1)
        x = x + gated(self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)
        return x, kv


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
        self.rope = RoPE2D(cfg)
        self.blocks = nn.ModuleList([ACDiTBlock(cfg) for _ in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self.schedule = DDPMSchedule(cfg.n_timesteps, cfg.beta_start, cfg.beta_end)  # section 5
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
            return "flex" if device.type == "cuda" and HAS_FLEX else "sdpa"
        if want == "flex" and device.type != "cuda" and torch.is_grad_enabled():
            raise RuntimeError(f"attn_backend='flex' cannot train on {device.type}: FlexAttention "
                               f"has no backward there. Use attn_backend='sdpa' (or 'auto').")
        return want

    def _run(self, x, c, n_clean_blocks, pos, mask, kv_cache):
        """The transformer stack over embedded tokens x (B, L, D) whose first n_clean_blocks
        blocks are clean. Returns the final hidden states and each layer's new (k, v)
        (kept only by the sampler's commit pass)."""
        cos, sin = self.rope(pos)
        new_kvs = []
        for i, block in enumerate(self.blocks):
            past = kv_cache.layer(i, x.shape[0]) if kv_cache is not None else None
            x, kv = block(x, c, n_clean_blocks, cos, sin, mask, past)
            new_kvs.append(kv)
        return x, new_kvs

    def forward(self, noised, t, y, clean=None, kv_cache=None):
        """Predict the noise eps in the noised blocks.

        noised: (B, Nn*Bl, P) the last Nn of i+1 blocks, noised; t: (B, Nn) their timesteps;
        y: (B,) labels (null_label = unconditional). The i earlier blocks are clean context,
        given either as tokens `clean` (B, i*Bl, P) -> one SCAM forward (training, and the
        uncached sampler), or as cached keys/values `kv_cache` (the cached sampler).
        Training calls it with i = N-1 and Nn = N. Returns eps: (B, Nn*Bl, P)."""
        cfg, Bl = self.cfg, self.cfg.block_len
        if clean is not None and kv_cache is not None:
            raise ValueError("give the clean context as tokens or as a KV cache, not both")
        n_ctx = kv_cache.n_blocks if kv_cache is not None else \
            (clean.shape[1] // Bl if clean is not None else 0)
        n_noised = noised.shape[1] // Bl
        first = n_ctx + 1 - n_noised                             # block id of the first noised block
        if noised.shape[1] % Bl or n_noised < 1 or (clean is not None and clean.shape[1] % Bl):
            raise ValueError(f"noised {tuple(noised.shape)} / clean tokens must be whole blocks of {Bl}")
        if first < 0 or n_ctx >= cfg.n_blocks:
            raise ValueError(f"{n_noised} noised blocks do not fit after {n_ctx} clean blocks "
                             f"(N={cfg.n_blocks}): pass N-1 clean blocks with N noised ones, "
                             f"or i clean blocks with one noised block")
        if kv_cache is not None and n_noised != 1:
            raise ValueError("with a KV cache, denoise one block at a time (no mask is applied)")
        if t.shape != (noised.shape[0], n_noised):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected one timestep per noised "
                             f"block: {(noised.shape[0], n_noised)}")
        device = noised.device
        pos = torch.arange(first * Bl, (n_ctx + 1) * Bl, device=device)
        x = self.patch_embed(noised)                              # (B, Nn*Bl, D)
        mask, n_clean_blocks = None, 0  # with a cache: attend to [cache, own block], no mask
        if clean is not None and n_ctx > 0:
            x = torch.cat([self.patch_embed(clean), x], dim=1)    # (B, L, D)
            pos = torch.cat([torch.arange(n_ctx * Bl, device=device), pos])
            n_clean_blocks = n_ctx
            mask = cached_scam_mask(n_ctx + 1, Bl, first, device, self.backend(device))
        c = self.t_embed(t) + self.y_embed(y)[:, None]           # (B, Nn, D) per-block condition
        x, _ = self._run(x, c, n_clean_blocks, pos, mask, kv_cache)
        return self.final(x[:, n_clean_blocks * Bl:], c)          # (B, Nn*Bl, P)

    @torch.no_grad()
    def commit(self, block_tokens, kv_cache):
        """The sampler's commit pass: run finished clean block i (B, Bl, P) through the
        unmodulated clean path, attending to the cache and itself, and append its
        per-layer K/V to the cache."""
        i, Bl = kv_cache.n_blocks, self.cfg.block_len
        pos = torch.arange(i * Bl, (i + 1) * Bl, device=block_tokens.device)
        x = self.patch_embed(block_tokens)                       # (B, Bl, D)
        _, kvs = self._run(x, None, 1, pos, None, kv_cache)      # c=None: nothing is modulated
        kv_cache.append(kvs)

    def training_loss(self, imgs, labels, weighted=True):
        """DDPM loss with ACDiT's per-block timesteps: imgs (B, C, H, W) in [-1, 1], labels (B,).
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
        clean = x0[:, :(cfg.n_blocks - 1) * cfg.block_len]       # c_0..c_{N-2}
        eps = self(xt, t, y, clean=clean)
        if cfg.min_snr_gamma == 0 or not weighted:
            return F.mse_loss(eps.float(), noise.float())
        # Min-SNR-gamma: weight each block's eps-MSE by min(SNR_t, gamma) / SNR_t, so the
        # nearly clean timesteps (high SNR) stop dominating and the noisy ones, where the
        # block's shape and class get decided, get a larger share of the gradient.
        ab = self.schedule.alpha_bar(t, noise).float()             # (B, N)
        snr = ab / (1 - ab)
        w = snr.clamp(max=cfg.min_snr_gamma) / snr                 # (B, N), 1 for noisy t
        err = (eps.float() - noise.float()).pow(2).view(B, cfg.n_blocks, -1).mean(-1)  # (B, N)
        return (w * err).mean()

# -----------------------------------------------------------------------------
# 5. DDPM: schedule, forward noising, and the reverse update


class DDPMSchedule:
    """Linear-beta DDPM schedule (Ho et al. 2020), kept in float64 and cast on use."""

    def __init__(self, n_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        self.n_timesteps = n_timesteps
        betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)         # alpha-bar_t, t = 0..T-1
        self.alpha_bar_table = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])

    def alpha_bar(self, t, like):
        """alpha-bar at integer t (tensor or int; t = -1 means 'clean', alpha-bar = 1),
        as like's dtype on like's device."""
        table = self.alpha_bar_table.to(like.dtype).to(like.device)  # cast first: MPS has no float64
        return table[torch.as_tensor(t, device=like.device) + 1]

    def add_noise(self, x0, t, noise):
        """q(x_t | x_0) with one timestep per block. x0, noise: (B, Nn*Bl, P); t: (B, Nn)."""
        B, L, P = x0.shape
        ab = self.alpha_bar(t, x0)[..., None, None]          # (B, Nn, 1, 1)
        x0b, nb = x0.view(B, t.shape[1], -1, P), noise.view(B, t.shape[1], -1, P)
        return (ab.sqrt() * x0b + (1 - ab).sqrt() * nb).view(B, L, P)

    def sampling_timesteps(self, steps):
        """`steps` evenly strided timesteps from T-1 down to 0."""
        T = self.n_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} must be between 1 and {T}")
        return torch.linspace(T - 1, 0, steps).round().long().tolist()

    def step(self, x, eps, t, t_prev, eta, generator=None, clip_x0=True):
        """One reverse step x_t -> x_{t_prev} (DDIM, Song et al. 2021). eta=0: deterministic
        DDIM; eta=1: DDPM ancestral sampling on the strided schedule. Returns (x_prev, x0_pred)."""
        ab, ab_prev = self.alpha_bar(t, x), self.alpha_bar(t_prev, x)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip_x0:  # pixels live in [-1, 1]; re-derive eps so x0 and eps stay consistent
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator,
                                                  device=x.device, dtype=x.dtype)
        return x_prev, x0

# -----------------------------------------------------------------------------
# 6. Sampling: block by block, with the KV cache of clean blocks


class KVCache:
    """Per-layer keys/values (after QK-norm and RoPE) of the committed clean blocks.
    Clean tokens carry no timestep or label, so under classifier-free guidance the
    conditional and unconditional halves read the same cache."""

    def __init__(self, block_len):
        self.block_len = block_len
        self.kv = None  # list over layers of (k, v), each (B, H, n_blocks*Bl, hd)

    @property
    def n_blocks(self):
        return 0 if self.kv is None else self.kv[0][0].shape[2] // self.block_len

    def layer(self, i, batch):
        """Layer i's cached (k, v) for a batch of `batch` rows (the cache's rows repeated
        for CFG's doubled batch), or None when empty."""
        if self.kv is None:
            return None
        k, v = self.kv[i]
        if batch != k.shape[0]:
            if batch % k.shape[0]:
                raise ValueError(f"batch {batch} is not a multiple of the cache's {k.shape[0]} rows")
            reps = batch // k.shape[0]
            k, v = k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1)
        return k, v

    def append(self, kvs):
        if self.kv is None:
            self.kv = list(kvs)
        else:
            self.kv = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                       for (k0, v0), (k, v) in zip(self.kv, kvs)]

    def nbytes(self):
        return 0 if self.kv is None else sum(k.nbytes + v.nbytes for k, v in self.kv)


SAMPLERS = {"ddim": 0.0, "ddpm": 1.0}  # sampler name -> DDIM eta


@torch.no_grad()
def sample(model, labels, cfg_scale=1.5, sampler="ddim", steps=50, generator=None,
           use_cache=True, clip_x0=True, callback=None):
    """Generate images for `labels` (B,), block by block. Returns (B, C, H, W), in [-1, 1]
    when clip_x0 (the default).

    Each block starts as Gaussian noise and is denoised in `steps` strided steps with
    classifier-free guidance (eps_u + cfg_scale * (eps_c - eps_u); 1.0 = no guidance).
    use_cache=True keeps the clean blocks' K/V in a KVCache (each step runs Bl tokens);
    use_cache=False is the reference: every step reruns the SCAM forward over the whole
    clean prefix. Both draw the same noise from `generator` (a torch.Generator on the
    model's device), so they agree.
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
    ts = model.schedule.sampling_timesteps(steps)
    B, Bl, guided = labels.shape[0], cfg.block_len, cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_label)]) if guided else labels
    rows = 2 * B if guided else B                                 # CFG: [conditional; unconditional]
    was_training = model.training
    model.eval()
    cache = KVCache(Bl) if use_cache else None
    clean = torch.zeros(B, 0, cfg.patch_dim, device=p.device, dtype=dtype)
    try:
        for i in range(cfg.n_blocks):
            x = torch.randn(B, Bl, cfg.patch_dim, generator=generator, device=p.device, dtype=dtype)
            for s, t in enumerate(ts):
                t_prev = ts[s + 1] if s + 1 < len(ts) else -1     # -1: the last step lands on x_0
                xin = x.repeat(rows // B, 1, 1).to(p.dtype)       # (rows, Bl, P)
                tt = torch.full((rows, 1), t, device=p.device)
                if use_cache:
                    eps = model(xin, tt, y, kv_cache=cache)
                else:
                    eps = model(xin, tt, y, clean=clean.repeat(rows // B, 1, 1).to(p.dtype))
                eps = eps.to(dtype)
                if guided:
                    eps_c, eps_u = eps.chunk(2)
                    eps = eps_u + cfg_scale * (eps_c - eps_u)
                x, x0 = model.schedule.step(x, eps, t, t_prev, SAMPLERS[sampler], generator, clip_x0)
                if callback is not None:
                    callback(i, s, clean, x, x0)
            clean = torch.cat([clean, x], dim=1)                  # (B, (i+1)*Bl, P)
            if use_cache and i < cfg.n_blocks - 1:               # the last block is never attended
                model.commit(x.to(p.dtype), cache)
    finally:
        model.train(was_training)
    return unpatchify(clean, cfg)
