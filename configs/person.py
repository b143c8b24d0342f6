"""Configuration of one NeRFace avatar.

Use as `--config=configs/person.py` (the `paper` preset) or
`--config=configs/person.py:demo` / `:tiny`. Override any key on the command
line, e.g. `--config.data.dir=/data/person_1 --config.train.lr=1e-3`; the
config is locked, so a mistyped key is an error.

The presets and every key, with a comment each, live in
`nerface_jax/presets.py`; the allowed values of every key in
`nerface_jax/config_lib.py`. This file stays the path the command line and
the docs name (ml_collections' config_flags loads it by its path).

Presets:
  paper  the original NeRFace numbers (400k steps of 2048 rays, 64+64 samples,
         two 0.55M-parameter networks). Set `data.dir` to a NeRFace dataset.
  demo   the built-in synthetic person at 64x64, sized so a 2-core CPU
         trains a recognisable avatar in about ten minutes.
  tiny   a few seconds end to end; used by the tests.
"""

from nerface_jax.presets import get_config  # pylint: disable=unused-import
from nerface_jax.presets import PRESETS  # pylint: disable=unused-import

__all__ = ['get_config', 'PRESETS']
