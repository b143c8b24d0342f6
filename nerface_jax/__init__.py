"""nerface-jax: NeRFace (Gafni et al., CVPR 2021) in JAX and Flax."""

__version__ = '0.1.0'
