"""A failed load never takes down what is serving; incomplete folders wait; readiness at start-up
is per model and honest; bundles are readable by other users."""
import json
import os
import shutil
import stat

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from t5like.serve import bundle
from t5like.serve.app import create_app
from t5like.serve.registry import ModelRegistry
from tests.serve.conftest import ADMIN_TOKEN, ENGINE_KW, ServerThread, tiny_params, wait_until

AUTH = {'Authorization': f'Bearer {ADMIN_TOKEN}'}


def rewrite_manifest(folder):
  """Makes bundle.json list the folder's current file sizes (a bad bundle that is complete)."""
  meta = json.loads((folder / 'bundle.json').read_text())
  meta['files'] = {f: (folder / f).stat().st_size for f in meta['files']}
  (folder / 'bundle.json').write_text(json.dumps(meta))


def truncated(f):
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def random_params_file(f):
  f.write_bytes(os.urandom(f.stat().st_size))


def config_wrong_type(f):
  f.write_text(json.dumps({**json.loads(f.read_text()), 'd_model': 'sixty-four'}))


def config_wrong_value(f):
  f.write_text(json.dumps({**json.loads(f.read_text()), 'num_heads': 3}))


def config_not_object(f):
  f.write_text('[1, 2, 3]')


def broken_tokenizer(f):
  f.write_bytes(b'\x00not a sentencepiece model' * 10)


def future_format(f):
  f.write_text(json.dumps({**json.loads(f.read_text()), 'format_version': 99}))


# (case, file to break, how, manifest rewritten so the folder is complete, expected HTTP, kind)
BROKEN = [
    ('truncated params', 'params.safetensors', truncated, False, 409, 'incomplete'),
    ('random params', 'params.safetensors', random_params_file, True, 422, 'invalid'),
    ('config of wrong type', 'config.json', config_wrong_type, True, 422, 'invalid'),
    ('config of wrong value', 'config.json', config_wrong_value, True, 422, 'invalid'),
    ('config not an object', 'config.json', config_not_object, True, 422, 'invalid'),
    ('broken tokenizer', 'tokenizer.model', broken_tokenizer, True, 422, 'invalid'),
    ('unknown format version', 'bundle.json', future_format, False, 422, 'invalid'),
]


@pytest.fixture(scope='module')
def server(tmp_path_factory, base_path):
  root = tmp_path_factory.mktemp('versions')
  shutil.copytree(base_path / 'tiny' / '1', root / 'm' / '1')
  registry = ModelRegistry(str(root), engine_kwargs=ENGINE_KW, drain_timeout_s=2.0)
  registry.reload()
  with ServerThread(create_app(registry, admin_token=ADMIN_TOKEN)) as srv:
    srv.registry, srv.root, srv.src = registry, root, base_path / 'tiny' / '2'
    srv.client = httpx.Client(base_url=srv.url, timeout=60)
    yield srv
    srv.client.close()
  registry.close()


def answers(srv, version):
  r = srv.client.post('/v1/completions', json={'model': 'm', 'prompt': [5, 6, 7, 1],
                                               'max_tokens': 3, 'temperature': 0})
  assert r.status_code == 200, r.text
  assert srv.registry.get('m').version == version
  return r.json()


def failures(srv, kind):
  text = srv.client.get('/metrics').text
  return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == 't5like_model_load_failures_total' and s.labels['kind'] == kind)


@pytest.mark.parametrize('case,fname,breaker,complete,status,kind', BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_bad_version_never_replaces_the_serving_one(server, case, fname, breaker, complete, status,
                                                     kind):
  answers(server, 1)
  folder = server.root / 'm' / '2'
  shutil.rmtree(folder, ignore_errors=True)
  shutil.copytree(server.src, folder)
  breaker(folder / fname)
  if complete:
    rewrite_manifest(folder)
  before = failures(server, kind)
  # Found by a policy reload (the admin call, as polling does): the version fails, the call says
  # so, version 1 keeps serving.
  r = server.client.post('/admin/reload', headers=AUTH)
  assert r.status_code == status and 'version 2' in r.json()['error']['message'], r.text
  answers(server, 1)
  st = server.client.get('/v1/models/m').json()
  v2 = next(s for s in st['model_version_status'] if s['version'] == '2')
  assert v2['state'] == ('START' if kind == 'incomplete' else 'END'), st
  assert v2['status']['error_message'], st
  assert str(server.root) not in json.dumps(st)          # no filesystem path for clients
  assert failures(server, kind) == before + 1
  # Not retried while the folder is unchanged.
  assert server.registry.reload() == []
  assert failures(server, kind) == before + 1
  # An explicit admin load of it is an error naming the problem, not 200.
  r = server.client.post('/admin/models/m/load', headers=AUTH, json={'version': 2})
  assert r.status_code == status, r.text
  err = r.json()['error']
  assert 'version 2' in err['message'] and 'serving: [1]' in err['message']
  answers(server, 1)
  shutil.rmtree(folder)


def test_incomplete_folder_waits_until_complete(server):
  answers(server, 1)
  folder = server.root / 'm' / '3'
  folder.mkdir()                                   # an empty folder: not a failure of version 1
  server.registry.reload()
  answers(server, 1)
  r = server.client.post('/admin/models/m/load', headers=AUTH, json={'version': 3})
  assert r.status_code == 409 and 'bundle.json' in r.json()['error']['message']
  # Half copied: the manifest is there but the params are not all there yet.
  for f in ('bundle.json', 'config.json', 'tokenizer.model'):
    shutil.copy(server.src / f, folder / f)
  data = (server.src / 'params.safetensors').read_bytes()
  (folder / 'params.safetensors').write_bytes(data[:len(data) // 3])
  server.registry.reload()
  answers(server, 1)
  st = {s['version']: s for s in server.client.get('/v1/models/m').json()['model_version_status']}
  assert 'still being copied' in st['3']['status']['error_message']
  # The copy completes: the next reload serves it and retires version 1 (latest-1 policy).
  (folder / 'params.safetensors').write_bytes(data)
  server.registry.reload()
  answers(server, 3)
  st = server.client.get('/v1/models/m').json()['model_version_status']
  st = {s['version']: s['state'] for s in st}
  assert st['3'] == 'AVAILABLE' and st['1'] == 'END'


def test_readiness_at_startup_is_per_model(tmp_path, base_path):
  shutil.copytree(base_path / 'dec' / '1', tmp_path / 'good' / '1')
  (tmp_path / 'broken' / '1').mkdir(parents=True)   # never completes
  registry = ModelRegistry(str(tmp_path), engine_kwargs=ENGINE_KW)
  app = create_app(registry, load_on_startup=True)
  with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
    r = c.get('/health/ready')
    assert r.status_code == 503 and c.get('/health/live').status_code == 200
    wait_until(lambda: registry.startup_models is not None, timeout=120)
    r = c.get('/health/ready')
    body = r.json()
    assert r.status_code == 503 and 'broken' in body['reason'], body
    assert body['models']['good']['ready'] is True and body['models']['broken']['ready'] is False
    assert c.get('/health').status_code == 503
    assert c.get('/v1/models/good').json()['ready'] is True
    assert c.get('/v1/models/broken').json()['ready'] is False
    # The broken model's folder is removed: still not ready, it was configured at start-up.
    shutil.rmtree(tmp_path / 'broken')
    assert c.get('/health/ready').status_code == 503
  registry.close()


def test_ready_once_every_startup_model_is_available(tmp_path, base_path):
  for name in ('a', 'b'):
    shutil.copytree(base_path / 'dec' / '1', tmp_path / name / '1')
  registry = ModelRegistry(str(tmp_path), engine_kwargs=ENGINE_KW)
  app = create_app(registry, load_on_startup=True)
  with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
    wait_until(lambda: c.get('/health/ready').status_code == 200, timeout=120)
    assert registry.startup_models == ('a', 'b')
    assert all(m['ready'] for m in c.get('/health').json()['models'].values())
    # An engine thread that died makes the model, and the server, not ready.
    engine = registry.get('a').engine
    engine._stop.set()
    engine._wake.set()
    engine._thread.join(10)
    r = c.get('/health/ready')
    assert r.status_code == 503 and r.json()['models']['a']['ready'] is False
  registry.close()


def test_bundle_files_are_readable_by_others(tmp_path, serve_tokenizer):
  params, cfg = tiny_params('decoder_tiny', 3)
  old = os.umask(0o022)
  try:
    out = bundle.export_bundle(params, cfg, serve_tokenizer, str(tmp_path / 'x' / '1'))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  for f in os.listdir(out):
    assert stat.S_IMODE(os.stat(os.path.join(out, f)).st_mode) == 0o644, f
  meta = bundle.check_complete(out)
  assert set(meta['files']) == {'params.safetensors', 'config.json', 'tokenizer.model'}


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their mode')
def test_permission_problem_is_named(tmp_path, base_path):
  folder = tmp_path / 'p' / '1'
  shutil.copytree(base_path / 'dec' / '1', folder)
  os.chmod(folder / 'params.safetensors', 0o200)
  with pytest.raises(bundle.BundleError, match='permission denied'):
    bundle.load_bundle(str(folder))
