"""Executes experiments/notebooks/quickstart.ipynb headless; any failing cell fails the test."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'notebooks', 'quickstart.ipynb')


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv('T5LIKE_NOTEBOOK_SKIP_INSTALL', '1')
  monkeypatch.setenv('XLA_FLAGS', '')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                    for o in c.get('outputs', []))
  assert 'restored step 30' in outputs and 'round trip equal: True' in outputs
