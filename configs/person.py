"""Configuration of one NeRFace avatar.

Use as `--config=configs/person.py` (the `paper` preset) or
`--config=configs/person.py:demo` / `:tiny`. Override any key on the command
line, e.g. `--config.data.dir=/data/person_1 --config.train.lr=1e-3`; the
config is locked, so a mistyped key is an error.

The presets and every key, with a comment each, live in
`nerface_jax/presets.py`; the allowed values of every key in
`nerface_jax/config_lib.py`. This file stays the path the command line and
the docs name (ml_collections' config_flags loads it by its path).

Presets: paper (the default), demo, fast, tiny; see nerface_jax/presets.py.
"""

from nerface_jax.presets import get_config  # pylint: disable=unused-import
from nerface_jax.presets import PRESETS  # pylint: disable=unused-import

__all__ = ['get_config', 'PRESETS']
