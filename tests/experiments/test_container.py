"""Static checks of the Dockerfile (no docker engine here to build it): it installs through the
project's set-up scripts, pins no platform, runs as non-root with a healthcheck that waits."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dockerfile() -> str:
  with open(os.path.join(ROOT, 'Dockerfile')) as f:
    return f.read()


def test_copies_exist_and_setup_scripts_are_used():
  text = _dockerfile()
  with open(os.path.join(ROOT, '.dockerignore')) as f:
    ignored = {l.strip().rstrip('/') for l in f if l.strip()}
  for line in re.findall(r'^COPY (.+)$', text, re.M):
    for src in line.split()[:-1]:
      assert os.path.exists(os.path.join(ROOT, src)), src
      assert src.split('/')[0] not in ignored, f'{src} is excluded by .dockerignore'
  assert 'bash scripts/setup_env.sh serve' in text
  assert 'bash scripts/install_jax.sh "$PLATFORM"' in text


def test_gpu_variant_is_not_pinned_to_cpu_and_runs_as_non_root():
  text = _dockerfile()
  assert 'JAX_PLATFORMS' not in re.sub(r'^#.*$', '', text, flags=re.M)
  assert re.search(r'^USER t5like$', text, re.M)
  assert 'useradd --create-home --uid 10001 t5like' in text
  timeout = int(re.search(r'HEALTHCHECK .*--timeout=(\d+)s', text).group(1))
  probe = float(re.search(r"urlopen\([^)]*timeout=(\d+)\)", text).group(1))
  assert timeout >= 10 and probe < timeout
