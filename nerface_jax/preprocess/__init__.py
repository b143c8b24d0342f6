"""Raw talking-head video -> NeRFace dataset folder.

  from nerface_jax import preprocess
  report = preprocess.preprocess('me.mp4', 'data/me',
                                 preprocess.Options(size=512))

Modules: `video` (decoding), `tracking` (MediaPipe Face Landmarker and its
canonical mesh), `geometry` (crop, camera, poses, boxes; pure numpy),
`background` (static background estimate), `writer` (splits, json, atomic
output), `debug` (overlays), `pipeline` (the whole conversion).

Needs the packages of requirements-preprocess.txt (MediaPipe, OpenCV); the
training and rendering code never imports this package. `Options` and
`preprocess` are loaded on first use, so that the numpy-only modules
(`geometry`, `writer`) import without OpenCV.
"""

from nerface_jax.preprocess.errors import PreprocessError

__all__ = ['Options', 'PreprocessError', 'preprocess']


def __getattr__(name: str):
  if name in ('Options', 'preprocess'):
    from nerface_jax.preprocess import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
