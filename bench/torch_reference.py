"""The original NeRFace training step in PyTorch eager: the speed reference.

Written from the facts of docs/architecture.md §4, the way the original PyTorch
code ran a step: ONE training image per step, 2048 of its pixels drawn with
the bbox-weighted probability map, 64 stratified coarse samples, 64 fine
samples by inverse CDF, two MLPs whose input is PE(xyz) ++ expression/3 ++
gamma concatenated to every sample (as the original did; our JAX model adds
the per-ray part once per ray instead), the background as the last sample,
noise on the raw density, MSE(coarse) + MSE(fine) + 0.005 ||gamma_i||, one
Adam step on both networks and the code, and the exponential learning-rate
decay. Everything stays float32, as in the original.

Two liberties, both in the reference's favour: rays are generated only for
the drawn pixels (the original built the whole image's rays every step), and
the networks run on the whole batch at once instead of in chunks.

  python bench/torch_reference.py [--rays 2048] [--repeats 3] [--threads N]

`bench/train_bench.py` imports this module and times it in the same process
as the JAX step, so the ratio is measured side by side.
"""

import argparse
import os
import pathlib
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import person  # pylint: disable=g-import-not-at-top


def positional_encoding(x: torch.Tensor, num_freqs: int,
                        include_input: bool) -> torch.Tensor:
  """[x], sin(x), cos(x), sin(2x), ... as in nerface_jax.encoding.

  Args:
    x: float32 [..., D].
    num_freqs: octaves.
    include_input: whether x itself is the first block.

  Returns:
    float32 [..., D * (include_input + 2 * num_freqs)].
  """
  blocks = [x] if include_input else []
  for k in range(num_freqs):
    blocks += [torch.sin(x * 2.0**k), torch.cos(x * 2.0**k)]
  return torch.cat(blocks, dim=-1)


class NerfaceMLP(nn.Module):
  """One NeRFace radiance field with a per-sample concatenated input.

  Layer for layer the network of docs/architecture.md §4 (and of
  nerface_jax.models.ConditionedMLP): the kernel rows of the first and the
  skip layer are ordered [PE(x), condition, h], the first colour layer's
  [feature, PE(direction)], so JAX parameters load one to one.
  """

  def __init__(self, m, cond_dim: int):
    """Builds the layers.

    Args:
      m: config.model of a preset.
      cond_dim: C, expression length plus gamma length.
    """
    super().__init__()
    self.m = m
    xyz_dim = 3 * (1 + 2 * m.xyz_freqs)
    dir_dim = 3 * 2 * m.dir_freqs if m.use_viewdirs else 0
    in_dim = xyz_dim + cond_dim
    w, cw = m.trunk_width, m.color_width
    fans = []
    for i in range(m.trunk_depth):
      fans.append(in_dim if i == 0 else
                  in_dim + w if i == m.skip_layer else w)
    # nn.Linear's default initialisation is uniform +-1/sqrt(fan_in) for the
    # weight and the bias, the original's (and our) initialisation.
    self.trunk = nn.ModuleList(nn.Linear(f, w) for f in fans)
    self.feature = nn.Linear(w, w)
    self.density = nn.Linear(w, 1)
    self.color = nn.ModuleList(
        [nn.Linear(w + dir_dim, cw)] +
        [nn.Linear(cw, cw) for _ in range(m.color_depth - 1)])
    self.rgb = nn.Linear(cw, 3)

  def forward(self, x: torch.Tensor, dirs: Optional[torch.Tensor]):
    """Evaluates the field.

    Args:
      x: float32 [N, in_dim] PE(xyz) ++ condition of every sample.
      dirs: float32 [N, dir_dim] encoded view direction of every sample.

    Returns:
      rgb float32 [N, 3] in (0, 1) and raw density float32 [N].
    """
    h = x
    for i, layer in enumerate(self.trunk):
      if i == self.m.skip_layer and i > 0:
        h = torch.cat([x, h], dim=-1)
      h = torch.relu(layer(h))
    feature = self.feature(h)
    raw = self.density(feature)[:, 0]
    h = torch.cat([feature, dirs], dim=-1) if dirs is not None else feature
    for layer in self.color:
      h = torch.relu(layer(h))
    return torch.sigmoid(self.rgb(h)), raw


def load_jax_params(mlp: NerfaceMLP, params: Any):
  """Copies the parameters of a JAX ConditionedMLP into `mlp` (in place).

  Args:
    mlp: a NerfaceMLP of the same config.
    params: the ConditionedMLP's parameter dict (kernels [in, out]).
  """
  names = ([(f'trunk_{i}', layer) for i, layer in enumerate(mlp.trunk)] +
           [('feature', mlp.feature), ('density', mlp.density)] +
           [(f'color_{i}', layer) for i, layer in enumerate(mlp.color)] +
           [('rgb', mlp.rgb)])
  with torch.no_grad():
    for name, layer in names:
      kernel = np.asarray(params[name]['kernel'], np.float32)
      layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
      layer.bias.copy_(torch.from_numpy(
          np.array(params[name]['bias'], np.float32)))


def _composite(rgb, raw, t, directions, background, noise_std):
  """Quadrature with the background as the last sample (training mode).

  Args:
    rgb: float32 [R, S, 3]; raw: [R, S]; t: [R, S]; directions: [R, 3];
    background: [R, 3]; noise_std: std of the density noise.

  Returns:
    composited rgb float32 [R, 3] and weights [R, S].
  """
  sigma = torch.relu(raw + noise_std * torch.randn_like(raw))
  dists = torch.cat([t[:, 1:] - t[:, :-1],
                     torch.full_like(t[:, :1], 1e10)], dim=-1)
  dists = dists * directions.norm(dim=-1, keepdim=True)
  alpha = 1.0 - torch.exp(-sigma * dists)
  # The last sample carries the background and absorbs what is left.
  alpha = torch.cat([alpha[:, :-1], torch.ones_like(alpha[:, :1])], dim=-1)
  colours = torch.cat([rgb[:, :-1], background[:, None, :]], dim=1)
  trans = torch.cumprod(
      torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], dim=-1),
      dim=-1)[:, :-1]
  weights = alpha * trans
  return (weights[..., None] * colours).sum(dim=1), weights


def _sample_pdf(bins, weights, num_samples):
  """Inverse-CDF samples of piecewise-constant pdfs (no gradient).

  Args:
    bins: float32 [R, B + 1] edges; weights: [R, B]; num_samples: N.

  Returns:
    float32 [R, N] samples.
  """
  pdf = weights / weights.sum(dim=-1, keepdim=True)
  cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)],
                  dim=-1)
  u = torch.rand(cdf.shape[0], num_samples).contiguous()
  idx = torch.searchsorted(cdf.contiguous(), u, right=True)
  below = (idx - 1).clamp(min=0)
  above = idx.clamp(max=cdf.shape[-1] - 1)
  cdf_lo, cdf_hi = cdf.gather(1, below), cdf.gather(1, above)
  bin_lo, bin_hi = bins.gather(1, below), bins.gather(1, above)
  denom = cdf_hi - cdf_lo
  denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
  return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


class TorchStep:
  """The original's training step over a training set held in host memory.

  Attributes:
    coarse, fine: the NerfaceMLPs.
    latent: float32 [F, L] the per-frame codes (trained).
    optimizer: Adam over both networks and the codes.
  """

  def __init__(self, config, images: np.ndarray, c2w: np.ndarray,
               expressions: np.ndarray, boxes: np.ndarray,
               background: np.ndarray, intrinsics: np.ndarray,
               num_rays: int, seed: int = 0):
    """Sets up networks, codes, optimizer and data tensors.

    Args:
      config: the experiment config (model, render, data, train sections).
      images: uint8 [F, H, W, 3].
      c2w: float32 [F, 4, 4].
      expressions: float32 [F, E].
      boxes: int [F, 4] pixel boxes (row0, row1, col0, col1), ends exclusive.
      background: uint8 [H, W, 3].
      intrinsics: float32 [4] (fx, fy, cx, cy) as in the dataset.
      num_rays: R, rays per step (all from one image).
      seed: seeds torch's generator.
    """
    torch.manual_seed(seed)
    self.config = config
    self.num_rays = num_rays
    m = config.model
    num_frames, height, width = images.shape[:3]
    cond_dim = expressions.shape[1] + m.latent_dim
    self.coarse = NerfaceMLP(m, cond_dim)
    self.fine = NerfaceMLP(m, cond_dim)
    self.latent = torch.zeros(num_frames, m.latent_dim, requires_grad=True)
    self.optimizer = torch.optim.Adam(
        list(self.coarse.parameters()) + list(self.fine.parameters()) +
        [self.latent], lr=config.train.lr)
    self.images = torch.from_numpy(np.ascontiguousarray(images))
    self.c2w = torch.from_numpy(np.asarray(c2w, np.float32))
    self.expressions = torch.from_numpy(np.asarray(expressions, np.float32))
    self.background = torch.from_numpy(np.ascontiguousarray(background))
    self.intrinsics = [float(v) for v in intrinsics]
    # The per-frame sampling maps: bbox_weight inside the box, the rest
    # outside, normalised over the image (built once, like a cached map).
    bw = config.data.bbox_weight
    maps = np.full((num_frames, height, width), 1.0 - bw, np.float32)
    for f, (r0, r1, c0, c1) in enumerate(np.asarray(boxes)):
      maps[f, r0:r1, c0:c1] = bw
    self.maps = torch.from_numpy(maps.reshape(num_frames, -1))
    self.step_count = 0

  def _rays(self, frame: int, pixels: torch.Tensor):
    """Origins and directions float32 [R, 3] of flat pixel indices [R]."""
    height, width = self.images.shape[1:3]
    rows = torch.div(pixels, width, rounding_mode='floor')
    cols = pixels % width
    fx, fy, cx, cy = self.intrinsics
    dirs = torch.stack([(cols - width * cx) / fx, -(rows - height * cy) / fy,
                        -torch.ones_like(cols, dtype=torch.float32)], dim=-1)
    c2w = self.c2w[frame]
    directions = dirs.float() @ c2w[:3, :3].T
    return c2w[:3, 3].expand_as(directions), directions, rows, cols

  def _render(self, mlp, origins, directions, t, cond, dirs_enc, background):
    m = self.config.model
    num_rays, num_samples = t.shape
    points = origins[:, None] + t[..., None] * directions[:, None]
    x = positional_encoding(points, m.xyz_freqs, True)
    # The original appends the condition to every sample's input.
    x = torch.cat([x, cond[:, None].expand(num_rays, num_samples, -1)], -1)
    d = (dirs_enc[:, None].expand(num_rays, num_samples, -1).reshape(
        num_rays * num_samples, -1) if dirs_enc is not None else None)
    rgb, raw = mlp(x.reshape(num_rays * num_samples, -1), d)
    return _composite(rgb.view(num_rays, num_samples, 3),
                      raw.view(num_rays, num_samples), t, directions,
                      background, self.config.render.noise_std)

  def __call__(self) -> float:
    """One training step; returns the loss."""
    config, m, r = self.config, self.config.model, self.config.render
    frame = int(torch.randint(self.images.shape[0], ()))
    pixels = torch.multinomial(self.maps[frame], self.num_rays,
                               replacement=False)
    origins, directions, rows, cols = self._rays(frame, pixels)
    target = self.images[frame, rows, cols].float() / 255.0
    background = self.background[rows, cols].float() / 255.0
    gamma = self.latent[frame]
    cond = torch.cat([self.expressions[frame] * m.expr_scale, gamma])
    cond = cond[None].expand(self.num_rays, -1)
    viewdirs = directions / directions.norm(dim=-1, keepdim=True)
    dirs_enc = (positional_encoding(viewdirs, m.dir_freqs, False)
                if m.use_viewdirs else None)

    near, far = config.data.near, config.data.far
    t = torch.linspace(near, far, r.num_coarse).expand(self.num_rays, -1)
    mids = 0.5 * (t[:, 1:] + t[:, :-1])
    lower = torch.cat([t[:, :1], mids], -1)
    upper = torch.cat([mids, t[:, -1:]], -1)
    t = lower + (upper - lower) * torch.rand_like(t)
    rgb_c, weights = self._render(self.coarse, origins, directions, t, cond,
                                  dirs_enc, background)
    with torch.no_grad():
      bins = 0.5 * (t[:, 1:] + t[:, :-1])
      t_fine = _sample_pdf(bins, weights[:, 1:-1] + 1e-5, r.num_fine)
      t_all, _ = torch.sort(torch.cat([t, t_fine], -1), dim=-1)
    rgb_f, _ = self._render(self.fine, origins, directions, t_all, cond,
                            dirs_enc, background)
    loss = (torch.mean((rgb_c - target)**2) + torch.mean((rgb_f - target)**2)
            + config.train.latent_reg * gamma.norm())
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    self.step_count += 1
    lr = config.train.lr * config.train.lr_decay_rate**(
        self.step_count / config.train.lr_decay_steps)
    for group in self.optimizer.param_groups:
      group['lr'] = lr
    return float(loss.detach())


def time_step(step: TorchStep, repeats: int) -> list[float]:
  """Wall seconds of `repeats` steps after one warm-up step."""
  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='paper', choices=person.PRESETS)
  parser.add_argument('--rays', type=int, default=None,
                      help='rays per step (default: the preset batch)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=None,
                      help='torch intra-op threads (default: torch default)')
  parser.add_argument('--frames', type=int, default=16)
  parser.add_argument('--size', type=int, default=512)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  config = person.get_config(args.preset)
  num_rays = args.rays or config.train.batch_rays
  from bench import train_bench  # pylint: disable=g-import-not-at-top
  host = train_bench.synthetic_host_data(args.frames, args.size)
  step = TorchStep(config, host.images, host.c2w, host.expressions,
                   host.boxes, host.background, host.intrinsics, num_rays)
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
        f'{os.cpu_count()} cpus; {args.preset}: {num_rays} rays')
  load = os.getloadavg()[0]
  times = time_step(step, args.repeats)
  best = min(times)
  print(f'step: best {best:.3f} s of {args.repeats} '
        f'({", ".join(f"{t:.2f}" for t in times)}), '
        f'{num_rays / best:,.0f} rays/s, load {load:.2f}')


if __name__ == '__main__':
  main()
