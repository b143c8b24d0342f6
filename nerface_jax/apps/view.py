r"""Shows a trained avatar in the browser (README, "Viewer").

  python view.py --workdir=W                      # http://127.0.0.1:8080
  python view.py --workdir=W --port=8081 --step=2000
  python view.py --workdir=W --driving=/data/person_2   # play reenactment

Reads W's config and latest checkpoint (or --step) and serves a viser page:
the avatar rendered from the browser's camera, expression sliders, the
frames of the data, playback, and "Save image" (to W/viewer/). The page is
served on --host (default 127.0.0.1, this machine only); from another
machine use an SSH tunnel: ssh -L 8080:127.0.0.1:8080 HOST.
"""

import logging
import time

from absl import app
from absl import flags

from nerface_jax import avatar as avatar_lib
from nerface_jax import cli
from nerface_jax import viewer as viewer_lib

SPLITS = ('train', 'val', 'test')

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
_PORT = flags.DEFINE_integer(
    'port', 8080, 'Port of the page (the next free one if taken).')
_HOST = flags.DEFINE_string(
    'host', '127.0.0.1', 'Address to serve on: 127.0.0.1 (this machine '
    'only; tunnel to it) or 0.0.0.0 (every network; no password).')
_DRIVING = flags.DEFINE_string(
    'driving', None, 'A dataset folder whose expressions and head motion '
    '"Play" can transfer to the avatar (as render.py --mode=reenact).')
_DRIVING_SPLIT = flags.DEFINE_enum('driving_split', 'test', SPLITS,
                                   'Split of the driving dataset.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not cli.VERBOSE.value:
    # The web server logs every connection.
    logging.getLogger('websockets').setLevel(logging.WARNING)
  avatar = avatar_lib.load(_WORKDIR.value, _STEP.value)
  viewer = viewer_lib.Viewer(avatar, _DRIVING.value, _DRIVING_SPLIT.value)
  server = viewer_lib.ViewerServer(viewer, _HOST.value, _PORT.value)
  port = server.port
  print(f'Viewing {avatar.workdir} (step {avatar.step}) at {server.url}',
        flush=True)
  if _HOST.value in ('127.0.0.1', 'localhost', '::1'):
    print(f'From another machine: ssh -N -L {port}:127.0.0.1:{port} '
          f'<this host>, then open http://localhost:{port}', flush=True)
  print(f'"Save image" writes to {avatar.workdir / viewer_lib.SAVE_DIR}/. '
        'Ctrl-C stops.', flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()


def run():
  """The console-script entry point (`nerface-view`)."""
  app.run(cli.run_main(main, 'view.py'), flags_parser=cli.parse_flags)
