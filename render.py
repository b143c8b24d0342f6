r"""Renders a trained avatar (docs/architecture.md, "Command line").

  python render.py --workdir=W --out=O                     # score the test split
  python render.py --workdir=W --out=O --mode=orbit --frame=10
  python render.py --workdir=W --out=O --mode=expression --coeff=0 --range=0,1
  python render.py --workdir=W --out=O --mode=reenact --driving=/data/person_2

Reads W's config and latest checkpoint (or --step).
"""

from nerface_jax.apps import render

if __name__ == '__main__':
  render.run()
