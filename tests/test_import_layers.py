"""The package's import layers (.importlinter) hold: no upward import, no cycle, no kernels in
models/. Function-local imports count too (grimp reads every import statement)."""
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
  exe = shutil.which('lint-imports') or str(pathlib.Path(sys.executable).parent / 'lint-imports')
  proc = subprocess.run([exe, '--no-cache'], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert 'BROKEN' not in proc.stdout and 'kept' in proc.stdout
