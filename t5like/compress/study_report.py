"""The compression study's report: `report.md` (one table, every number from results.json) and
two plots (task quality vs weight bytes, quality vs decoding tokens/s), Pareto frontiers marked.

Numbers in the report are the JSON's values rounded (sizes also in MiB, stored beside the bytes),
so the table can be checked against the JSON. matplotlib (Agg) draws the plots; each point carries
its row number from the table, placed so that no two labels overlap.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

MIB = 2 ** 20
FAMILY_STYLE = {'reference': ('black', 'o'), 'distil': ('tab:blue', 's'),
                'prune': ('tab:orange', 'v'), 'dynamic': ('tab:purple', 'P'),
                'share': ('tab:green', 'D'), 'quant': ('tab:red', '^'),
                'combined': ('tab:brown', '*')}
QUALITY = 'chrf'


def _f(x, fmt: str) -> str:
  return '—' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def add_derived(results: dict) -> None:
  """Sizes in MiB next to their bytes (what the report prints)."""
  for rec in results['variants'].values():
    if 'weight_bytes' in rec:
      rec['weight_mib'] = rec['weight_bytes'] / MIB
    if rec.get('peak_bytes_b1') is not None:
      rec['peak_mib_b1'] = rec['peak_bytes_b1'] / MIB


def rows(results: dict) -> list[tuple[int, str, dict]]:
  """(row number, name, record) of every measured variant, in study order."""
  order = [n for n in results.get('order', results['variants'])]
  out = []
  for name in order:
    rec = results['variants'].get(name, {})
    if 'test' in rec:
      out.append((len(out) + 1, name, rec))
  return out


def pareto(points: list[tuple[float, float]], higher_x_better: bool) -> list[int]:
  """Indices of the points no other point beats on both quality (y, higher) and x."""
  idx = []
  for i, (x, y) in enumerate(points):
    dominated = False
    for j, (x2, y2) in enumerate(points):
      better_x = x2 >= x if higher_x_better else x2 <= x
      if j != i and better_x and y2 >= y and (x2 != x or y2 != y):
        dominated = True
        break
    if not dominated:
      idx.append(i)
  return sorted(idx, key=lambda i: points[i][0])


def _place_labels(ax, xs, ys, texts):
  """Row numbers next to their points, moved around each point until no two labels overlap."""
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  placed = []
  offsets = [(6, 4), (6, -10), (-14, 4), (-14, -10), (6, 14), (-14, 14), (6, -20), (-14, -20),
             (16, -3), (-24, -3), (0, 22), (0, -28), (22, 12), (-30, 12), (22, -18), (-30, -18)]
  for x, y, t in zip(xs, ys, texts):
    best = None
    for dx, dy in offsets:
      ann = ax.annotate(t, (x, y), xytext=(dx, dy), textcoords='offset points', fontsize=7)
      box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
      if not any(box.overlaps(b) for b in placed):
        best = box
        break
      ann.remove()
    if best is None:   # every slot taken: the farthest one, with a leader line
      ann = ax.annotate(t, (x, y), xytext=(30, 30 + 8 * len(placed) % 40),
                        textcoords='offset points', fontsize=7,
                        arrowprops={'arrowstyle': '-', 'lw': 0.5, 'color': 'grey'})
      best = ann.get_window_extent(renderer)
    placed.append(best)


def plot(results: dict, out_dir: str, metric: str = QUALITY) -> list[str]:
  """quality_vs_bytes.png and quality_vs_speed.png in `out_dir`; returns their file names."""
  import matplotlib   # deferred: the plotting dependency only where plots are drawn
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  table = rows(results)
  files = []
  for fname, key, xlabel, log_x, higher in (
      ('quality_vs_bytes.png', 'weight_mib', 'weight bytes (MiB, embedding and output layer '
       'included; log scale)', True, False),
      ('quality_vs_speed.png', 'tokens_per_s_b1', 'greedy decoding tokens/s at batch 1 '
       '(this CPU, variants timed alternately)', False, True)):
    pts = [(n, name, rec) for n, name, rec in table if rec.get(key) is not None]
    if not pts:
      continue
    fig, ax = plt.subplots(figsize=(10, 6.5))
    xs = np.array([rec[key] for _, _, rec in pts])
    ys = np.array([rec['test'][metric]['score'] for _, _, rec in pts])
    lo = np.array([rec['test'][metric]['low'] for _, _, rec in pts])
    hi = np.array([rec['test'][metric]['high'] for _, _, rec in pts])
    families = [results['families'].get(name, 'reference') for _, name, _ in pts]
    for fam, (color, marker) in FAMILY_STYLE.items():
      sel = [i for i, f in enumerate(families) if f == fam]
      if not sel:
        continue
      ax.errorbar(xs[sel], ys[sel], yerr=[ys[sel] - lo[sel], hi[sel] - ys[sel]], fmt=marker,
                  color=color, ecolor=color, elinewidth=0.6, capsize=2, markersize=6,
                  label=fam, alpha=0.9)
    front = pareto(list(zip(xs.tolist(), ys.tolist())), higher)
    ax.step(xs[front], ys[front], where='post' if not higher else 'pre', color='grey', lw=1.2,
            ls='--', label='Pareto frontier', zorder=0)
    ax.scatter(xs[front], ys[front], s=140, facecolors='none', edgecolors='grey', lw=1.0)
    if log_x:
      ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f'{metric} on the held-out test plays (95% CI)')
    ax.set_title(f'{results.get("task", "task")}: {metric} vs '
                 f'{"weight bytes" if log_x else "decoding speed"} (numbers: rows of report.md)')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='best', fontsize=8)
    _place_labels(ax, xs, ys, [str(n) for n, _, _ in pts])
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=120)
    plt.close(fig)
    files.append(fname)
  return files


def _ci(rec, m, fmt='.1f'):
  t = rec['test'][m]
  return f'{_f(t["score"], fmt)} [{_f(t["low"], fmt)}, {_f(t["high"], fmt)}]'


def _delta(rec, m, fmt='+.1f'):
  d = rec.get('vs_teacher', {}).get(m)
  return '—' if d is None else f'{_f(d["delta"], fmt)} (p {_f(d["p_value"], ".3f")})'


def table_md(results: dict) -> str:
  lines = ['| # | variant | params | weight MiB | chrF [95% CI] | Δ chrF (p) | BLEU [95% CI] | '
           'Δ BLEU (p) | exact match % [95% CI] | val loss | tok/s b1 | tok/s b8 | peak MiB b1 | '
           'technique s | extra steps | served tok/s 1 / 16 clients |',
           '|' + '---|' * 16]
  for n, name, rec in rows(results):
    served = rec.get('served', {})
    srv = ('—' if 'tokens_per_s_c1' not in served else
           f'{_f(served["tokens_per_s_c1"], ".0f")} / {_f(served["tokens_per_s_c16"], ".0f")}')
    lines.append(
        f'| {n} | {name} | {rec.get("params", 0):,} | {_f(rec.get("weight_mib"), ".3f")} | '
        f'{_ci(rec, "chrf")} | {_delta(rec, "chrf")} | {_ci(rec, "bleu")} | '
        f'{_delta(rec, "bleu")} | {_ci(rec, "exact_match")} | '
        f'{_f(rec.get("validation_loss"), ".3f")} | {_f(rec.get("tokens_per_s_b1"), ".0f")} | '
        f'{_f(rec.get("tokens_per_s_b8"), ".0f")} | {_f(rec.get("peak_mib_b1"), ".2f")} | '
        f'{_f(rec.get("technique_s"), ".0f")} | {rec.get("extra_steps", 0)} | {srv} |')
  return '\n'.join(lines)


def write(results: dict, out_dir: str, metrics=('bleu', 'chrf', 'exact_match')) -> str:
  """report.md and the plots in `out_dir` (results.json is rewritten with the derived sizes)."""
  add_derived(results)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  plots = plot(results, out_dir)
  v = results['variants']
  skipped = [(n, r['not_applicable']) for n, r in v.items() if 'not_applicable' in r]
  missing = [n for n in results.get('order', []) if n not in v or
             ('test' not in v[n] and 'not_applicable' not in v[n])]
  labels = results.get('labels', {})
  cfg = results.get('config', {})
  timing = results.get('timing', {})
  md = [f'# Compression study: {results.get("task", "")}', '',
        'Made by:', '', '```', results.get('command', '(command not recorded)'), '```', '',
        f'Machine: {results["jax"]["cpu_count"]} CPU cores, jax backend '
        f'{results["jax"]["backend"]}. 1-minute load average '
        f'{_f(results["load_average_at_start"][0], ".1f")} at the start and '
        f'{_f(results.get("load_average_at_end", [float("nan")])[0], ".1f")} at the end (the study '
        'itself loads the machine; more than the core count means other work shared it, and times '
        'were slower for it); the variants were timed alternately in one process, so their ratios '
        'hold. Wall time of the command: '
        + ' + '.join(f'{_f(w, ".0f")} s' for w in results.get('wall_s_runs', []))
        + ' (each invocation; a rerun resumes).', '',
        f'Teacher: {v.get("teacher", {}).get("source", "?")}. Every variant is scored on the same '
        f'{v.get("teacher", {}).get("test_examples", "?")} test pairs (held-out plays, evenly '
        f'spaced over the test split); 95% bootstrap intervals ({cfg.get("n_bootstrap")} '
        'resamples); Δ is the paired difference from the teacher with its paired-bootstrap p. '
        f'Extra steps: fine-tuning steps on the task after the teacher (each stage '
        f'{cfg.get("finetune_steps")} steps, batch {cfg.get("batch_size")}). tok/s: greedy '
        f'decoding of {timing.get("new_tokens")} new tokens from {timing.get("input_length")}-'
        f'token inputs, median of {timing.get("rounds")} alternating rounds. Peak MiB: XLA\'s '
        'account of the batch-1 decoding program. Served: one server loading every bundle, '
        f'`scripts/load_test.py` per model ({results.get("serving", {}).get("requests", "—")} '
        'requests a level).', '',
        table_md(results), '',
        'Variants: ' + '; '.join(f'{n}: {labels.get(name, name)}' for n, name, _ in
                                 rows(results)) + '.', '']
  base = results.get('baselines', {}).get('copy')
  if base:
    md += [f'Copy baseline (input as output) on the same pairs: chrF {_ci({"test": base}, "chrf")}, '
           f'BLEU {_ci({"test": base}, "bleu")}, exact match {_ci({"test": base}, "exact_match")}.',
           '']
  if skipped:
    md += ['Not applicable:', ''] + [f'- {n}: {why}' for n, why in skipped] + ['']
  if missing:
    md += ['Not measured in this run (rerun the command to resume): ' + ', '.join(missing), '']
  for p in plots:
    md += [f'![{p}]({p})', '']
  text = '\n'.join(md)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(text)
  return text
