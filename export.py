r"""Exports a trained avatar as a triangle mesh (README, "Meshes").

  python export.py --workdir=W --out=O                       # training frame 0
  python export.py --workdir=W --out=O --frame=10 --resolution=256
  python export.py --workdir=W --out=O --expression=expr.npy  # or a,b,c,...
  python export.py --workdir=W --out=O --coeff=0 --range=0,1 --frames=5

Writes O/mesh.ply, O/mesh.obj and O/mesh.png (a shaded preview), or one
sweep_<n> triple per step of a sweep, and O/export.json. Reads W's config and
latest checkpoint (or --step).
"""

from nerface_jax.apps import export

if __name__ == '__main__':
  export.run()
