"""experiments/notebooks/quickstart.ipynb runs as shipped: every cell headless, the install cell
included (here it finds the checkout); and the install cell's wheel path, in a fresh virtualenv."""
import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'notebooks', 'quickstart.ipynb')


def _outputs(nb) -> str:
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []))


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert 'pip' in nb.cells[1].source and 'REPO_URL' in nb.cells[1].source
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  outputs = _outputs(nb)
  assert 't5like: the checkout this notebook is in' in outputs
  assert 'jax 0.' in outputs and 'device(s)' in outputs
  assert 'restored step 30' in outputs and 'round trip equal: True' in outputs


def test_shipped_notebook_carries_outputs_of_a_run():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.get('outputs') for c in code), 'run the notebook and save it with its outputs'
  assert 'round trip equal: True' in _outputs(nb)
  assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
             for c in code for o in c.outputs)


@pytest.mark.slow
def test_install_cell_installs_the_built_wheel(tmp_path):
  """scripts/build_wheel.sh, then the notebook's first cell in a folder holding the wheel (as in a
  Colab session after an upload), in a fresh virtualenv that sees this one's dependencies."""
  dist = tmp_path / 'session'
  subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'build_wheel.sh'), str(dist)], check=True,
                 capture_output=True)
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  deps = [p for p in sys.path if p.endswith('site-packages')]
  # The dependencies come from this environment; the t5like package must come from the wheel.
  with open(os.path.join(site, 'deps.pth'), 'w') as f:
    f.write('\n'.join(deps) + '\n')
  cell = nbformat.read(NOTEBOOK, as_version=4).cells[1].source
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'XLA_FLAGS', 'T5LIKE_REPO_URL')}
  r = subprocess.run([python, '-c', cell + '\nimport t5like; print("from", t5like.__file__)'],
                     cwd=dist, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 't5like: installed from the wheel t5like-' in r.stdout
  assert f'from {site}' in r.stdout and 'device(s)' in r.stdout
