"""Workdirs on cloud storage: every workdir file goes through etils.epath, and a gs:// path is never
turned into a local folder. gs:// is served here by fsspec's in-memory filesystem (registered for
the gs / gcs protocols, which is what epath asks fsspec for), so the real code path runs offline."""
import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from t5like import paths
from t5like.data import corpus as corpus_lib
from t5like.data import tokenizer as tokenizer_lib
from t5like.train import metrics as metrics_lib


class FakeGCS(MemoryFileSystem):
  protocol = ('gs', 'gcs')
  root_marker = ''
  store: dict = {}
  pseudo_dirs = ['']


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// in memory; the test runs in an empty local folder, to see that nothing lands there."""
  for proto in ('gs', 'gcs'):
    fsspec.register_implementation(proto, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = ['']
  monkeypatch.chdir(tmp_path)
  yield FakeGCS
  FakeGCS.store.clear()
  assert os.listdir(tmp_path) == [], 'a gs:// path was written to a local folder'


def test_uris_are_never_local_paths():
  assert paths.is_remote('gs://bucket/run') and paths.is_remote('s3://b/x')
  assert not paths.is_remote('runs/x') and not paths.is_remote('/abs/runs')
  assert paths.as_str(paths.resolve('gs://bucket/run') / 'checkpoints') == 'gs://bucket/run/checkpoints'
  assert paths.as_str(paths.resolve('runs/x')) == os.path.abspath('runs/x')
  # os.path.abspath is what must never see a URI: it would make a local 'gs:' folder.
  assert os.path.abspath('gs://bucket/run') != 'gs://bucket/run'


def test_metrics_tensorboard_and_plot_on_gcs(fake_gcs):
  w = metrics_lib.MetricsWriter('gs://bucket/run', enabled=True)
  for step in (10, 20, 30):
    w.write(step, {'loss': 5.0 - step / 10, 'tokens': 100.0})
  w.write(30, {'loss': 4.5}, 'eval')
  w.close()
  assert w.path == 'gs://bucket/run/metrics.jsonl'
  records = metrics_lib.read_jsonl(w.path)
  assert [r['step'] for r in records] == [10, 20, 30, 30]
  events = [k for k in fake_gcs.store if k.startswith('gs://bucket/run/tensorboard/events.out')]
  assert len(events) == 1 and len(fake_gcs.store[events[0]].getvalue()) > 100
  png = metrics_lib.plot_curves(w.path, 'gs://bucket/run/curves.png')
  assert fake_gcs.store[png].getvalue()[:4] == b'\x89PNG'
  # A resumed run at step 20 drops what was written after its checkpoint.
  w = metrics_lib.MetricsWriter('gs://bucket/run', resume_step=20, enabled=True)
  w.write(30, {'loss': 1.0})
  w.close()
  assert [(r['step'], r['loss']) for r in metrics_lib.read_jsonl(w.path)][-2:] == [(20, 3.0),
                                                                                  (30, 1.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics_lib.MetricsWriter(str(tmp_path / 'run'), enabled=False)
  assert w.write(5, {'loss': np.float32(2.0)}) == {'step': 5, 'split': 'train', 'loss': 2.0}
  w.close()
  assert not (tmp_path / 'run').exists()


def test_tokenizer_trained_into_and_reused_from_gcs(fake_gcs):
  docs = [corpus_lib.Document(d.name, d.text[:12_000])
          for d in corpus_lib.shakespeare_documents()[:4]]
  tok = tokenizer_lib.load_or_train(docs, 'gs://bucket/run', vocab_size=600, max_sentences=1000)
  saved = [k for k in fake_gcs.store if k.startswith('gs://bucket/run/tokenizer/spm_')]
  assert len(saved) == 1 and saved[0].endswith('.model') and tok.source == saved[0]
  again = tokenizer_lib.load_or_train(docs, 'gs://bucket/run', vocab_size=600, max_sentences=1000)
  assert again.model_proto == tok.model_proto
  assert tokenizer_lib.Tokenizer.from_file(saved[0]).encode('line 3') == tok.encode('line 3')


def test_corpus_folder_on_gcs(fake_gcs):
  from t5like import paths as paths_lib
  root = paths_lib.resolve('gs://bucket/texts')
  for name, text in (('b/two.txt', 'second\n'), ('a/one.txt', 'first\n'), ('skip.md', 'no'),
                     ('z.txt', 'top\n')):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  docs = corpus_lib.load_documents('gs://bucket/texts')
  # os.walk's order, as for a local folder: a folder's files, then its subfolders.
  assert [(d.name, d.text) for d in docs] == [('z.txt', 'top\n'), ('a/one.txt', 'first\n'),
                                              ('b/two.txt', 'second\n')]
  names, stream = corpus_lib.stream_documents('gs://bucket/texts')
  assert names == ['z.txt', 'a/one.txt', 'b/two.txt'] and len(list(stream)) == 3
  with pytest.raises(corpus_lib.CorpusError, match='does not exist'):
    corpus_lib.load_documents('gs://bucket/nothing')


@pytest.mark.slow
def test_training_run_with_a_gcs_workdir(fake_gcs, monkeypatch, tmp_path_factory):
  """loop.train with --workdir=gs://...: config, tokenizer, metrics, TensorBoard, curves and
  summary land in the bucket. orbax writes arrays through tensorstore's own GCS driver, which
  cannot be served from memory here, so its folder is redirected to a local one, after checking
  that orbax is handed the gs:// path unchanged."""
  from t5like.config import DataConfig, OptimConfig, TrainConfig, get_variant
  from t5like.train import checkpoint as ckpt_lib, loop
  local = tmp_path_factory.mktemp('orbax')
  given = []

  class LocalOrbax(ckpt_lib.Checkpointer):
    def __init__(self, directory, **kw):
      given.append(directory)
      super().__init__(str(local / directory.split('://', 1)[1]), **kw)

  monkeypatch.setattr(loop.ckpt_lib, 'Checkpointer', LocalOrbax)
  cfg = TrainConfig(model=get_variant('t5_tiny'),
                    data=DataConfig(vocab_size=600, tokenizer_max_sentences=5000,
                                    inputs_length=32, batch_size=8),
                    optim=OptimConfig(learning_rate=3e-3, warmup_steps=1), num_steps=4,
                    log_every=2, eval_every=4, eval_batches=1, checkpoint_every=2,
                    num_samples=0, async_checkpointing=False)
  summary = loop.train(cfg, 'gs://bucket/run', print_fn=lambda line: None)
  assert given == ['gs://bucket/run/checkpoints']
  assert summary['workdir'] == 'gs://bucket/run' and summary['final_step'] == 4
  assert summary['metrics_file'] == 'gs://bucket/run/metrics.jsonl'
  keys = set(fake_gcs.store)
  for name in ('config.json', 'metrics.jsonl', 'curves.png', 'summary.json'):
    assert f'gs://bucket/run/{name}' in keys, name
  assert any(k.startswith('gs://bucket/run/tokenizer/spm_') for k in keys)
  assert any(k.startswith('gs://bucket/run/tensorboard/events.out') for k in keys)
  saved = json.loads(fake_gcs.store['gs://bucket/run/summary.json'].getvalue())
  assert saved['final_step'] == 4 and saved['latest_checkpoint'] == 4
  # Resuming reads the bucket's metrics back and continues the same file.
  summary = loop.train(cfg.__class__(**{**cfg.__dict__, 'num_steps': 6}), 'gs://bucket/run',
                       print_fn=lambda line: None)
  assert summary['start_step'] == 4 and summary['final_step'] == 6
  steps = [r['step'] for r in metrics_lib.read_jsonl('gs://bucket/run/metrics.jsonl')
           if r['split'] == 'train']
  assert steps == [2, 4, 6]
