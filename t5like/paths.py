"""Run folders and data paths that may live on cloud storage (`gs://bucket/run`), via `etils.epath`
(what orbax and grain use).

  path = paths.resolve('gs://bucket/run')   # epath.Path; a local path is made absolute
  paths.is_remote('gs://bucket/run')       # True: never `os.path.abspath`ed, never a local folder
  paths.write_atomic(path / 'config.json', text)
  paths.write_bytes_any(path, data)        # whole-object writes on cloud storage

Local paths behave as before; a URI (`gs://`, `s3://`, ...) is kept as it is and every read and
write goes through epath's backend for it (fsspec: gcsfs for gs:// is in the `cloud` extra).
"""
from __future__ import annotations

import os
import re
import uuid

from etils import epath

_URI = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def is_remote(path) -> bool:
  """True for a URI such as gs://bucket/run (anything with a scheme); False for a local path."""
  return bool(_URI.match(os.fspath(path) if not isinstance(path, str) else path))


def as_str(path) -> str:
  """The path as a string: a URI keeps its scheme ('gs://b/x', never '/gs/b/x' or 'gs:/b/x')."""
  return os.fspath(path) if not isinstance(path, str) else path


def resolve(path) -> epath.Path:
  """An epath.Path for `path`: local paths absolute, URIs unchanged."""
  text = as_str(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def write_atomic(path, data: str | bytes) -> None:
  """Writes `data` so that readers see the old or the new content, never a part: a local file via
  a temporary file and rename; an object store writes whole objects anyway (one put)."""
  path = resolve(path)
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(raw)
    return
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
  tmp.write_bytes(raw)
  os.replace(os.fspath(tmp), os.fspath(path))
