"""scripts/aot_compile.py compiles the experiment's own train step (--config with main.py's
overrides) on fake devices and compares the per-device peak with a chip's memory."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AOT = os.path.join(ROOT, 'scripts', 'aot_compile.py')
TINY = os.path.join(ROOT, 'experiments', 'configs', 'shakespeare.py') + ':tiny'


def _run(tmp_path, *args):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  return subprocess.run([sys.executable, AOT, *args], capture_output=True, text=True, env=env,
                        timeout=600, cwd=tmp_path)


def test_needs_exactly_one_of_config_and_variant(tmp_path):
  r = _run(tmp_path, f'--config={TINY}', '--variant=t5_tiny')
  assert r.returncode != 0 and 'exactly one of --config' in r.stderr
  r = _run(tmp_path, f'--config={TINY}', '--config.mesh.fsdpp=2')
  assert r.returncode != 0 and 'fsdpp' in r.stderr


@pytest.mark.slow
def test_config_with_overrides_against_chip_memory(tmp_path):
  out = tmp_path / 'aot.json'
  r = _run(tmp_path, f'--config={TINY}', '--config.mesh.data=2', '--config.mesh.fsdp=2',
           '--config.mesh.rules=fsdp', '--config.data.batch_size=4',
           '--config.data.vocab_size=600', '--config.optim.name=adafactor', '--devices=4',
           "--device_kind=TPU v5 lite", f'--out={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['config'] and report['devices'] == 4
  assert report['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1, 'stage': 1}
  assert report['batch_size'] == 4 and report['optimizer'] == 'adafactor'
  assert report['inputs_length'] == 64   # the tiny config's, with span-corruption targets
  # The vocabulary the run's tokenizer gives: 600 pieces + 100 sentinels, rounded up to 768.
  from t5like.config import get_variant
  from t5like.models import abstract_params, param_count
  assert report['param_count'] == param_count(abstract_params(
      get_variant('t5_tiny', vocab_size=768)))
  assert report['device_memory'] == {'kind': 'TPU v5e', 'bytes': 16 * 2**30,
                                     'source': 'published'}
  peak = report['memory_per_device']['peak']
  assert report['fits_device'] and report['peak_fraction_of_device'] == round(peak / 2**34, 4)
  assert "of TPU v5e's 16.0 GiB" in r.stderr
