# CIFAR-10 in an hour on 2 CPU cores: a 4x192 model (2.85M parameters; its float16 weights, 5.7 MB,
# ship in weights/) on 8x8 tokens of 4x4 pixels, a block a row of 8 tokens (an image is 8 blocks,
# top to bottom), mirrored batches. RESULTS.md has the search.
#   python train.py config/cifar10_cpu.py --data_dir=path/to/cifar10
#   python train.py config/cifar10_cpu.py --dataset=folder --data_dir=path/to/images   # class folders
dataset = 'cifar10'
out_dir = 'out-cifar10-cpu'

depth = 4
width = 192
n_heads = 6         # head dim 32
noise_schedule = 'cosine'  # beat DDPM's linear betas by 9 points in 15 minutes: fewer steps near pure noise
prediction = 'x0'   # the clean tokens: FID 2 lower than predicting the noise, accuracy level

time_budget = 60.0  # minutes from launch to exit; sets max_iters after timing warm steps
ema_decay = 0.9995  # a longer average for a longer run (0.9999 read 2.4 points lower in the hour)
sample_interval = 10000
cfg_scale = 3.0     # the grids (and evaluate.py's 'auto'): photos need more guidance than digits
