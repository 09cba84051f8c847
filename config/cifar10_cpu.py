# CIFAR-10 in an hour on 2 CPU cores: a 4x160 model (2.0M parameters, so its float16 weights fit in
# weights/) on 8x8 tokens of 4x4 pixels, a block a row of 8 tokens (an image is 8 blocks, top to
# bottom), mirrored batches. RESULTS.md has the search.
#   python train.py config/cifar10_cpu.py --data_dir=path/to/cifar10
#   python train.py config/cifar10_cpu.py --dataset=folder --data_dir=path/to/images   # class folders
dataset = 'cifar10'
out_dir = 'out-cifar10-cpu'

depth = 4
width = 160
n_heads = 5         # head dim 32

time_budget = 60.0  # minutes from launch to exit; sets max_iters after timing warm steps
ema_decay = 0.9995  # a longer average for a longer run
sample_interval = 10000
cfg_scale = 3.0     # the grids (and evaluate.py's 'auto'): photos need more guidance than digits
