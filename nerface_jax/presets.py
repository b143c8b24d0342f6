"""The person config presets: every key of a NeRFace avatar's config.

`configs/person.py` re-exports `get_config` and `PRESETS` from here, so the
documented `--config=configs/person.py` (the `paper` preset) and
`--config=configs/person.py:demo` / `:tiny` keep working through
ml_collections' config_flags. Override any key on the command line, e.g.
`--config.data.dir=/data/person_1 --config.train.lr=1e-3`; the config is
locked, so a mistyped key is an error. `config_lib` holds the allowed values
of every key.

Presets:
  paper  the original NeRFace numbers (400k steps of 2048 rays, 64+64 samples,
         two 0.55M-parameter networks). Set `data.dir` to a NeRFace dataset.
  demo   the built-in synthetic person at 64x64, sized so a 2-core CPU
         trains a recognisable avatar in about ten minutes.
  fast   a hash-grid field with occupancy-guided sampling: the demo's quality
         in a fraction of its time; the built-in person at 64x64 unless
         `data.dir` is set (a NeRFace dataset at full resolution).
  tiny   a few seconds end to end; used by the tests.
"""

import ml_collections
from ml_collections import config_dict

PRESETS = ('paper', 'demo', 'fast', 'tiny')


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """Returns the config of `preset` ('paper', 'demo' or 'tiny')."""
  if preset not in PRESETS:
    raise ValueError(
        f'Unknown preset {preset!r} for configs/person.py; choose one of '
        f'{", ".join(PRESETS)} (as --config=configs/person.py:demo).')

  config = ml_collections.ConfigDict()
  config.preset = preset  # Recorded so a saved config says where it came from.

  # --- Data -------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  # A NeRFace dataset folder (transforms_{train,val,test}.json, bg/00050.png).
  # None means the built-in synthetic person, written once into `cache_dir`.
  data.dir = config_dict.placeholder(str)
  data.downscale = 1  # Integer k: H, W, fx and fy are divided by k on load.
  data.near = 0.2  # Ray depth (camera z) where samples start.
  data.far = 0.8  # Ray depth where samples end; the background sits here.
  data.background = 'image'  # 'image': composite bg/00050.png; 'none': no BG.
  # Per-pixel weight of training rays inside the face bbox (1 - it outside).
  data.bbox_weight = 0.9
  data.train_fraction = 1.0  # Train on this prefix (in time) of the frames.
  # Where the built-in person is generated (None: $NERFACE_JAX_CACHE, else
  # ~/.cache/nerface_jax). Generated once per (size, frames, seed).
  data.cache_dir = config_dict.placeholder(str)
  data.synthetic_size = 512  # Built-in person: image side in pixels.
  data.synthetic_frames = 300  # Built-in person: frames over all splits.
  data.synthetic_seed = 0  # Built-in person: seed of trajectory and noise.

  # --- Model ------------------------------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  model.trunk_depth = 6  # Dense+ReLU layers of the density trunk.
  model.trunk_width = 256  # Width of the trunk and of its feature layer.
  model.skip_layer = 3  # The input is concatenated again before this layer.
  model.color_width = 128  # Width of the view-dependent colour branch.
  model.color_depth = 3  # Dense+ReLU layers of the colour branch.
  model.xyz_freqs = 10  # Positional-encoding octaves of the position (63-d).
  model.dir_freqs = 4  # Octaves of the view direction (24-d, no raw input).
  # Length of the expression vector; None takes it from the data (76 in the
  # released NeRFace data, 52 from our preprocessor).
  model.expr_dim = config_dict.placeholder(int)
  # Expressions are multiplied by this. The original used 1/3; 1 scores
  # better on unseen frames, on training frames and in jaw control (two
  # seeds of the built-in person and a real clip, bench/ablations.py).
  model.expr_scale = 1.0
  # 'scale': expression * expr_scale (the original); 'standardize': each
  # coefficient first standardised by its training mean and std.
  model.expr_norm = 'scale'
  model.latent_dim = 32  # Length of the per-frame latent code gamma.
  model.use_expression = True  # False: the "no expression" ablation.
  model.use_latent = True  # False: the paper's "no dyn." ablation.
  model.use_viewdirs = True  # Feed the encoded view direction to colour.
  # 'bfloat16' runs the MLP matmuls in bfloat16 (parameters and quadrature
  # stay float32).
  model.compute_dtype = 'float32'
  # 'mlp': the original positional-encoding MLP; 'hash': a multiresolution
  # hash grid with small MLPs (the `fast` preset), in the data's head box.
  model.field = 'mlp'
  # The hash field (model.field = 'hash'): levels, features per level, rows
  # per hashed level (log2), coarsest and finest cells per axis of the box,
  # and the density MLP (width, hidden layers, feature to the colour MLP,
  # which takes color_width, color_depth and dir_freqs).
  model.hash_levels = 16
  model.hash_features = 2
  model.hash_log2_size = 19
  model.hash_base_resolution = 16
  model.hash_max_resolution = 1024
  model.hash_width = 64
  model.hash_depth = 1
  model.hash_geo_features = 15

  # --- Rendering --------------------------------------------------------------
  render = config.render = ml_collections.ConfigDict()
  render.num_coarse = 64  # Stratified samples per ray (coarse network).
  # Extra inverse-CDF samples per ray (fine network). 0: one level, no coarse
  # network; the fine one evaluates the num_coarse samples (placed by the
  # occupancy grid when there is one, as in Instant-NGP).
  render.num_fine = 64
  render.noise_std = 0.1  # Std of noise on raw density while training.
  render.chunk = 8192  # Rays per jitted call when rendering whole images.
  # An occupancy grid over the head box (the data facts' 'box'), shared by all
  # frames and expressions and refreshed from the field while training: the
  # coarse samples go only where it is occupied, and whole-image rendering
  # skips rays that cross no occupied cell and stops rays once opaque.
  render.occupancy = False
  render.occupancy_resolution = 32  # Cells per axis of the grid.
  # A cell is occupied while sigma * (cell side) of its decayed running max
  # over refreshes (and frames) exceeds this (or the grid's mean, if lower).
  render.occupancy_threshold = 0.01

  # --- Training ---------------------------------------------------------------
  train = config.train = ml_collections.ConfigDict()
  train.batch_rays = 2048  # Global batch: rays per step over all devices.
  train.max_steps = 400_000  # Total optimisation steps.
  # Stop after this much training time in seconds (None: no limit), save a
  # checkpoint and exit 0; a later run with the same workdir resumes.
  train.max_seconds = config_dict.placeholder(float)
  train.lr = 5e-4  # Adam learning rate at step 0.
  # Learning rate of the hash tables (model.field = 'hash'); None: train.lr.
  train.table_lr = config_dict.placeholder(float)
  train.adam_eps = 1e-8  # Adam's epsilon (hash grids want about 1e-15).
  train.warmup_steps = 0  # Linear learning-rate warm-up from 0 (steps).
  train.lr_decay_steps = 250_000  # lr = lr * decay_rate ** (step / steps).
  train.lr_decay_rate = 0.1
  train.latent_reg = 0.005  # Weight of the gamma prior in the loss.
  # 'norm': ||gamma_i||_2 (the original); 'squared': ||gamma_i||_2^2.
  train.latent_prior = 'norm'
  # Probability that a training ray's gamma is replaced by zeros, and the std
  # of Gaussian noise added to gamma while training: both make the network
  # explain with the expression what it can (see bench/ablations.py).
  train.latent_dropout = 0.0
  train.latent_noise = 0.0
  train.seed = 0  # Seeds initialisation, ray sampling and noise.
  train.log_every = 100  # Steps between log rows (metrics.jsonl, TensorBoard).
  train.eval_every = 5000  # Steps between val renders and val PSNR.
  train.checkpoint_every = 5000  # Steps between checkpoints.
  train.keep_checkpoints = 3  # Checkpoints kept on disk.
  # render.occupancy: steps between grid refreshes (each from one random
  # training frame's expression and code), and steps before it culls.
  train.occupancy_every = 16
  train.occupancy_warmup = 256

  # --- Parallelism ------------------------------------------------------------
  parallel = config.parallel = ml_collections.ConfigDict()
  # 'shard_map' (jax.shard_map under jax.jit) or 'pmap'; same numbers.
  parallel.mode = 'shard_map'

  # --- Evaluation -------------------------------------------------------------
  evaluation = config.eval = ml_collections.ConfigDict()
  # Gamma for frames without a trained code (val, test, reenactment):
  # 'fixed' (training frame `latent_frame`, the original's choice), 'zero',
  # 'mean' (mean over training frames) or 'optimize' (fit per frame with the
  # networks frozen). 'mean' scores better than 'fixed' on unseen frames.
  evaluation.latent = 'mean'
  evaluation.latent_frame = 0  # Training frame whose code 'fixed' uses.
  evaluation.preview_frames = 3  # Val frames rendered at every evaluation.
  # eval.latent = 'optimize': Adam steps, rays per frame per step, learning
  # rate, and frames fitted together.
  evaluation.optimize_steps = 200
  evaluation.optimize_rays = 512
  evaluation.optimize_lr = 1e-2
  evaluation.optimize_batch = 8

  if preset == 'demo':
    # About 0.3 s per step on two CPU cores: a recognisable avatar (val PSNR
    # about 30 dB) after 500 steps, the full run in about ten minutes.
    data.synthetic_size = 64
    data.synthetic_frames = 200
    model.trunk_depth = 4
    model.trunk_width = 128
    model.skip_layer = 2
    model.color_width = 64
    model.color_depth = 1
    model.xyz_freqs = 8
    model.latent_dim = 16
    render.num_coarse = 24
    render.num_fine = 24
    render.chunk = 4096
    train.batch_rays = 512
    train.max_steps = 2000
    train.lr = 2e-3
    train.lr_decay_steps = 2000
    train.log_every = 50
    train.eval_every = 250
    train.checkpoint_every = 250
    evaluation.optimize_steps = 100
  elif preset == 'fast':
    # Sized for a 2-core CPU, where the table lookups cost more than the
    # small MLPs: few levels with 4 features each (the cost is per lookup),
    # one level whose samples the occupancy grid alone places (no coarse
    # network: 32 evaluations a ray instead of 24 + 48), on a 64^3 grid. On
    # a GPU raise train.batch_rays (and render.chunk); for 512x512 data a GPU
    # can afford hash_levels = 16, hash_features = 2,
    # hash_max_resolution = 1024, hash_log2_size = 19.
    data.synthetic_size = 64
    data.synthetic_frames = 200
    model.field = 'hash'
    model.hash_levels = 8
    model.hash_features = 4
    model.hash_log2_size = 15
    model.hash_base_resolution = 8
    model.hash_max_resolution = 256
    model.hash_width = 64
    model.hash_depth = 1
    model.color_width = 64
    model.color_depth = 2
    model.latent_dim = 16
    render.num_coarse = 32
    render.num_fine = 0
    # 2,048 rays x 8 samples a rendering pass: about 16k points a call,
    # where a hash-grid call costs least per point on a CPU (twice as many
    # took 1.5x as long per point).
    render.chunk = 2048
    render.occupancy = True
    render.occupancy_resolution = 64
    train.batch_rays = 512
    # About 0.06 s per step here (6,000 steps in 5.7 min, where demo's
    # 2,000 took 8), with the rate decaying over all of it.
    train.max_steps = 6000
    # Twice the rates of a first guess (5e-3, 2e-2): at equal steps +0.4 to
    # +0.9 dB test PSNR over the first two minutes on the built-in person;
    # three and four times as high were no better (bench/README).
    train.lr = 1e-2
    train.table_lr = 4e-2
    train.adam_eps = 1e-15
    train.warmup_steps = 50
    train.lr_decay_steps = 6000
    train.log_every = 50
    train.eval_every = 250
    train.checkpoint_every = 250
    train.occupancy_every = 64
    evaluation.optimize_steps = 100
  elif preset == 'tiny':
    data.synthetic_size = 16
    data.synthetic_frames = 12
    model.trunk_depth = 2
    model.trunk_width = 16
    model.skip_layer = 1
    model.color_width = 8
    model.color_depth = 1
    model.xyz_freqs = 2
    model.dir_freqs = 1
    model.latent_dim = 4
    render.num_coarse = 8
    render.num_fine = 8
    render.chunk = 256
    train.batch_rays = 64
    train.max_steps = 4
    train.lr_decay_steps = 1000
    train.log_every = 1
    train.eval_every = 2
    train.checkpoint_every = 2
    train.keep_checkpoints = 2
    evaluation.preview_frames = 1
    evaluation.optimize_steps = 5
    evaluation.optimize_rays = 16
    evaluation.optimize_batch = 2
  return config
