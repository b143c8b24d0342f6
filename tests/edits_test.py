"""Tests of camera paths and expression edits."""

import math

import chex
import numpy as np
import pytest

from nerface_jax import edits
from nerface_jax import scene
from nerface_jax import errors
from nerface_jax import synthetic


def test_reenacting_with_own_data_reproduces_expressions_and_rotations():
  rng = np.random.default_rng(0)
  traj = synthetic.trajectory(20, seed=3)
  c2w, expressions = traj.c2w, traj.expressions
  centre = scene.head_centre(c2w)
  front = edits.frontal_index(c2w, centre)
  neutral = edits.neutral_index(expressions, None)
  assert neutral == int(np.argmin(np.linalg.norm(expressions, axis=1)))
  out_expr, out_c2w = edits.reenactment(
      expressions[neutral], c2w[front], centre, expressions,
      expressions[neutral], c2w, c2w[front])
  chex.assert_trees_all_close(out_expr, expressions.astype(np.float32),
                              atol=1e-6)
  chex.assert_trees_all_close(out_c2w[:, :3, :3],
                              c2w[:, :3, :3].astype(np.float32), atol=1e-5)
  # A driver with an offset neutral moves the target by the difference only.
  shift = rng.normal(size=expressions.shape[1])
  out_expr, _ = edits.reenactment(
      expressions[neutral], c2w[front], centre, expressions + shift,
      expressions[neutral] + shift, c2w, c2w[front])
  chex.assert_trees_all_close(out_expr, expressions.astype(np.float32),
                              atol=1e-5)


def test_head_centre_and_orbit_keep_looking_at_the_head():
  traj = synthetic.trajectory(30, seed=1)
  centre = scene.head_centre(traj.c2w)
  # The synthetic head sits at the origin; the cameras look at about it.
  assert np.linalg.norm(centre) < 0.03
  poses = edits.orbit_poses(traj.c2w[0], centre, 16)
  chex.assert_trees_all_close(poses[0], traj.c2w[0].astype(np.float32),
                              atol=1e-6)
  first_axis = -traj.c2w[0][:3, 2]
  first_offset = centre - traj.c2w[0][:3, 3]
  first_miss = np.linalg.norm(first_offset - first_axis *
                              (first_offset @ first_axis))
  for pose in poses:
    # Rigid, and the optical axis misses the centre by no more than before.
    chex.assert_trees_all_close(pose[:3, :3].T @ pose[:3, :3], np.eye(3),
                                atol=1e-5)
    axis = -pose[:3, 2] / np.linalg.norm(pose[:3, 2])
    offset = centre - pose[:3, 3]
    miss = np.linalg.norm(offset - axis * (offset @ axis))
    assert miss == pytest.approx(first_miss, abs=1e-5)
  yaw = [math.degrees(math.atan2(p[0, 2], p[2, 2])) for p in poses]
  assert max(yaw) - min(yaw) > 30


def test_expression_sweep_sets_only_its_coefficients():
  base = np.arange(5, dtype=np.float32)
  out = edits.expression_sweep(base, [1, 3], -1.0, 1.0, 3)
  np.testing.assert_array_equal(out[:, 1], [-1, 0, 1])
  np.testing.assert_array_equal(out[:, 3], [-1, 0, 1])
  np.testing.assert_array_equal(out[:, [0, 2, 4]], np.tile(base[[0, 2, 4]],
                                                           (3, 1)))
  with pytest.raises(errors.RenderError, match='outside the expression'):
    edits.expression_sweep(base, [5], 0, 1, 2)
  with pytest.raises(errors.RenderError, match='outside'):
    edits.neutral_index(np.zeros((4, 2)), 4)
