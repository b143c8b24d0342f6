"""Full-image rendering with a trained model.

Pixels of a frame are rendered in chunks by one jitted function; each chunk is
sharded over all devices (of all processes) on the 'data' axis and gathered
back to the host. Rendering is deterministic: no jitter, no density noise.
"""

import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import chex
from flax import struct
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from nerface_jax import camera
from nerface_jax import checkpoint
from nerface_jax import data
from nerface_jax import losses
from nerface_jax import models
from nerface_jax import parallel
from nerface_jax import sampler
from nerface_jax import types

LATENT_CHOICES = ('fixed', 'zero', 'mean', 'optimize')


@struct.dataclass
class FrameInputs:
  """What a frame needs besides its pixels (all replicated on devices).

  Attributes:
    c2w: float32 [4, 4] camera-to-world.
    intrinsics: float32 [4] (fx, fy, cx, cy) as in the dataset.
    expression: float32 [E] (unscaled).
    latent: float32 [L] the frame's gamma (zeros when the model has none).
    background: uint8 [H, W, 3].
  """
  c2w: chex.Array
  intrinsics: chex.Array
  expression: chex.Array
  latent: chex.Array
  background: chex.Array


def eval_latent(params: Any, choice: str, latent_frame: int = 0,
                latent_dim: int = 0) -> np.ndarray:
  """The gamma used for frames without a trained code.

  Args:
    params: model parameters ({'latent': {'gamma': [F, L]}} when the model
      has codes).
    choice: 'fixed' (row `latent_frame`, the original's choice), 'zero' or
      'mean'. ('optimize' is per frame; see `optimize_latents`.)
    latent_frame: the training frame used by 'fixed'.
    latent_dim: L, for models without codes (returns zeros [L]).

  Returns:
    float32 [L].
  """
  if 'latent' not in params:
    return np.zeros((latent_dim,), np.float32)
  gamma = np.asarray(params['latent']['gamma'], np.float32)
  if choice == 'zero':
    return np.zeros(gamma.shape[1:], np.float32)
  if choice == 'mean':
    return gamma.mean(axis=0)
  if choice == 'fixed':
    if not 0 <= latent_frame < gamma.shape[0]:
      raise ValueError(f'eval.latent_frame = {latent_frame} but there are '
                       f'{gamma.shape[0]} training frames.')
    return gamma[latent_frame]
  raise ValueError(f'eval.latent must be one of {LATENT_CHOICES[:3]} here, got '
                   f'{choice!r}.')


def make_render_chunk(model: models.NerfaceModel, mesh) -> Callable[..., Any]:
  """A jitted renderer of one chunk of pixels of one frame.

  Args:
    model: the NerfaceModel.
    mesh: the device mesh; chunks are sharded over its 'data' axis.

  Returns:
    fn(params, pixels int32 [C, 2] (column, row), inputs: FrameInputs) ->
    dict of float32 'rgb' [C, 3], 'depth' [C], 'acc' [C] (fine level), with
    C a multiple of the device count.
  """
  def render(params, pixels, inputs: FrameInputs):
    height, width = inputs.background.shape[:2]
    num = pixels.shape[0]
    rays = camera.generate_rays(pixels.astype(jnp.float32), inputs.intrinsics,
                                inputs.c2w, height, width)
    background = inputs.background[pixels[:, 1], pixels[:, 0]]
    batch = types.Batch(
        rays=rays,
        rgb=jnp.zeros((num, 3), jnp.float32),
        background=background.astype(jnp.float32) / 255.0,
        expression=jnp.broadcast_to(inputs.expression,
                                    (num,) + inputs.expression.shape),
        frame=jnp.zeros((num,), jnp.int32),
        latent=jnp.broadcast_to(inputs.latent, (num,) + inputs.latent.shape))
    _, fine = model.apply({'params': params}, batch)
    return {'rgb': fine.rgb, 'depth': fine.depth, 'acc': fine.acc}

  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  return jax.jit(render, in_shardings=(replicated, sharded, replicated),
                 out_shardings=sharded)


def render_frame(render_chunk: Callable[..., Any], params: Any,
                 inputs: FrameInputs, height: int, width: int, chunk: int,
                 mesh) -> dict[str, np.ndarray]:
  """Renders a whole frame on the host side of a chunked, sharded renderer.

  Args:
    render_chunk: from `make_render_chunk`.
    params: model parameters (replicated).
    inputs: FrameInputs of the frame.
    height: H.
    width: W.
    chunk: rays per call; rounded up to a multiple of the device count.
    mesh: the device mesh.

  Returns:
    {'rgb': float32 [H, W, 3], 'depth': float32 [H, W], 'acc': [H, W]}.
  """
  devices = mesh.devices.size
  chunk = -(-min(chunk, height * width) // devices) * devices
  pixels = np.asarray(camera.pixel_grid(height, width), np.int32).reshape(-1, 2)
  total = pixels.shape[0]
  # Padding repeats pixel (0, 0); its results are cut off below. One chunk
  # shape means one compilation for every frame of every size-H x W split.
  padded = -(-total // chunk) * chunk
  pixels = np.concatenate([pixels, np.zeros((padded - total, 2), np.int32)])
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  inputs = parallel.replicate(inputs, mesh)
  outputs = []
  for start in range(0, padded, chunk):
    piece = jax.device_put(pixels[start:start + chunk], sharded)
    out = render_chunk(params, piece, inputs)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    # Kept on the device until all chunks are dispatched, so that copying
    # results back never stalls the next chunk's computation.
    outputs.append(out)
  outputs = jax.device_get(outputs)
  joined = {k: np.concatenate([o[k] for o in outputs])[:total]
            for k in outputs[0]}
  return {k: v.reshape((height, width) + v.shape[1:]) for k, v in joined.items()}


def depth_image(depth: np.ndarray, near: float, far: float) -> np.ndarray:
  """A colour-mapped depth map: uint8 [H, W, 3] (near bright, far dark).

  Args:
    depth: float [H, W] depths.
    near: depth shown brightest.
    far: depth shown darkest.
  """
  x = np.clip((far - np.asarray(depth, np.float64)) / (far - near), 0.0, 1.0)
  # A perceptually ordered blue -> orange -> yellow ramp, cheap to compute.
  r = np.clip(1.6 * x - 0.2, 0, 1)
  g = np.clip(1.6 * x - 0.6, 0, 1) * 0.9 + 0.1 * x
  b = np.clip(0.6 - 1.2 * np.abs(x - 0.35), 0, 1)
  return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [..., 3] in [0, 1] -> uint8 (rounded)."""
  return (np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255 + 0.5).astype(
      np.uint8)


def frame_inputs(dataset, index: int, latent: np.ndarray,
                 background: Optional[np.ndarray] = None) -> FrameInputs:
  """FrameInputs of frame `index` of a `data.Dataset` (host arrays)."""
  bg = dataset.background if background is None else background
  if bg is None:
    bg = np.zeros((dataset.height, dataset.width, 3), np.uint8)
  return FrameInputs(
      c2w=np.asarray(dataset.c2w[index], np.float32),
      intrinsics=np.asarray(dataset.intrinsics, np.float32),
      expression=np.asarray(dataset.expressions[index], np.float32),
      latent=np.asarray(latent, np.float32),
      background=np.asarray(bg, np.uint8))


# --- Loading a trained avatar -------------------------------------------------


class RenderError(RuntimeError):
  """Rendering cannot proceed; the message says why."""


@dataclasses.dataclass
class Avatar:
  """A trained model ready to render.

  Attributes:
    config: the run's config (from the checkpoint).
    meta: facts of the training data (frames, expression length, size).
    model: the NerfaceModel.
    params: parameters, replicated over `mesh`.
    host_params: the same on the host (numpy).
    mesh: the device mesh.
    step: the checkpoint's step.
    render_chunk: from `make_render_chunk`.
  """
  config: ml_collections.ConfigDict
  meta: dict[str, Any]
  model: models.NerfaceModel
  params: Any
  host_params: Any
  mesh: Any
  step: int
  render_chunk: Callable[..., Any]

  @property
  def expr_dim(self) -> int:
    return self.meta['expr_dim']

  def latent(self, choice: Optional[str] = None) -> np.ndarray:
    """The code for unseen frames by `choice` (default: eval.latent)."""
    choice = choice or self.config.eval.latent
    return eval_latent(self.host_params, 'mean' if choice == 'optimize' else
                       choice, self.config.eval.latent_frame,
                       self.config.model.latent_dim)

  def render(self, inputs: FrameInputs, height: int,
             width: int) -> dict[str, np.ndarray]:
    return render_frame(self.render_chunk, self.params, inputs, height, width,
                        self.config.render.chunk, self.mesh)


def load_avatar(workdir: os.PathLike[str] | str, step: Optional[int] = None,
                mesh=None) -> Avatar:
  """Rebuilds the model of a training workdir from its checkpoint.

  Args:
    workdir: the training workdir (holds checkpoints/).
    step: the checkpoint step (default: the latest).
    mesh: device mesh (default: all devices).

  Returns:
    An Avatar.

  Raises:
    RenderError: when there is no (such) checkpoint.
  """
  from nerface_jax import train_lib  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise RenderError(f'{workdir}: no such workdir.')
  ckpt = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    steps = ckpt.all_steps() if (workdir / checkpoint.SUBDIR).is_dir() else []
    if not steps:
      raise RenderError(f'{workdir / checkpoint.SUBDIR}: no checkpoint to '
                        'render from; train first (python train.py '
                        f'--workdir={workdir} ...).')
    if step is not None and step not in steps:
      raise RenderError(f'{workdir}: no checkpoint at step {step}; available: '
                        f'{steps}.')
    step = steps[-1] if step is None else step
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
    meta = ckpt.restore_meta(step)
    if not meta:
      raise RenderError(f'{workdir}: the checkpoint at step {step} has no '
                        'data facts (written by an older version).')
    mesh = parallel.make_mesh() if mesh is None else mesh
    model = models.construct_model(config, meta['num_train_frames'],
                                   meta['expr_dim'], meta)
    tx = train_lib.make_optimizer(config)
    target = parallel.replicate(train_lib.create_train_state(
        config, model, meta['expr_dim'], tx), mesh)
    state = ckpt.restore(target, step)
  finally:
    ckpt.close()
  host_params = parallel.to_host(state.params)
  return Avatar(config=config, meta=meta, model=model,
                params=parallel.replicate(host_params, mesh),
                host_params=host_params, mesh=mesh, step=step,
                render_chunk=make_render_chunk(model, mesh))


def load_dataset(avatar: Avatar, split: str,
                 data_dir: Optional[str] = None) -> data.Dataset:
  """A split of the avatar's dataset, or of `data_dir`, checked to fit it.

  Raises:
    RenderError: if the dataset cannot be read or does not fit the avatar
      (expression length, image size), saying what differs.
  """
  config = avatar.config
  if data_dir is None:
    root = (pathlib.Path(avatar.meta['data_dir'])
            if avatar.meta.get('data_dir') else data.dataset_dir(config.data))
    if not root.is_dir():
      root = data.dataset_dir(config.data)
  else:
    root = pathlib.Path(data_dir).expanduser()
  try:
    dataset = data.load(root, split, config.data.downscale,
                        background=config.data.background == 'image',
                        expr_dim=avatar.expr_dim,
                        expr_origin=f'the avatar (step {avatar.step})')
  except data.DatasetError as e:
    raise RenderError(str(e)) from None
  size = (avatar.meta['height'], avatar.meta['width'])
  if (dataset.height, dataset.width) != size:
    raise RenderError(
        f'{root}: {split} images are {dataset.width}x{dataset.height} but the '
        f'avatar was trained on {size[1]}x{size[0]} (set '
        '--config.data.downscale at training time to match).')
  return dataset


# --- Per-frame latent fitting ('optimize') -------------------------------------


def make_latent_fitter(avatar: Avatar) -> Callable[..., Any]:
  """A jitted fit of gamma for a batch of unseen frames, networks frozen.

  Every step draws `eval.optimize_rays` bbox-weighted rays from each frame
  and takes an Adam step on the codes only; frames are independent, so one
  batch fits K codes at once.

  Returns:
    fit(device_data, frames int32 [K], init float32 [K, L], key) ->
    (codes float32 [K, L], losses float32 [steps]).
  """
  config = avatar.config
  model, params = avatar.model, avatar.host_params
  rays = config.eval.optimize_rays
  tx = optax.adam(config.eval.optimize_lr)
  reg = config.train.latent_reg
  # Checkpoints written before the key existed used the original's prior.
  prior = config.train.get('latent_prior', 'norm')

  def fit(device_data, frames, init, key):
    num = frames.shape[0]
    local = jnp.repeat(jnp.arange(num), rays)
    frame = frames[local]

    def loss_fn(codes, batch, model_key):
      batch = batch.replace(latent=codes[local])
      coarse, fine = model.apply({'params': params}, batch, model_key)
      mse = (losses.mse(coarse.rgb, batch.rgb) +
             losses.mse(fine.rgb, batch.rgb))
      return mse + reg * losses.latent_prior(codes, prior)

    def step(carry, step_key):
      codes, opt_state = carry
      pixel_key, model_key = jax.random.split(step_key)
      pixels = sampler.pixels_in_frames(pixel_key, device_data, frame)
      batch = sampler.gather_batch(device_data, frame, pixels)
      loss, grad = jax.value_and_grad(loss_fn)(codes, batch, model_key)
      updates, opt_state = tx.update(grad, opt_state, codes)
      return (optax.apply_updates(codes, updates), opt_state), loss

    keys = jax.random.split(key, config.eval.optimize_steps)
    (codes, _), trace = jax.lax.scan(step, (init, tx.init(init)), keys)
    return codes, trace

  return jax.jit(fit)


def optimize_latents(avatar: Avatar, dataset: data.Dataset,
                     progress: Optional[Callable[[int, int], None]] = None
                     ) -> np.ndarray:
  """Fits gamma to every frame of `dataset` (its pixels), networks frozen.

  Args:
    avatar: the Avatar.
    dataset: the frames to fit.
    progress: called with (frames done, total).

  Returns:
    float32 [F, L] codes, starting from the mean training code.
  """
  config = avatar.config
  if 'latent' not in avatar.host_params:
    return np.zeros((dataset.num_frames, config.model.latent_dim), np.float32)
  device_data = jax.device_put(sampler.prepare(
      dataset.images, dataset.c2w, dataset.expressions, dataset.bboxes,
      dataset.background, dataset.intrinsics, config.data.bbox_weight))
  fit = make_latent_fitter(avatar)
  batch = config.eval.optimize_batch
  start_code = avatar.latent('mean')
  codes = []
  for first in range(0, dataset.num_frames, batch):
    frames = np.arange(first, min(first + batch, dataset.num_frames))
    # Pad the last batch to the same size: one compilation for all.
    padded = np.concatenate(
        [frames, np.full(batch - len(frames), frames[-1])]).astype(np.int32)
    init = np.tile(start_code, (batch, 1))
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), first)
    fitted, _ = fit(device_data, padded, init, key)
    codes.append(np.asarray(fitted)[:len(frames)])
    if progress:
      progress(frames[-1] + 1, dataset.num_frames)
  return np.concatenate(codes)


# --- Camera paths, expression edits, reenactment (numpy) ------------------------


def head_centre(c2w: np.ndarray) -> np.ndarray:
  """The point closest (least squares) to every camera's optical axis.

  Args:
    c2w: float [F, 4, 4] cameras that look at the head.

  Returns:
    float64 [3].
  """
  c2w = np.asarray(c2w, np.float64)
  origins = c2w[:, :3, 3]
  axes = -c2w[:, :3, 2]
  axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
  # Sum of projectors orthogonal to each axis; solvable unless all axes are
  # parallel, in which case the pseudo-inverse picks the closest point.
  projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
  return np.linalg.lstsq(projectors.sum(0),
                         np.einsum('fij,fj->i', projectors, origins),
                         rcond=None)[0]


def frontal_index(c2w: np.ndarray, centre: np.ndarray) -> int:
  """The frame whose viewing direction is closest to the mean one.

  Args:
    c2w: float [F, 4, 4].
    centre: float [3] head centre.
  """
  offsets = np.asarray(c2w, np.float64)[:, :3, 3] - centre
  offsets /= np.linalg.norm(offsets, axis=-1, keepdims=True)
  mean = offsets.mean(0)
  return int(np.argmax(offsets @ mean))


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  axis = axis / np.linalg.norm(axis)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                [-axis[1], axis[0], 0]])
  return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def rotate_about(c2w: np.ndarray, rotation: np.ndarray,
                 centre: np.ndarray) -> np.ndarray:
  """Moves a camera rigidly by `rotation` about the point `centre`.

  Args:
    c2w: float [4, 4].
    rotation: float [3, 3].
    centre: float [3].

  Returns:
    float64 [4, 4].
  """
  motion = np.eye(4)
  motion[:3, :3] = rotation
  motion[:3, 3] = centre - rotation @ centre
  return motion @ np.asarray(c2w, np.float64)


def orbit_poses(c2w: np.ndarray, centre: np.ndarray, num: int,
                yaw_degrees: float = 25.0,
                pitch_degrees: float = 10.0) -> np.ndarray:
  """A smooth closed path around the head: yaw sweeps once, pitch twice.

  Args:
    c2w: float [4, 4] the starting camera (looking at the head).
    centre: float [3] the head centre the camera keeps looking at.
    num: N frames.
    yaw_degrees: yaw amplitude.
    pitch_degrees: pitch amplitude.

  Returns:
    float32 [N, 4, 4].
  """
  c2w = np.asarray(c2w, np.float64)
  up, right = c2w[:3, 1], c2w[:3, 0]
  poses = []
  for n in range(num):
    phase = 2 * math.pi * n / num
    rotation = (_axis_rotation(up, math.radians(yaw_degrees) * math.sin(phase))
                @ _axis_rotation(right, math.radians(pitch_degrees) *
                                 math.sin(2 * phase)))
    poses.append(rotate_about(c2w, rotation, centre))
  return np.asarray(poses, np.float32)


def expression_sweep(expression: np.ndarray, coeffs: Sequence[int], low: float,
                     high: float, num: int) -> np.ndarray:
  """Sets coefficients `coeffs` from `low` to `high` over `num` frames.

  Args:
    expression: float [E] the starting expression.
    coeffs: indices into the expression.
    low: first value.
    high: last value.
    num: N frames.

  Returns:
    float32 [N, E]; the other coefficients keep their values.
  """
  expression = np.asarray(expression, np.float32)
  for c in coeffs:
    if not 0 <= c < expression.shape[0]:
      raise RenderError(f'--coeff={c} is outside the expression, which has '
                        f'{expression.shape[0]} coefficients (0 to '
                        f'{expression.shape[0] - 1}).')
  out = np.tile(expression, (num, 1))
  values = np.linspace(low, high, num, dtype=np.float32)
  out[:, list(coeffs)] = values[:, None]
  return out


def neutral_index(expressions: np.ndarray, chosen: Optional[int]) -> int:
  """`chosen`, or the frame of lowest expression norm (the most neutral)."""
  if chosen is not None:
    if not 0 <= chosen < len(expressions):
      raise RenderError(f'neutral frame {chosen} is outside the '
                        f'{len(expressions)} frames.')
    return chosen
  return int(np.argmin(np.linalg.norm(expressions, axis=-1)))


def reenactment(target_neutral: np.ndarray, target_front: np.ndarray,
                target_centre: np.ndarray, driver_expressions: np.ndarray,
                driver_neutral: np.ndarray, driver_c2w: np.ndarray,
                driver_front: np.ndarray):
  """The original's delta transfer of expressions and head rotations.

  expression = target neutral + (driver - driver neutral); the driver's head
  rotation relative to its most frontal pose is applied to the target's most
  frontal camera, about the target's head centre (translations are not
  transferred: the two heads differ in size and placement).

  Args:
    target_neutral: float [E] the avatar's neutral expression.
    target_front: float [4, 4] the avatar's most frontal camera.
    target_centre: float [3] the avatar's head centre.
    driver_expressions: float [N, E].
    driver_neutral: float [E] the driver's neutral expression.
    driver_c2w: float [N, 4, 4] the driver's cameras.
    driver_front: float [4, 4] the driver's most frontal camera.

  Returns:
    (expressions float32 [N, E], c2w float32 [N, 4, 4]).
  """
  expressions = (np.asarray(target_neutral)[None] +
                 (np.asarray(driver_expressions) - driver_neutral[None]))
  front_rotation = np.asarray(driver_front, np.float64)[:3, :3]
  poses = [rotate_about(target_front, c[:3, :3] @ front_rotation.T,
                        target_centre)
           for c in np.asarray(driver_c2w, np.float64)]
  return expressions.astype(np.float32), np.asarray(poses, np.float32)


# --- Images -----------------------------------------------------------------------


def normals_image(depth: np.ndarray, acc: np.ndarray,
                  intrinsics: np.ndarray) -> np.ndarray:
  """Camera-space normals of the rendered surface, as colours.

  The surface is the depth map lifted through the frame's rays; normals are
  cross products of its finite differences, shown in the camera's frame
  (x right: red, y up: green, z towards the viewer: blue) so that a face
  turned to the camera reads the same in every frame.

  Args:
    depth: float [H, W] depths.
    acc: float [H, W] foreground opacity (below 0.5 shows black).
    intrinsics: float [4] (fx, fy, cx, cy).

  Returns:
    uint8 [H, W, 3].
  """
  height, width = depth.shape
  rays = image_rays_np(intrinsics, np.eye(4), height, width)
  points = rays * np.asarray(depth, np.float64)[..., None]  # Camera space.
  du = np.gradient(points, axis=1)
  dv = np.gradient(points, axis=0)
  normals = np.cross(dv, du)
  # Orient towards the camera (which looks down -z), whatever the sign of fx.
  normals *= np.where(normals[..., 2:] < 0, -1.0, 1.0)
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
  colour = (normals * 0.5 + 0.5) * (np.asarray(acc) >= 0.5)[..., None]
  return to_uint8(colour)


def image_rays_np(intrinsics: np.ndarray, c2w: np.ndarray, height: int,
                  width: int) -> np.ndarray:
  """Ray directions [H, W, 3] of DESIGN.md section 3 in numpy (float64)."""
  fx, fy, cx, cy = (float(v) for v in intrinsics)
  cols, rows = np.meshgrid(np.arange(width, dtype=np.float64),
                           np.arange(height, dtype=np.float64))
  dirs = np.stack([(cols - width * cx) / fx, -(rows - height * cy) / fy,
                   -np.ones_like(cols)], axis=-1)
  return dirs @ np.asarray(c2w, np.float64)[:3, :3].T


# --- Render modes (what render.py runs) ------------------------------------------

MARKER = '.nerface-render'


def prepare_output(out: os.PathLike[str] | str) -> pathlib.Path:
  """Creates `out`, refusing a folder that holds files render.py did not write.

  A folder is ours when it holds the marker file of an earlier render; then
  its renders are replaced. Anything else is never overwritten.
  """
  out = pathlib.Path(out).expanduser()
  if out.exists() and not out.is_dir():
    raise RenderError(f'{out}: exists and is not a folder.')
  if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
    raise RenderError(f'{out}: the folder holds files that render.py did not '
                      'write; choose a new or empty --out folder.')
  out.mkdir(parents=True, exist_ok=True)
  (out / MARKER).write_text('Written by render.py; its renders may be '
                            'replaced.\n')
  return out


def _save_png(path: pathlib.Path, image: np.ndarray):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def _report(message: str):
  print(message, file=sys.stderr, flush=True)


def _latent_codes(avatar: Avatar, dataset: data.Dataset, choice: str,
                  own_codes: bool) -> np.ndarray:
  """float32 [F, L]: one code per frame of `dataset` by `choice`."""
  if own_codes and 'latent' in avatar.host_params:
    return np.asarray(avatar.host_params['latent']['gamma'], np.float32)[
        :dataset.num_frames]
  if choice == 'optimize':
    return optimize_latents(
        avatar, dataset,
        lambda done, total: _report(f'fitting latent codes: {done}/{total}'))
  return np.tile(avatar.latent(choice), (dataset.num_frames, 1))


def render_split(avatar: Avatar, out: os.PathLike[str] | str, split: str,
                 data_dir: Optional[str] = None, latent: Optional[str] = None,
                 fps: float = 25.0) -> dict[str, Any]:
  """Renders and scores every frame of a split (DESIGN.md section 6).

  Writes `out/<name>.png` (the dataset's image names), `out/depth/`,
  `out/normals/`, `out/metrics.json` and a video of prediction | truth.
  Frames of the training split use their own trained codes; others use
  `latent` (default eval.latent). With 'optimize' the metrics of the mean
  code are reported beside (key 'without_optimize').

  Returns:
    The metrics.json content.
  """
  from nerface_jax import metrics, video  # pylint: disable=g-import-not-at-top
  out = prepare_output(out)
  dataset = load_dataset(avatar, split, data_dir)
  choice = latent or avatar.config.eval.latent
  own = split == 'train' and data_dir is None
  runs = [choice] if choice != 'optimize' or own else ['optimize', 'mean']
  report: dict[str, Any] = {'split': split, 'step': avatar.step,
                            'data_dir': str(dataset.path)}
  for run in runs:
    codes = _latent_codes(avatar, dataset, run, own)
    rows, panels = [], []
    for index in range(dataset.num_frames):
      name = pathlib.PurePosixPath(dataset.file_paths[index]).name
      result = avatar.render(frame_inputs(dataset, index, codes[index]),
                             dataset.height, dataset.width)
      prediction = to_uint8(result['rgb'])
      truth = dataset.images[index]
      row = {'frame': name, **metrics.image_metrics(
          prediction.astype(np.float32) / 255, truth.astype(np.float32) / 255,
          dataset.bboxes[index])}
      rows.append(row)
      if run == runs[0]:
        _save_png(out / f'{name}.png', prediction)
        _save_png(out / 'depth' / f'{name}.png', depth_image(
            result['depth'], avatar.config.data.near, avatar.config.data.far))
        _save_png(out / 'normals' / f'{name}.png', normals_image(
            result['depth'], result['acc'], dataset.intrinsics))
        panels.append(video.side_by_side(prediction, truth))
      _report(f'{run}: frame {index + 1}/{dataset.num_frames} {name} '
              f'PSNR {row["psnr"]:.2f} dB')
    scores = [{k: v for k, v in row.items() if k != 'frame'} for row in rows]
    summary_ = {'latent': run, 'mean': metrics.mean_metrics(scores),
                'frames': rows}
    if run == runs[0]:
      report.update(summary_)
      report['video'] = video.write_video(panels, out / 'video', fps).name
    else:
      report['without_optimize'] = summary_
  with open(out / 'metrics.json', 'w') as f:
    json.dump(report, f, indent=2)
  return report


def _render_sequence(avatar: Avatar, out: pathlib.Path, prefix: str,
                     c2w: np.ndarray, expressions: np.ndarray,
                     latent: np.ndarray, intrinsics: np.ndarray,
                     background: Optional[np.ndarray], fps: float):
  """Renders frames of given cameras and expressions, with depth, and a video."""
  from nerface_jax import video  # pylint: disable=g-import-not-at-top
  height, width = avatar.meta['height'], avatar.meta['width']
  if background is None:
    background = np.zeros((height, width, 3), np.uint8)
  frames = []
  for n, (pose, expression) in enumerate(zip(c2w, expressions)):
    inputs = FrameInputs(
        c2w=np.asarray(pose, np.float32),
        intrinsics=np.asarray(intrinsics, np.float32),
        expression=np.asarray(expression, np.float32),
        latent=np.asarray(latent, np.float32), background=background)
    result = avatar.render(inputs, height, width)
    image = to_uint8(result['rgb'])
    _save_png(out / f'{prefix}_{n:04d}.png', image)
    _save_png(out / 'depth' / f'{prefix}_{n:04d}.png', depth_image(
        result['depth'], avatar.config.data.near, avatar.config.data.far))
    frames.append(image)
    _report(f'{prefix}: frame {n + 1}/{len(c2w)}')
  return video.write_video(frames, out / prefix, fps)


def render_orbit(avatar: Avatar, out, split: str = 'train', frame: int = 0,
                 num: int = 60, latent: Optional[str] = None,
                 fps: float = 25.0) -> pathlib.Path:
  """Novel views: a yaw/pitch path around the head with frame `frame`'s
  expression (of `split`); the camera starts at the most frontal pose."""
  out = prepare_output(out)
  dataset = load_dataset(avatar, split)
  if not 0 <= frame < dataset.num_frames:
    raise RenderError(f'--frame={frame} is outside the {split} split '
                      f'({dataset.num_frames} frames).')
  centre = head_centre(dataset.c2w)
  front = dataset.c2w[frontal_index(dataset.c2w, centre)]
  poses = orbit_poses(front, centre, num)
  code = _single_code(avatar, split, frame, latent)
  return _render_sequence(
      avatar, out, 'orbit', poses,
      np.tile(dataset.expressions[frame], (num, 1)), code,
      dataset.intrinsics, dataset.background, fps)


def _single_code(avatar: Avatar, split: str, frame: int,
                 latent: Optional[str]) -> np.ndarray:
  if split == 'train' and latent is None and 'latent' in avatar.host_params:
    return np.asarray(avatar.host_params['latent']['gamma'][frame])
  return avatar.latent(latent)


def render_expression(avatar: Avatar, out, coeffs: Sequence[int],
                      low: float = -1.0, high: float = 1.0, num: int = 30,
                      split: str = 'train', frame: int = 0,
                      latent: Optional[str] = None,
                      fps: float = 25.0) -> pathlib.Path:
  """Sweeps expression coefficients `coeffs` from `low` to `high` in the
  pose of frame `frame` (the original's mouth-opening demo)."""
  out = prepare_output(out)
  dataset = load_dataset(avatar, split)
  if not 0 <= frame < dataset.num_frames:
    raise RenderError(f'--frame={frame} is outside the {split} split '
                      f'({dataset.num_frames} frames).')
  expressions = expression_sweep(dataset.expressions[frame], coeffs, low, high,
                                 num)
  return _render_sequence(
      avatar, out, 'expression', np.tile(dataset.c2w[frame], (num, 1, 1)),
      expressions, _single_code(avatar, split, frame, latent),
      dataset.intrinsics, dataset.background, fps)


def render_reenact(avatar: Avatar, out, driving: str,
                   driving_split: str = 'test', neutral: Optional[int] = None,
                   driving_neutral: Optional[int] = None,
                   latent: Optional[str] = None,
                   fps: float = 25.0) -> pathlib.Path:
  """Drives the avatar with another dataset's expressions and head rotations
  (delta transfer around both neutral frames and frontal poses)."""
  out = prepare_output(out)
  target = load_dataset(avatar, 'train')
  try:
    driver = data.load(driving, driving_split, background=False,
                       expr_dim=avatar.expr_dim,
                       expr_origin=f'the avatar (step {avatar.step})')
  except data.DatasetError as e:
    raise RenderError(f'--driving: {e}') from None
  target_centre = head_centre(target.c2w)
  driver_centre = head_centre(driver.c2w)
  expressions, poses = reenactment(
      target.expressions[neutral_index(target.expressions, neutral)],
      target.c2w[frontal_index(target.c2w, target_centre)], target_centre,
      driver.expressions,
      driver.expressions[neutral_index(driver.expressions, driving_neutral)],
      driver.c2w, driver.c2w[frontal_index(driver.c2w, driver_centre)])
  return _render_sequence(avatar, out, 'reenact', poses, expressions,
                          avatar.latent(latent), target.intrinsics,
                          target.background, fps)
