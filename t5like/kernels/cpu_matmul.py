"""Decoding matmuls on CPU against panel-packed weights, through XLA FFI (see cpu_matmul.cc).

A decoding step multiplies a few rows (one token per sequence) by every weight of the decoder.
That streams the weights, and XLA:CPU's dot streams a row-major [K, N] weight at a fraction of the
memory bandwidth once there is more than one row. `pack` stores a weight as contiguous panels
[N / 32, K, 32], in a `PackedKernel` of the same shape (so it sits in a parameter tree where the
weight was); the CPU decode backend (t5like/infer/backend.py) multiplies by it with the kernel
here when the rows number at most MAX_ROWS, and unpacks it for XLA otherwise, so a packed weight
is never misread.

Where the kernels cannot be built (t5like/kernels/library.py), `available()` is False and the
backend packs nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t5like.kernels import library
from t5like.kernels.library import available, unavailable_reason, usable  # noqa: F401

MAX_ROWS = 32
PANEL = 32
_TARGET = 't5like_matmul_packed'


@jax.tree_util.register_pytree_node_class
class PackedKernel:
  """A weight as panels [N / 32, K, 32], held in an array of the original weight's shape.

  `transposed` says the original is [N, K] (a tied embedding [V, D], used as x @ E^T) rather than
  [K, N] (a projection kernel whose leading dims, `contract_dims` of them, are contracted).
  """

  def __init__(self, data, k: int, n: int, transposed: bool = False):
    self.data, self.k, self.n, self.transposed = data, k, n, transposed

  def tree_flatten(self):
    return (self.data,), (self.k, self.n, self.transposed)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  @property
  def shape(self):
    return self.data.shape

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def nbytes(self):
    return self.data.nbytes

  def panels(self):
    return self.data.reshape(self.n // PANEL, self.k, PANEL)

  def unpacked(self):
    """The original weight (a transposing copy: for the odd call that cannot use the kernel)."""
    p = self.panels()
    if self.transposed:
      return p.transpose(0, 2, 1).reshape(self.data.shape)
    return p.transpose(1, 0, 2).reshape(self.data.shape)

  def rows(self, ids):
    """Rows `ids` of a transposed (embedding) weight: table[ids] -> ids.shape + (K,)."""
    if not self.transposed:
      raise ValueError('rows() reads a packed embedding; this kernel is not transposed')
    return self.panels()[ids // PANEL, :, ids % PANEL]

  def __repr__(self):
    return f'PackedKernel(shape={self.shape}, k={self.k}, n={self.n}, transposed={self.transposed})'


def pack(w, contract_dims: int = 1, transposed: bool = False) -> PackedKernel:
  """Packs w ([K..., N...] with `contract_dims` leading contracted dims, or [N, K] if
  `transposed`) into panels; N must be a multiple of 32."""
  if isinstance(w, PackedKernel):
    return w
  if transposed:
    if w.ndim != 2:
      raise ValueError(f'pack: a transposed weight must be 2-D [N, K], got {w.shape}')
    n, k = w.shape
  else:
    k, n = int(np.prod(w.shape[:contract_dims])), int(np.prod(w.shape[contract_dims:]))
  if n % PANEL:
    raise ValueError(f'pack: {n} output columns of a {w.shape} weight are not a multiple of '
                     f'{PANEL}')
  if transposed:
    panels = w.reshape(n // PANEL, PANEL, k).transpose(0, 2, 1)
  else:
    panels = w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)
  return PackedKernel(jnp.asarray(panels).reshape(w.shape), k, n, transposed)


def packable(w) -> bool:
  """Whether `pack` should be applied to this array here: float32 on one CPU device, kernels
  built."""
  if isinstance(w, PackedKernel) or not hasattr(w, 'dtype') or w.dtype != jnp.float32:
    return False
  sharding = getattr(w, 'sharding', None)
  if sharding is None or len(sharding.device_set) != 1:
    return False
  if next(iter(sharding.device_set)).platform != 'cpu':
    return False
  return available()


def wanted(x: jax.Array, w) -> bool:
  """Whether `matmul(x, w)` applies here (at trace time): w packed, x float32 with at most
  MAX_ROWS rows, no mesh in context, kernels built (`library.usable`)."""
  if not isinstance(w, PackedKernel) or x.dtype != jnp.float32:
    return False
  return int(np.prod(x.shape[:-1])) <= MAX_ROWS and library.usable()


def matmul(x: jax.Array, w: PackedKernel) -> jax.Array:
  """x [..., K] @ W -> [..., N] float32, for a packed W (K contracted, N output columns)."""
  return matmul_fused(x, [w])[0]


def matmul_fused(x: jax.Array, ws) -> list[jax.Array]:
  """[x @ W for W in ws] in one kernel call (one parallel loop over all their panels)."""
  ws = list(ws)
  for w in ws:
    if x.shape[-1] != w.k:
      raise ValueError(f'matmul: x {x.shape} does not match a packed weight with K={w.k}')
  lead = x.shape[:-1]
  M = int(np.prod(lead))
  if not 1 <= M <= MAX_ROWS:
    raise ValueError(f'matmul: x has {M} rows; the kernel takes 1 to {MAX_ROWS}')
  if not available():
    raise RuntimeError(f'CPU kernels unavailable: {unavailable_reason()}')
  call = jax.ffi.ffi_call(_TARGET, [jax.ShapeDtypeStruct((M, w.n), jnp.float32) for w in ws],
                          vmap_method='sequential')
  outs = call(x.reshape(M, x.shape[-1]).astype(jnp.float32), *(w.panels() for w in ws))
  return [y.reshape(*lead, w.n) for y, w in zip(outs, ws)]


# ----------------------------------------------------------------------------- quantised weights

QUANT_SCHEMES = ('int8', 'int4')
_QUANT_TARGETS = {'int8': 't5like_matmul_q8', 'int4': 't5like_matmul_q4'}


@jax.tree_util.register_pytree_node_class
class PackedQuantKernel:
  """A stored int8 / int4 weight as panels, with its scales, for `matmul_quant` (cpu_matmul_q.cc).

  `data` holds the panels in the stored weight's shape and dtype (int8 [K, N] values, or uint8
  [K / 2, N] bytes of two int4 values along K), as panels [N / 32, K, 32] or [N / 32, K / 2, 32];
  `scale` is float32 [N] (int8, per output column) or [K / G, N] (int4, per group of G along K).
  `transposed` says the stored weight is [N, K] (a tied embedding table, x @ E^T).
  """

  def __init__(self, data, scale, k: int, n: int, scheme: str, transposed: bool = False):
    self.data, self.scale = data, scale
    self.k, self.n, self.scheme, self.transposed = k, n, scheme, transposed

  def tree_flatten(self):
    return (self.data, self.scale), (self.k, self.n, self.scheme, self.transposed)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def shape(self):
    return self.data.shape

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def nbytes(self):
    return self.data.nbytes + self.scale.nbytes

  @property
  def group_size(self) -> int:
    return self.k if self.scheme == 'int8' else self.k // self.scale.shape[0]

  def _rows_k(self) -> int:   # panel rows: K values, or K / 2 bytes
    return self.k if self.scheme == 'int8' else self.k // 2

  def panels(self):
    return self.data.reshape(self.n // PANEL, self._rows_k(), PANEL)

  def unpacked(self):
    """The stored weight (`qkernel` / `qembedding` as models/quant.py lays it out)."""
    p = self.panels()
    if self.transposed:
      return p.transpose(0, 2, 1).reshape(self.data.shape)
    return p.transpose(1, 0, 2).reshape(self.data.shape)

  def stored_rows(self, ids):
    """Rows `ids` of a transposed (embedding) weight in the stored layout: ids.shape + (K,) int8
    or ids.shape + (K / 2,) uint8."""
    if not self.transposed:
      raise ValueError('stored_rows() reads a packed embedding; this kernel is not transposed')
    return self.panels()[ids // PANEL, :, ids % PANEL]

  def __repr__(self):
    return (f'PackedQuantKernel({self.scheme}, shape={self.shape}, k={self.k}, n={self.n}, '
            f'group_size={self.group_size}, transposed={self.transposed})')


def pack_quant(q, scale, scheme: str, contract_dims: int = 1,
               transposed: bool = False) -> PackedQuantKernel:
  """Packs a stored quantised weight into panels (N must be a multiple of 32).

  Projections: q int8 [C..., O...] with scale [O...] ('int8'), or q uint8 [C/2, O...] with scale
  [C/G, O...] ('int4'; `contract_dims` leading dims of the float kernel were contracted, one for
  the stored int4 bytes). Embeddings (`transposed`): q int8 [V, D] with scale [V], or uint8
  [V, D/2] with scale [V, D/G].
  """
  if scheme not in QUANT_SCHEMES:
    raise ValueError(f'pack_quant: scheme {scheme!r} is not valid; choose one of '
                     f'{list(QUANT_SCHEMES)}')
  want = jnp.int8 if scheme == 'int8' else jnp.uint8
  if q.dtype != want:
    raise ValueError(f'pack_quant: {scheme} weights are stored as {jnp.dtype(want).name}, got '
                     f'{q.dtype}')
  scale = jnp.asarray(scale, jnp.float32)
  if transposed:
    if q.ndim != 2:
      raise ValueError(f'pack_quant: a transposed weight must be 2-D [N, K], got {q.shape}')
    n, rows = q.shape
    scale = scale if scheme == 'int8' else scale.T   # [N] or [K/G, N]
  else:
    lead = contract_dims if scheme == 'int8' else 1
    rows, n = int(np.prod(q.shape[:lead])), int(np.prod(q.shape[lead:]))
    scale = scale.reshape(n) if scheme == 'int8' else scale.reshape(-1, n)
  k = rows if scheme == 'int8' else 2 * rows
  if n % PANEL:
    raise ValueError(f'pack_quant: {n} output columns of a {q.shape} weight are not a multiple '
                     f'of {PANEL}')
  fits = scale.shape == (n,) if scheme == 'int8' else (
      scale.ndim == 2 and scale.shape[1] == n and k % scale.shape[0] == 0
      and (k // scale.shape[0]) % 2 == 0)
  if not fits:
    raise ValueError(f'pack_quant: scales {scale.shape} do not fit a {scheme} weight with K={k}, '
                     f'N={n}')
  if transposed:
    panels = q.reshape(n // PANEL, PANEL, rows).transpose(0, 2, 1)
  else:
    panels = q.reshape(rows, n // PANEL, PANEL).transpose(1, 0, 2)
  return PackedQuantKernel(jnp.asarray(panels).reshape(q.shape), scale, k, n, scheme, transposed)


def quant_packable(q) -> bool:
  """Whether `pack_quant` should be applied to this stored weight here: int8 / uint8 on one CPU
  device, kernels built."""
  if not hasattr(q, 'dtype') or q.dtype not in (jnp.int8, jnp.uint8):
    return False
  sharding = getattr(q, 'sharding', None)
  if sharding is None or len(sharding.device_set) != 1:
    return False
  if next(iter(sharding.device_set)).platform != 'cpu':
    return False
  return available()


def quant_wanted(x: jax.Array, w) -> bool:
  """Whether `matmul_quant(x, w)` applies here (at trace time): w a PackedQuantKernel, x float32
  with at most MAX_ROWS rows, no mesh in context, kernels built."""
  if not isinstance(w, PackedQuantKernel) or x.dtype != jnp.float32:
    return False
  return int(np.prod(x.shape[:-1])) <= MAX_ROWS and library.usable()


def matmul_quant(x: jax.Array, w: PackedQuantKernel) -> jax.Array:
  """x [..., K] @ dequantised W -> [..., N] float32."""
  return matmul_quant_fused(x, [w])[0]


def matmul_quant_fused(x: jax.Array, ws) -> list[jax.Array]:
  """[x @ dequantised W for W in ws] in one kernel call; the ws share one scheme."""
  ws = list(ws)
  schemes = {w.scheme for w in ws}
  if len(schemes) != 1:
    raise ValueError(f'matmul_quant: weights of one call share a scheme, got {sorted(schemes)}')
  for w in ws:
    if x.shape[-1] != w.k:
      raise ValueError(f'matmul_quant: x {x.shape} does not match a packed weight with K={w.k}')
  lead = x.shape[:-1]
  M = int(np.prod(lead))
  if not 1 <= M <= MAX_ROWS:
    raise ValueError(f'matmul_quant: x has {M} rows; the kernel takes 1 to {MAX_ROWS}')
  if not available():
    raise RuntimeError(f'CPU kernels unavailable: {unavailable_reason()}')
  call = jax.ffi.ffi_call(_QUANT_TARGETS[ws[0].scheme],
                          [jax.ShapeDtypeStruct((M, w.n), jnp.float32) for w in ws],
                          vmap_method='sequential')
  operands = [a for w in ws for a in (w.panels(), w.scale)]
  outs = call(x.reshape(M, x.shape[-1]).astype(jnp.float32), *operands)
  return [y.reshape(*lead, w.n) for y, w in zip(outs, ws)]
