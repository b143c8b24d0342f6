"""The package's structure: imports run one way, every module imports alone,
and the enums of the code are the config layer's."""

import ast
from concurrent import futures
import pathlib
import subprocess
import sys
from typing import Optional

from nerface_jax import config_lib
from nerface_jax import losses
from nerface_jax import models
from nerface_jax import parallel

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(root: pathlib.Path,
                 package: str = 'nerface_jax') -> dict[str, set[str]]:
  """{module: package modules it imports anywhere, function bodies too}."""
  paths = {_module_name(p, root): p
           for p in sorted((root / package).rglob('*.py'))}
  graph = {}
  for name, path in paths.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        candidates = [f'{node.module}.{alias.name}' for alias in node.names]
      else:
        continue
      for candidate in candidates:
        # `from nerface_jax import x` names module x; `import a.b.c` a.b.
        while candidate and candidate not in paths:
          candidate = candidate.rpartition('.')[0]
        if candidate and candidate not in (name, package):
          found.add(candidate)
    graph[name] = found
  return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
  """A list of modules that import each other in a ring, or None."""
  state: dict[str, str] = {}

  def visit(name, trail):
    if state.get(name) == 'done':
      return None
    if state.get(name) == 'open':
      return trail[trail.index(name):] + [name]
    state[name] = 'open'
    for dep in sorted(graph.get(name, ())):
      cycle = visit(dep, trail + [name])
      if cycle:
        return cycle
    state[name] = 'done'
    return None

  for name in sorted(graph):
    cycle = visit(name, [])
    if cycle:
      return cycle
  return None


def test_no_module_imports_one_that_imports_it():
  graph = import_graph(REPO)
  # The walk sees the package's real edges.
  assert 'nerface_jax.avatar' in graph['nerface_jax.render_modes']
  assert 'nerface_jax.camera' in graph['nerface_jax.images']
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_walk_finds_a_cycle_hidden_in_a_function(tmp_path):
  package = tmp_path / 'pkg'
  package.mkdir()
  (package / '__init__.py').write_text('')
  (package / 'a.py').write_text('from pkg import b\n')
  (package / 'b.py').write_text('def f():\n  from pkg import a\n')
  (package / 'c.py').write_text('import pkg.a\n')
  graph = import_graph(tmp_path, 'pkg')
  assert graph['pkg.c'] == {'pkg.a'}
  assert find_cycle(graph) in (['pkg.a', 'pkg.b', 'pkg.a'],
                               ['pkg.b', 'pkg.a', 'pkg.b'])
  (package / 'b.py').write_text('')
  assert find_cycle(import_graph(tmp_path, 'pkg')) is None


def _import_alone(name: str) -> tuple[str, int, str]:
  result = subprocess.run(
      [sys.executable, '-c', f'import {name}'], cwd=REPO, capture_output=True,
      text=True, env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'},
      timeout=300, check=False)
  return name, result.returncode, result.stderr[-2000:]


def test_every_module_imports_alone():
  names = sorted(import_graph(REPO))
  with futures.ThreadPoolExecutor(4) as pool:
    failures = [r for r in pool.map(_import_alone, names) if r[1]]
  assert not failures, failures


def test_the_code_uses_the_config_layers_enums():
  assert parallel.MODES == config_lib.CHOICES['parallel.mode']
  assert losses.PRIORS == config_lib.CHOICES['train.latent_prior']
  assert models.EXPR_NORMS == config_lib.CHOICES['model.expr_norm']
  # pylint: disable=protected-access
  assert set(models._DTYPES) == set(config_lib.CHOICES['model.compute_dtype'])
  assert set(models._BACKGROUNDS) == set(
      config_lib.CHOICES['data.background'])
