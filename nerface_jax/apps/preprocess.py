"""The flags and main of `preprocess.py` (its usage text is the top-level
script's docstring, which absl shows for --help)."""

import sys

from absl import app
from absl import flags

from nerface_jax import preprocess
from nerface_jax.preprocess import tracking

_DEFAULTS = preprocess.Options()
_VIDEO = flags.DEFINE_string(
    'video', None, 'Video file (mp4, mov, ...) or a folder of images.')
_OUT = flags.DEFINE_string(
    'out', None, 'Dataset folder to create (must be absent or empty).')
_SIZE = flags.DEFINE_integer(
    'size', _DEFAULTS.size, 'Side of the written square images in pixels.')
_TRACKER_MODEL = flags.DEFINE_string(
    'tracker_model', None, 'MediaPipe face_landmarker.task; default '
    f'{tracking.default_model_path()} (download: {tracking.MODEL_URL}).')
_TEST_FRACTION = flags.DEFINE_float(
    'test_fraction', _DEFAULTS.test_fraction,
    'The last fraction of the frames in time becomes the test split.')
_VAL_FRACTION = flags.DEFINE_float(
    'val_fraction', _DEFAULTS.val_fraction,
    'Fraction of the other frames drawn at random for the val split.')
_MAX_FRAMES = flags.DEFINE_integer(
    'max_frames', None, 'Use only the first N frames of the video.')
_BACKGROUND = flags.DEFINE_string(
    'background', _DEFAULTS.background,
    'auto (person masked out, temporal median, inpainting), median, color '
    '(green screen; or color:R,G,B), or file:PHOTO.png (the empty scene).')
_SMOOTH = flags.DEFINE_float(
    'smooth', _DEFAULTS.smooth, 'Gaussian temporal smoothing of poses and '
    'expressions, std in frames (0: off; 1 is light).')
_CROP_MARGIN = flags.DEFINE_float(
    'crop_margin', _DEFAULTS.crop_margin, 'Margin around the head through '
    'all frames, as a fraction of its size (clipped to the frame).')
_SEED = flags.DEFINE_integer('seed', _DEFAULTS.seed, 'Seed of the val draw.')
_DEBUG_FRAMES = flags.DEFINE_integer(
    'debug_frames', _DEFAULTS.debug_frames,
    'Frames with tracking overlays written to OUT/debug/.')
flags.mark_flags_as_required(['video', 'out'])


# Exit status of a user error (bad flag, unusable input, busy output), as
# for a usage error of most command-line tools.
USER_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it.


def _fail(message: str, status: int = USER_ERROR):
  """Ends the program with `message` as one line on stderr."""
  print(f'preprocess.py: error: {" ".join(str(message).split())}',
        file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors shortened to one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e} (--helpshort lists the flags).')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}; every setting is a '
          '--flag=value (--helpshort lists them).')
  try:
    options = preprocess.Options(
        size=_SIZE.value, tracker_model=_TRACKER_MODEL.value,
        test_fraction=_TEST_FRACTION.value, val_fraction=_VAL_FRACTION.value,
        max_frames=_MAX_FRAMES.value, background=_BACKGROUND.value,
        smooth=_SMOOTH.value, crop_margin=_CROP_MARGIN.value,
        seed=_SEED.value, debug_frames=_DEBUG_FRAMES.value)
    # Bad values are refused before the video is even opened.
    options.validate()
    preprocess.preprocess(_VIDEO.value, _OUT.value, options)
  except preprocess.PreprocessError as e:
    # Bad input is the user's to fix: one clear line, no traceback.
    _fail(str(e))
  except OSError as e:
    # The filesystem refused (permissions, a full disk): the message names
    # the path, which is what there is to fix.
    _fail(str(e))
  except KeyboardInterrupt:
    _fail('interrupted; nothing was written to --out.', INTERRUPTED)


def run():
  """The console-script entry point (`nerface-preprocess`)."""
  app.run(main, flags_parser=_parse_flags)
