"""Debug images to check a converted video by eye.

The check the original NeRFace author recommended: draw the tracked
landmarks and the projected face mesh over the frames. Here the mesh is the
tracker's canonical face, placed by the WRITTEN camera (c2w, intrinsics), so
a mesh that sits on the face confirms the whole chain from tracker to json,
not just the tracker. Expressions move the landmarks but not the rigid
canonical mesh, so a few pixels of disagreement at the mouth and eyes is
expected; an offset of the whole mesh is a camera bug.
"""

import cv2
import numpy as np

# Colours (RGB).
MESH = (0, 200, 255)
LANDMARK = (60, 255, 60)
BOX = (255, 220, 0)
MASK = (255, 0, 255)
TEXT = (255, 255, 255)


def overlay(image: np.ndarray, landmarks: np.ndarray, mesh: np.ndarray,
            triangles: np.ndarray, bbox: np.ndarray, mask: np.ndarray,
            label: str) -> np.ndarray:
  """Draws tracking results over one frame.

  Args:
    image: uint8 [D, D, 3] RGB frame (the crop at overlay resolution).
    landmarks: float [L, 2] tracked landmarks, (column, row) pixels.
    mesh: float [V, 2] canonical mesh vertices projected by the written
      camera, (column, row) pixels.
    triangles: int [T, 3] mesh triangles.
    bbox: float [4] (h_min, h_max, w_min, w_max) fractions.
    mask: bool [D, D] the person mask the background estimate used.
    label: text written in the corner.

  Returns:
    uint8 [D, D, 3].
  """
  out = np.ascontiguousarray(image.copy())
  size = out.shape[0]
  shift = 4  # Sub-pixel drawing: coordinates in 1/16 pixel.
  scale = 1 << shift
  edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]],
                          triangles[:, [2, 0]]])
  edges = np.unique(np.sort(edges, axis=1), axis=0)
  lines = np.round(mesh[edges] * scale).astype(np.int32)
  cv2.polylines(out, list(lines), False, MESH, 1, cv2.LINE_AA, shift)
  radius = max(1, size // 400)
  for point in np.round(landmarks * scale).astype(np.int32):
    cv2.circle(out, tuple(int(v) for v in point), radius * scale, LANDMARK,
               -1, cv2.LINE_AA, shift)
  h_min, h_max, w_min, w_max = bbox
  cv2.rectangle(out, (int(w_min * size), int(h_min * size)),
                (int(w_max * size) - 1, int(h_max * size) - 1), BOX, 1)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
  cv2.drawContours(out, contours, -1, MASK, 1, cv2.LINE_AA)
  # White text on a black band: legible on any frame.
  font_scale = size / 900
  thickness = max(1, size // 400)
  (text_w, text_h), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX,
                                           font_scale, thickness)
  cv2.rectangle(out, (0, 0), (text_w + 12, text_h + base + 12), (0, 0, 0), -1)
  cv2.putText(out, label, (6, text_h + 6), cv2.FONT_HERSHEY_SIMPLEX,
              font_scale, TEXT, thickness, cv2.LINE_AA)
  return out


def coverage(background: np.ndarray, filled: np.ndarray) -> np.ndarray:
  """The background with estimated-not-observed pixels tinted magenta.

  Args:
    background: uint8 [S, S, 3].
    filled: bool [S, S] pixels inpainted or set to a uniform colour.

  Returns:
    uint8 [S, S, 3].
  """
  out = background.astype(np.float32)
  out[filled] = 0.5 * out[filled] + 0.5 * np.array(MASK, np.float32)
  return np.round(out).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], tile: int = 256,
                  columns: int = 3) -> np.ndarray:
  """Tiles uint8 [D, D, 3] images, each resized to `tile`, in a grid.

  Returns:
    uint8 [rows * tile, columns * tile, 3] (black where the grid is empty).
  """
  rows = -(-len(images) // columns)
  sheet = np.zeros((rows * tile, columns * tile, 3), np.uint8)
  for k, image in enumerate(images):
    r, c = divmod(k, columns)
    sheet[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = cv2.resize(
        image, (tile, tile), interpolation=cv2.INTER_AREA)
  return sheet
