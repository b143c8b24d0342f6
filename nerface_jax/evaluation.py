"""Scoring rendered frames against their images: the one evaluation path.

The training loop's val scores, `render.py --mode=split`'s metrics.json and
every benchmark call `score_frames`, which scores exactly what is written to
disk: the prediction quantised to uint8. So the numbers in logs, in
metrics.json and in benchmark tables agree.
"""

import pathlib
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nerface_jax import data
from nerface_jax import images
from nerface_jax import metrics
from nerface_jax import renderer

# on_frame(index, name, rendered, prediction uint8 [H, W, 3], row).
FrameCallback = Callable[[int, str, dict[str, np.ndarray], np.ndarray,
                          dict[str, Any]], None]


def frame_name(dataset: data.Dataset, index: int) -> str:
  """The image name of frame `index` (its file_path's basename)."""
  return pathlib.PurePosixPath(dataset.file_paths[index]).name


def score_frames(render: renderer.Renderer, dataset: data.Dataset,
                 codes: np.ndarray,
                 frames: Optional[Sequence[int]] = None,
                 on_frame: Optional[FrameCallback] = None) -> dict[str, Any]:
  """Renders frames of `dataset` with given codes and scores them.

  Args:
    render: the Renderer (model and parameters).
    dataset: frames with their images (the truth).
    codes: float32 [F, L] one code per frame of `dataset`, or [L] one code
      for all.
    frames: indices to score (default: all).
    on_frame: called after each frame with what was rendered (for writing
      images and progress).

  Returns:
    {'mean': {metric: float}, 'frames': [{'frame': name, metric: float}]}
    with the metrics of `metrics.image_metrics` (face box included) on the
    uint8 prediction.
  """
  frames = range(dataset.num_frames) if frames is None else frames
  codes = np.asarray(codes, np.float32)
  if codes.ndim == 1:
    codes = np.broadcast_to(codes, (dataset.num_frames,) + codes.shape)
  rows = []
  for index in frames:
    result = render(renderer.dataset_inputs(dataset, index, codes[index]),
                    dataset.height, dataset.width)
    prediction = images.to_uint8(result['rgb'])
    name = frame_name(dataset, index)
    row = {'frame': name, **metrics.image_metrics(
        prediction, dataset.images[index], dataset.bboxes[index])}
    rows.append(row)
    if on_frame is not None:
      on_frame(index, name, result, prediction, row)
  scores = [{k: v for k, v in row.items() if k != 'frame'} for row in rows]
  return {'mean': metrics.mean_metrics(scores), 'frames': rows}
