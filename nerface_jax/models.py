"""The NeRFace networks: conditioned fields, the latent table and the model.

This is the only Flax file of the package. It owns the parameters and calls
the pure functions of `encoding`, `sampling` and `rendering`.

Every Dense layer is initialised like PyTorch's `nn.Linear` (kernel and bias
uniform in +-1/sqrt(fan_in)), as the original NeRFace code was.
"""

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nerface_jax import config_lib
from nerface_jax import encoding
from nerface_jax import hashgrid
from nerface_jax import occupancy
from nerface_jax import rendering
from nerface_jax import sampling
from nerface_jax import types

Dtype = Any

# Keyed by config_lib.CHOICES['model.compute_dtype'] and ['data.background'].
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_BACKGROUNDS = {'image': True, 'none': False}


def _uniform_init(fan_in: int):
  """Initialiser drawing uniformly in +-1/sqrt(fan_in) (PyTorch nn.Linear)."""
  # The bias cannot infer its fan-in from its own shape, so both kernel and
  # bias take it explicitly from the layer's full concatenated input width.
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _SplitDense(nn.Module):
  """A Dense layer over [per-sample x ++ per-ray c ++ per-sample h].

  Holds ONE kernel [Dx + C + Dh, features] (parameter count and initialisation
  of a plain concatenation) but applies the per-ray rows once per ray:
  y = x @ K_x + h @ K_h + (c @ K_c + b)[:, None], exactly the concatenation
  without broadcasting c over the samples.

  Attributes:
    features: output width.
    dtype: compute dtype of the matmuls (parameters stay float32).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: Optional[jax.Array] = None,
               h: Optional[jax.Array] = None) -> jax.Array:
    """Applies the layer.

    Args:
      x: [R, S, Dx] per-sample input (any float dtype).
      c: optional [R, C] per-ray input (C may be 0).
      h: optional [R, S, Dh] second per-sample input (the skip connection).

    Returns:
      `dtype` [R, S, features] pre-activation.
    """
    dx = x.shape[-1]
    dc = 0 if c is None else c.shape[-1]
    dh = 0 if h is None else h.shape[-1]
    fan_in = dx + dc + dh
    kernel = self.param('kernel', _uniform_init(fan_in),
                        (fan_in, self.features), jnp.float32)
    bias = self.param('bias', _uniform_init(fan_in), (self.features,),
                      jnp.float32)
    # Cast at use: float32 master parameters, matmuls in the compute dtype.
    kernel = kernel.astype(self.dtype)
    bias = bias.astype(self.dtype)
    # The per-sample matmuls run on [R*S, D] matrices: with a batch dimension
    # left in, XLA's CPU backend transposes the activations for every weight
    # gradient (about a fifth of the training step in the profile).
    lead = x.shape[:-1]
    y = _flat(x, self.dtype) @ kernel[:dx]
    if h is not None:
      y = y + _flat(h, self.dtype) @ kernel[dx + dc:]
    y = y.reshape(*lead, self.features)
    per_ray = bias
    if c is not None:
      # [R, features], computed once per ray and broadcast over the samples.
      per_ray = c.astype(self.dtype) @ kernel[dx:dx + dc] + bias
      per_ray = per_ray[..., None, :]
    return y + per_ray


def _flat(a: jax.Array, dtype: Dtype) -> jax.Array:
  """[..., D] -> [prod(...), D] in `dtype`."""
  return a.astype(dtype).reshape(-1, a.shape[-1])


def _check_field_inputs(positions: jax.Array, condition: jax.Array,
                        viewdirs: jax.Array):
  """Raises ValueError unless positions [R, S, 3], condition [R, C] and
  viewdirs [R, 3] agree (the inputs of every field)."""
  if positions.ndim != 3 or positions.shape[-1] != 3:
    raise ValueError(
        f'positions: expected shape [R, S, 3], got {positions.shape}.')
  if condition.ndim != 2 or condition.shape[0] != positions.shape[0]:
    raise ValueError(
        f'condition: expected shape [R, C] with R = {positions.shape[0]}, '
        f'got {condition.shape}.')
  if viewdirs.shape != (positions.shape[0], 3):
    raise ValueError(
        f'viewdirs: expected shape [R, 3] = {(positions.shape[0], 3)}, got '
        f'{viewdirs.shape}.')


def _color_branch(feature: jax.Array, viewdirs: jax.Array, width: int,
                  depth: int, dir_freqs: int, use_viewdirs: bool,
                  dtype: Dtype) -> jax.Array:
  """The colour branch of both fields, called inside their compact method.

  Its layers (color_0 .. color_{depth-1}, rgb) are created in the calling
  module, so the parameter names are the calling field's own.

  Args:
    feature: [R, S, D] per-sample feature.
    viewdirs: float32 [R, 3] unit view directions (ignored without
      `use_viewdirs`).
    width, depth: Dense+ReLU layers of the branch (depth >= 1).
    dir_freqs: octaves of the view direction (without raw input).
    use_viewdirs: feed PE(view direction) to the first layer.
    dtype: compute dtype of the matmuls.

  Returns:
    float32 [R, S, 3] colour in (0, 1).
  """
  if use_viewdirs:
    # The direction is per ray too, so it takes the per-ray path.
    d = encoding.positional_encoding(viewdirs.astype(jnp.float32), dir_freqs,
                                     include_input=False)
    h = _SplitDense(width, dtype, name='color_0')(feature, d)
  else:
    h = _SplitDense(width, dtype, name='color_0')(feature)
  h = nn.relu(h)
  for i in range(1, depth):
    h = nn.relu(_SplitDense(width, dtype, name=f'color_{i}')(h))
  logits = _SplitDense(3, dtype, name='rgb')(h)
  # The sigmoid in float32 keeps colours near 0 and 1 distinguishable.
  return jax.nn.sigmoid(logits.astype(jnp.float32))


class ConditionedMLP(nn.Module):
  """The NeRFace radiance field: position + per-ray condition -> rgb, density.

  Trunk: `trunk_depth` Dense(trunk_width) + ReLU on PE(xyz) ++ condition, the
  input concatenated again before layer `skip_layer`; a feature Dense without
  activation; the density head on the feature; the colour branch on the
  feature ++ PE(view direction) (without the raw direction).

  Attributes:
    trunk_depth: Dense+ReLU layers of the trunk.
    trunk_width: width of the trunk and of the feature layer.
    skip_layer: index of the trunk layer the input is concatenated before
      (0 or >= trunk_depth: no skip connection).
    color_width: width of the colour branch.
    color_depth: Dense+ReLU layers of the colour branch (at least 1).
    xyz_freqs: positional-encoding octaves of the position (with raw input).
    dir_freqs: octaves of the view direction (without raw input).
    use_viewdirs: feed the encoded view direction to the colour branch.
    compute_dtype: dtype of the matmuls (float32 or bfloat16); parameters and
      outputs stay float32.
  """
  trunk_depth: int = 6
  trunk_width: int = 256
  skip_layer: int = 3
  color_width: int = 128
  color_depth: int = 3
  xyz_freqs: int = 10
  dir_freqs: int = 4
  use_viewdirs: bool = True
  compute_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array, condition: jax.Array,
               viewdirs: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Evaluates the field at every sample.

    Args:
      positions: float32 [R, S, 3] sample positions.
      condition: float32 [R, C] per-ray conditioning (C may be 0).
      viewdirs: float32 [R, 3] unit view directions (ignored without
        `use_viewdirs`).

    Returns:
      rgb: float32 [R, S, 3] colour in (0, 1).
      raw_density: float32 [R, S] density before the activation.
    """
    _check_field_inputs(positions, condition, viewdirs)
    dt = self.compute_dtype
    # Encode in float32: sin(2^9 x) in bfloat16 would lose the phase.
    x = encoding.positional_encoding(positions.astype(jnp.float32),
                                     self.xyz_freqs, include_input=True)
    x = x.astype(dt)
    h = x
    for i in range(self.trunk_depth):
      if i == 0:
        h = _SplitDense(self.trunk_width, dt, name=f'trunk_{i}')(x, condition)
      elif i == self.skip_layer:
        # Kernel rows ordered [PE(x), condition, h] as a plain concatenation.
        h = _SplitDense(self.trunk_width, dt, name=f'trunk_{i}')(
            x, condition, h)
      else:
        h = _SplitDense(self.trunk_width, dt, name=f'trunk_{i}')(h)
      h = nn.relu(h)
    feature = _SplitDense(self.trunk_width, dt, name='feature')(h)
    raw_density = _SplitDense(1, dt, name='density')(feature)[..., 0]

    rgb = _color_branch(feature, viewdirs, self.color_width, self.color_depth,
                        self.dir_freqs, self.use_viewdirs, dt)
    return rgb, raw_density.astype(jnp.float32)


class HashField(nn.Module):
  """A hash-grid radiance field conditioned per ray (`model.field = 'hash'`).

  The position goes through a multiresolution hash encoding (`hashgrid`,
  tables float32 whatever the compute dtype); a small density MLP takes the
  encoding ++ the per-ray condition (expression and gamma, applied once per
  ray as in ConditionedMLP) and gives the raw density and a geometry feature;
  a small colour MLP takes the feature ++ PE(view direction). Outside the
  grid's box the density is zero: the encoding there would repeat the box's
  faces.

  Attributes:
    grid: the hash grid's static description (hashgrid.GridSpec).
    features: features per level C.
    box_min, box_max: the grid's box in world coordinates (3 floats each).
    width: width of the density MLP.
    depth: hidden Dense+ReLU layers of the density MLP (at least 1).
    geo_features: width of the feature passed to the colour MLP.
    color_width, color_depth: the colour MLP (Dense+ReLU layers, >= 1).
    dir_freqs: octaves of the view direction (without raw input).
    use_viewdirs: feed the encoded view direction to the colour MLP.
    compute_dtype: dtype of the MLP matmuls.
  """
  grid: hashgrid.GridSpec
  box_min: Tuple[float, float, float]
  box_max: Tuple[float, float, float]
  features: int = 2
  width: int = 64
  depth: int = 1
  geo_features: int = 15
  color_width: int = 64
  color_depth: int = 2
  dir_freqs: int = 4
  use_viewdirs: bool = True
  compute_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array, condition: jax.Array,
               viewdirs: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Evaluates the field at every sample (shapes as ConditionedMLP).

    Args:
      positions: float32 [R, S, 3] sample positions.
      condition: float32 [R, C] per-ray conditioning (C may be 0).
      viewdirs: float32 [R, 3] unit view directions.

    Returns:
      rgb: float32 [R, S, 3] colour in (0, 1).
      raw_density: float32 [R, S] density before the activation; -1e4
        (zero density after any noise) outside the box.
    """
    _check_field_inputs(positions, condition, viewdirs)
    dt = self.compute_dtype
    grid = self.grid
    tables = self.param(
        'tables',
        lambda key: hashgrid.init_tables(key, grid.num_levels, self.features,
                                         grid.sizes))
    unit = hashgrid.normalize(positions, self.box_min, self.box_max)
    inside = jnp.all((unit >= 0.0) & (unit <= 1.0), axis=-1)
    x = hashgrid.encode(unit, tables, grid).astype(dt)
    h = nn.relu(_SplitDense(self.width, dt, name='density_0')(x, condition))
    for i in range(1, self.depth):
      h = nn.relu(_SplitDense(self.width, dt, name=f'density_{i}')(h))
    out = _SplitDense(1 + self.geo_features, dt, name='density_out')(h)
    raw_density = jnp.where(inside, out[..., 0].astype(jnp.float32), -1e4)
    feature = out[..., 1:]
    rgb = _color_branch(feature, viewdirs, self.color_width, self.color_depth,
                        self.dir_freqs, self.use_viewdirs, dt)
    return rgb, raw_density


class LatentTable(nn.Module):
  """The per-frame latent codes gamma (zero-initialised, float32).

  Attributes:
    num_frames: rows of the table (training frames).
    dim: length L of each code.
  """
  num_frames: int
  dim: int

  @nn.compact
  def __call__(self, frame: jax.Array) -> jax.Array:
    """Looks up the codes of `frame`.

    Args:
      frame: int32 [R] training-frame indices.

    Returns:
      float32 [R, L] codes.
    """
    # Kept float32 whatever the compute dtype: a low-precision scatter-add
    # (the gather's gradient) is slow and lossy.
    gamma = self.param('gamma', nn.initializers.zeros,
                       (self.num_frames, self.dim), jnp.float32)
    return gamma[frame]


class NerfaceModel(nn.Module):
  """Coarse and fine conditioned fields with hierarchical volume rendering.

  Attributes:
    num_frames: training frames (rows of the gamma table).
    expr_dim: expression length E.
    expr_scale: expressions are multiplied by this before conditioning.
    expr_mean, expr_std: optional per-coefficient statistics [E] of the
      training expressions; when given, every expression is standardised
      with them before `expr_scale` (`model.expr_norm = 'standardize'`).
    latent_dim: length L of gamma.
    use_expression: condition on the expression (False: ablation).
    use_latent: condition on gamma (False: the "no dyn." ablation).
    use_viewdirs: feed the view direction to the colour branch.
    use_background: the last sample is the background pixel ('image' mode).
    near, far: sample depth range.
    num_coarse: stratified (or grid-guided) samples per ray.
    num_fine: extra inverse-CDF samples per ray placed by the coarse level's
      weights; 0 means one level: no coarse network, the fine field is
      evaluated at the num_coarse samples themselves (with an occupancy
      grid placing them, as in Instant-NGP, there is nothing to resample).
    noise_std: std of the noise on raw density when a key is given.
    trunk_depth, trunk_width, skip_layer, color_width, color_depth, xyz_freqs,
      dir_freqs: sizes of both ConditionedMLPs (color_width, color_depth and
      dir_freqs also of the hash fields' colour MLPs).
    compute_dtype: dtype of the MLP matmuls.
    field: 'mlp' (ConditionedMLP, the original) or 'hash' (HashField) for
      both the coarse and the fine level.
    hash_grid: the hash fields' GridSpec (field 'hash').
    box_min, box_max: the head box (the hash and occupancy grids'); needed
      by field 'hash' and by an occupancy grid.
    hash_features, hash_width, hash_depth, hash_geo_features: HashField sizes.
  """
  num_frames: int
  expr_dim: int
  expr_scale: float = 1.0 / 3.0
  expr_mean: Optional[Tuple[float, ...]] = None
  expr_std: Optional[Tuple[float, ...]] = None
  latent_dim: int = 32
  use_expression: bool = True
  use_latent: bool = True
  use_viewdirs: bool = True
  use_background: bool = True
  near: float = 0.2
  far: float = 0.8
  num_coarse: int = 64
  num_fine: int = 64
  noise_std: float = 0.1
  trunk_depth: int = 6
  trunk_width: int = 256
  skip_layer: int = 3
  color_width: int = 128
  color_depth: int = 3
  xyz_freqs: int = 10
  dir_freqs: int = 4
  compute_dtype: Dtype = jnp.float32
  field: str = 'mlp'
  hash_grid: Optional[hashgrid.GridSpec] = None
  box_min: Optional[Tuple[float, float, float]] = None
  box_max: Optional[Tuple[float, float, float]] = None
  hash_features: int = 2
  hash_width: int = 64
  hash_depth: int = 1
  hash_geo_features: int = 15

  def setup(self):
    if self.field == 'hash':
      if self.hash_grid is None or self.box_min is None:
        raise ValueError("field 'hash' needs hash_grid, box_min and box_max.")
      make = lambda: HashField(
          grid=self.hash_grid, box_min=self.box_min, box_max=self.box_max,
          features=self.hash_features, width=self.hash_width,
          depth=self.hash_depth, geo_features=self.hash_geo_features,
          color_width=self.color_width, color_depth=self.color_depth,
          dir_freqs=self.dir_freqs, use_viewdirs=self.use_viewdirs,
          compute_dtype=self.compute_dtype)
    elif self.field == 'mlp':
      make = lambda: ConditionedMLP(
          trunk_depth=self.trunk_depth, trunk_width=self.trunk_width,
          skip_layer=self.skip_layer, color_width=self.color_width,
          color_depth=self.color_depth, xyz_freqs=self.xyz_freqs,
          dir_freqs=self.dir_freqs, use_viewdirs=self.use_viewdirs,
          compute_dtype=self.compute_dtype)
    else:
      raise ValueError(f"field must be 'mlp' or 'hash', got {self.field!r}.")
    if self.num_fine:
      self.coarse = make()
    self.fine = make()
    if self.use_latent:
      self.latent = LatentTable(self.num_frames, self.latent_dim)

  def _condition(self, batch: types.Batch) -> jax.Array:
    """float32 [R, C] per-ray conditioning: [expr * scale] ++ [gamma]."""
    num_rays = batch.frame.shape[0]
    parts = []
    if self.use_expression:
      expression = batch.expression
      if expression.shape != (num_rays, self.expr_dim):
        raise ValueError(
            f'batch.expression: expected shape [R, E] = '
            f'{(num_rays, self.expr_dim)} (expr_dim={self.expr_dim}), got '
            f'{expression.shape}.')
      expression = expression.astype(jnp.float32)
      if self.expr_mean is not None:
        expression = ((expression - jnp.asarray(self.expr_mean, jnp.float32))
                      / jnp.asarray(self.expr_std, jnp.float32))
      parts.append(expression * self.expr_scale)
    if self.use_latent:
      if batch.latent is not None:
        # Unseen frames bring their own code; the table is not touched.
        if batch.latent.shape != (num_rays, self.latent_dim):
          raise ValueError(
              f'batch.latent: expected shape [R, L] = '
              f'{(num_rays, self.latent_dim)}, got {batch.latent.shape}.')
        parts.append(batch.latent.astype(jnp.float32))
      else:
        parts.append(self.latent(batch.frame))
    if not parts:
      return jnp.zeros((num_rays, 0), jnp.float32)
    return jnp.concatenate(parts, axis=-1)

  def _check(self, batch: types.Batch):
    """Raises ValueError on inputs whose shapes do not fit a batch [R]."""
    if batch.frame.ndim != 1:
      raise ValueError(
          f'batch.frame: expected shape [R], got {batch.frame.shape}.')
    num_rays = batch.frame.shape[0]
    for name, value in (('rays.origins', batch.rays.origins),
                        ('rays.directions', batch.rays.directions),
                        ('background', batch.background)):
      if name == 'background' and not self.use_background:
        continue
      if value.shape != (num_rays, 3):
        raise ValueError(
            f'batch.{name}: expected shape [R, 3] = {(num_rays, 3)}, got '
            f'{value.shape}.')

  def __call__(
      self, batch: types.Batch, key: Optional[jax.Array] = None,
      grid: Optional[occupancy.Grid] = None
  ) -> Tuple[types.Renderings, types.Renderings]:
    """Renders the batch's rays with the coarse and the fine network.

    Args:
      batch: a Batch of R rays (`rays` [R, 3], `expression` [R, E], `frame`
        int32 [R], `background` [R, 3], optional `latent` [R, L]).
      key: PRNG key for stratified jitter, resampling and density noise; None
        renders deterministically (evaluation). Either one key [2] for the
        whole batch, or one key per ray [R, 2]: then every ray's randomness
        is its own, so results do not depend on how a global batch is split
        over devices.
      grid: an occupancy grid; when given, the coarse samples are drawn
        where it is occupied (`occupancy.sample`) instead of stratified over
        [near, far]. The last sample stays at far (the background).

    Returns:
      coarse: Renderings over `num_coarse` samples per ray; None with one
        level (num_fine = 0).
      fine: Renderings over `num_coarse + num_fine` sorted samples per ray.
    """
    num_rays = batch.frame.shape[0]
    origins, directions, viewdirs, background, condition = self._inputs(batch)

    per_ray = key is not None and jnp.ndim(key) == 2
    if key is None:
      keys = [None] * 4
    elif per_ray:
      if key.shape[0] != num_rays:
        raise ValueError(f'key: expected one key per ray [R, 2] = '
                         f'{(num_rays, 2)}, got {key.shape}.')
      split = jax.vmap(lambda k: jax.random.split(k, 4))(key)
      keys = [split[:, n] for n in range(4)]
    else:
      keys = list(jax.random.split(key, 4))
    k_strat, k_noise_c, k_fine, k_noise_f = keys

    def keyed(fn, k, *args):
      # With per-ray keys each ray draws from its own key (vmapped).
      return jax.vmap(fn)(k, *args) if per_ray else fn(k, *args)

    def render(mlp, t, noise_key):
      positions = origins[:, None, :] + t[..., None] * directions[:, None, :]
      rgb, raw = mlp(positions, condition, viewdirs)
      sigma = keyed(lambda k, r: rendering.density(r, k, self.noise_std),
                    noise_key, raw)
      return rendering.composite(rgb, sigma, t, directions, background)

    t_coarse = self.coarse_depths(origins, directions, k_strat, per_ray,
                                  grid)
    if not self.num_fine:
      return None, render(self.fine, t_coarse, k_noise_f)
    coarse = render(self.coarse, t_coarse, k_noise_c)
    # resample stops the gradient: the fine level does not train the coarse
    # weights through the sample positions.
    t_fine = keyed(lambda k, t, w: sampling.resample(k, t, w, self.num_fine),
                   k_fine, t_coarse, coarse.weights)
    fine = render(self.fine, t_fine, k_noise_f)
    return coarse, fine

  def _inputs(self, batch: types.Batch):
    """Checked float32 origins, directions, unit viewdirs [R, 3], background
    [R, 3] (None without one) and the condition [R, C] of a batch."""
    self._check(batch)
    origins = batch.rays.origins.astype(jnp.float32)
    directions = batch.rays.directions.astype(jnp.float32)
    viewdirs = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    background = (batch.background.astype(jnp.float32)
                  if self.use_background else None)
    return origins, directions, viewdirs, background, self._condition(batch)

  def fine_depths(self, batch: types.Batch,
                  grid: Optional[occupancy.Grid] = None) -> jax.Array:
    """The deterministic fine sample depths of `__call__` without a key.

    The first pass of rendering in passes (`renderer`): the coarse level
    runs on every ray, its weights place the fine samples. With one level
    these are the coarse depths, and no network runs.

    Args:
      batch: a Batch of R rays (as `__call__`).
      grid: the occupancy grid guiding the coarse samples, or None.

    Returns:
      float32 [R, num_coarse + num_fine] sorted depths, the last at far.
    """
    origins, directions, viewdirs, background, condition = self._inputs(batch)
    t = self.coarse_depths(origins, directions, None, False, grid)
    if not self.num_fine:
      return t
    positions = origins[:, None, :] + t[..., None] * directions[:, None, :]
    rgb, raw = self.coarse(positions, condition, viewdirs)
    coarse = rendering.composite(rgb, rendering.density(raw, None, 0.0), t,
                                 directions, background)
    return sampling.resample(None, t, coarse.weights, self.num_fine)

  def fine_samples(self, batch: types.Batch,
                   t: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """The fine level's colour and density at depths t of the batch's rays.

    Args:
      batch: a Batch of R rays.
      t: float32 [R, K] depths.

    Returns:
      rgb float32 [R, K, 3] and sigma float32 [R, K] (no noise).
    """
    origins, directions, viewdirs, _, condition = self._inputs(batch)
    positions = origins[:, None, :] + t[..., None] * directions[:, None, :]
    rgb, raw = self.fine(positions, condition, viewdirs)
    return rgb, rendering.density(raw, None, 0.0)

  def coarse_depths(self, origins: jax.Array, directions: jax.Array,
                    key: Optional[jax.Array], per_ray: bool,
                    grid: Optional[occupancy.Grid]) -> jax.Array:
    """float32 [R, num_coarse] sorted coarse sample depths of rays [R, 3].

    Stratified over [near, far], or grid-guided with `grid`; `key` is one key,
    one per ray ([R, 2], `per_ray`) or None (deterministic midpoints).
    """
    num_rays = origins.shape[0]
    if grid is None:
      draw = lambda k, shape: sampling.stratified(
          k, self.near, self.far, shape, self.num_coarse)
      if per_ray:
        return jax.vmap(lambda k: draw(k, ()))(key)
      return draw(key, (num_rays,))

    def guided(k, o, d):
      return occupancy.sample(k, grid, o, d, self.near, self.far,
                              self.num_coarse)[0]
    if per_ray:
      return jax.vmap(lambda k, o, d: guided(k, o[None], d[None])[0])(
          key, origins, directions)
    return guided(key, origins, directions)

  def densities(self, points: jax.Array, expression: jax.Array,
                frame: jax.Array, latent: Optional[jax.Array] = None
                ) -> jax.Array:
    """The larger of the levels' densities at points, for one frame.

    What the occupancy grid is refreshed from: a cell must stay occupied if
    either level puts matter there (the coarse level places the fine samples).
    With one level, the fine field's density.

    Args:
      points: float32 [P, 3] world positions.
      expression: float32 [E] the frame's expression (unscaled).
      frame: int32 [] its training frame (its gamma is looked up).
      latent: optional float32 [L] gamma to use instead of the table's.

    Returns:
      float32 [P] sigma = relu(raw density), no noise.
    """
    num = points.shape[0]
    # Evaluated as rows of "rays" (the fields' [R, S, 3] layout).
    rows = math.gcd(num, 64)
    positions = points.reshape(rows, num // rows, 3)
    batch = types.Batch(
        rays=types.Rays(origins=jnp.zeros((rows, 3), jnp.float32),
                        directions=jnp.zeros((rows, 3), jnp.float32)),
        rgb=jnp.zeros((rows, 3), jnp.float32),
        background=jnp.zeros((rows, 3), jnp.float32),
        expression=jnp.broadcast_to(expression, (rows,) + expression.shape),
        frame=jnp.broadcast_to(frame, (rows,)).astype(jnp.int32),
        latent=(None if latent is None else
                jnp.broadcast_to(latent, (rows,) + latent.shape)))
    condition = self._condition(batch)
    viewdirs = jnp.broadcast_to(jnp.array([0.0, 0.0, -1.0], jnp.float32),
                                (rows, 3))
    levels = (self.coarse, self.fine) if self.num_fine else (self.fine,)
    sigma = [rendering.density(mlp(positions, condition, viewdirs)[1], None,
                               0.0) for mlp in levels]
    return functools.reduce(jnp.maximum, sigma).reshape(num)


EXPR_NORMS = config_lib.CHOICES['model.expr_norm']
# Coefficients that barely move in training are not blown up to unit spread.
_MIN_EXPR_STD = 1e-2


def expression_stats(expressions) -> dict[str, list[float]]:
  """Per-coefficient mean and (floored) std of training expressions [F, E].

  Returns:
    {'expr_mean': [E], 'expr_std': [E]} as python floats (json-ready; kept
    with the checkpoint's data facts so renders standardise the same way).
  """
  e = np.asarray(expressions, np.float64)
  return {'expr_mean': [float(v) for v in e.mean(axis=0)],
          'expr_std': [float(v) for v in np.maximum(e.std(axis=0),
                                                    _MIN_EXPR_STD)]}


def construct_model(config: ml_collections.ConfigDict, num_frames: int,
                    expr_dim: int,
                    expr_stats: Optional[dict[str, Any]] = None,
                    box: Optional[Any] = None) -> NerfaceModel:
  """Builds the NerfaceModel of `config` for a dataset.

  Args:
    config: the experiment config (reads `model`, `render`, `data.near`,
      `data.far` and `data.background`).
    num_frames: training frames (rows of the gamma table).
    expr_dim: expression length E of the data.
    expr_stats: `expression_stats` of the training expressions; required by
      `model.expr_norm = 'standardize'`, ignored otherwise.
    box: float [2, 3] (lower, upper corner) of the head volume, the hash
      grid's and the occupancy grid's box (the data facts' 'box',
      `scene.head_box`); required by `model.field = 'hash'`.

  Returns:
    An unbound NerfaceModel.
  """
  m = config.model
  expr_norm = m.expr_norm
  if expr_norm not in EXPR_NORMS:
    raise ValueError(f'config.model.expr_norm must be one of {EXPR_NORMS}; '
                     f'got {expr_norm!r}.')
  mean = std = None
  if expr_norm == 'standardize':
    if not expr_stats or 'expr_mean' not in expr_stats:
      raise ValueError(
          "config.model.expr_norm = 'standardize' needs the training "
          'expressions\' mean and std (saved with the checkpoint by training); '
          'none were given.')
    mean, std = (tuple(float(v) for v in expr_stats[k])
                 for k in ('expr_mean', 'expr_std'))
    if len(mean) != expr_dim or len(std) != expr_dim:
      raise ValueError(f'expression statistics have {len(mean)} values but '
                       f'the expressions have {expr_dim}.')
  if m.expr_dim is not None and m.expr_dim != expr_dim:
    raise ValueError(
        f'config.model.expr_dim = {m.expr_dim} but the data has expressions '
        f'of length {expr_dim}; leave model.expr_dim unset to take it from '
        'the data.')
  if m.compute_dtype not in _DTYPES:
    raise ValueError(
        f'config.model.compute_dtype must be one of {sorted(_DTYPES)}; got '
        f'{m.compute_dtype!r}.')
  if config.data.background not in _BACKGROUNDS:
    raise ValueError(
        f'config.data.background must be one of {sorted(_BACKGROUNDS)}; got '
        f'{config.data.background!r}.')
  hash_args = {}
  if box is not None:
    # The occupancy grid spans it too, whatever the field.
    lo, hi = (tuple(float(v) for v in corner) for corner in np.asarray(box))
    hash_args = dict(box_min=lo, box_max=hi)
  if m.field == 'hash':
    if box is None:
      raise ValueError(
          "config.model.field = 'hash' needs the head box of the data (saved "
          "with the checkpoint's data facts as 'box'); none was given.")
    hash_args.update(
        field='hash',
        hash_grid=hashgrid.GridSpec.create(
            m.hash_levels, m.hash_base_resolution, m.hash_max_resolution,
            m.hash_log2_size),
        hash_features=m.hash_features, hash_width=m.hash_width,
        hash_depth=m.hash_depth, hash_geo_features=m.hash_geo_features)
  return NerfaceModel(
      num_frames=num_frames,
      expr_dim=expr_dim,
      expr_scale=m.expr_scale,
      expr_mean=mean,
      expr_std=std,
      latent_dim=m.latent_dim,
      use_expression=m.use_expression,
      use_latent=m.use_latent,
      use_viewdirs=m.use_viewdirs,
      use_background=_BACKGROUNDS[config.data.background],
      near=config.data.near,
      far=config.data.far,
      num_coarse=config.render.num_coarse,
      num_fine=config.render.num_fine,
      noise_std=config.render.noise_std,
      trunk_depth=m.trunk_depth,
      trunk_width=m.trunk_width,
      skip_layer=m.skip_layer,
      color_width=m.color_width,
      color_depth=m.color_depth,
      xyz_freqs=m.xyz_freqs,
      dir_freqs=m.dir_freqs,
      compute_dtype=_DTYPES[m.compute_dtype],
      **hash_args)


def dummy_batch(num_rays: int, expr_dim: int) -> types.Batch:
  """A Batch of `num_rays` valid rays with zero conditioning (for init).

  Args:
    num_rays: R.
    expr_dim: E.

  Returns:
    A Batch with rays along -z from the origin, frame 0 and no explicit
    latent (so that initialisation creates the gamma table).
  """
  directions = jnp.broadcast_to(jnp.array([0.0, 0.0, -1.0], jnp.float32),
                                (num_rays, 3))
  return types.Batch(
      rays=types.Rays(origins=jnp.zeros((num_rays, 3), jnp.float32),
                      directions=directions),
      rgb=jnp.zeros((num_rays, 3), jnp.float32),
      background=jnp.zeros((num_rays, 3), jnp.float32),
      expression=jnp.zeros((num_rays, expr_dim), jnp.float32),
      frame=jnp.zeros((num_rays,), jnp.int32))


def init_params(model: NerfaceModel, key: jax.Array, expr_dim: int):
  """Initialises the model's parameters.

  Args:
    model: an unbound NerfaceModel.
    key: PRNG key of the initialisation.
    expr_dim: expression length E.

  Returns:
    The parameter tree {'coarse': ..., 'fine': ..., 'latent': {'gamma'}}
    ('coarse' only with num_fine > 0, 'latent' only with `use_latent`), all
    float32.
  """
  batch = dummy_batch(2, expr_dim)
  # Jitted: one compile beats op-by-op dispatch of every initialiser.
  variables = jax.jit(model.init)(key, batch)
  return variables['params']
