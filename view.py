r"""Shows a trained avatar in the browser (README, "Viewer").

  python view.py --workdir=W                      # http://127.0.0.1:8080
  python view.py --workdir=W --port=8081 --step=2000
  python view.py --workdir=W --driving=/data/person_2   # play reenactment

Reads W's config and latest checkpoint (or --step); from another machine use
an SSH tunnel: ssh -L 8080:127.0.0.1:8080 HOST.
"""

from nerface_jax.apps import view

if __name__ == '__main__':
  view.run()
