"""Tables (fair.md) and plots (fair_*.png) of experiments/fair_optimizers.py's fair.json.

  python experiments/fair_optimizers.py --phases=report      # rewrites them from fair.json

No number is bolded: where a gap is within the seeds' spread the tables say so instead.
"""
import os

import numpy as np

COMMAND = 'nice -n 19 python experiments/fair_optimizers.py'


def _pm(m, s):
  return '-' if m is None else f'{m:.4f} ± {s:.4f}'


def _ci(r, metric='chrf'):
  c = r['test_confidence'][metric]
  return f'{r["test_metrics"][metric]:.2f} [{c["low"]:.2f}, {c["high"]:.2f}]'


def _within(a, b):
  """Two (mean, std) pairs whose gap is within the sum of their seed spreads."""
  return abs(a[0] - b[0]) <= a[1] + b[1]


def _ties(opt: dict, n: str) -> str:
  """The other optimisers whose mean test loss is within the seed spreads of n's ('-': none)."""
  me = (opt[n]['test_mean'], opt[n]['test_std'])
  t = [m for m in opt if m != n and _within(me, (opt[m]['test_mean'], opt[m]['test_std']))]
  return ', '.join(t) or '-'


def markdown(d: dict, xcfg) -> str:
  runs = d['runs']
  tr = xcfg.train
  walls = d.get('phase_wall_s', {})
  any_run = next(iter(runs.values()))
  out = ['# Fair comparisons: optimisers, schedules, augmentation, precision', '',
         f'Command: `{COMMAND}` (config `experiments/configs/fair.py`; resumable: finished runs '
         'are kept in fair.json). Phase wall times on the shared 2-core CPU (s): '
         + ', '.join(f'{k} {v:.0f}' for k, v in walls.items())
         + f'; total {sum(walls.values()):.0f} s.', '',
         f'Pretraining runs: {tr.model.name}, span corruption on Shakespeare, batch '
         f'{tr.data.batch_size} x {tr.data.inputs_length} input tokens, {tr.num_steps} steps '
         f'(warm-up {tr.optim.warmup_steps}), gradient clipping {tr.optim.clip_grad_norm}, weight '
         f'decay {tr.optim.weight_decay} (Adam: 0). Validation loss (chooses the rate) on '
         f'{len(d["lm_split"]["validation"])} held-out works, test loss (reported) on '
         f'{len(d["lm_split"]["test"])} others: {", ".join(d["lm_split"]["test"])}. Validation '
         f'loss at step 0: {any_run["initial_val_loss"]:.3f}.', '']
  if 'sweep' in d:
    out += ['## 1. Learning-rate sweep (validation loss, cosine schedule, seed 0)', '',
            f'Each optimiser: {xcfg.grid_points} rates half a decade apart around its literature '
            'value, widened by one rate while the best sat at an edge.', '',
            '| optimiser | rates tried: validation loss | chosen | interior | widened |',
            '|---|---|---|---|---|']
    for n, s in d['sweep'].items():
      cells = ', '.join(f'{lr:g}: {runs[f"sweep/{n}/lr{lr:g}"]["final_val_loss"]:.3f}'
                        for lr in s['grid'])
      out.append(f'| {n} | {cells} | {s["best_lr"]:g} | {"yes" if s["interior"] else "NO"} | '
                 f'{s["widened"]} |')
  if 'optimizers' in d:
    opt = d['optimizers']
    order = sorted(opt, key=lambda n: opt[n]['test_mean'])
    best = (opt[order[0]]['test_mean'], opt[order[0]]['test_std'])
    out += ['', '## 2. Optimisers at the chosen rate (test loss, mean ± std over seeds)', '',
            '| rank | optimiser | rate | test loss | per seed | validation loss | within seed '
            'spread of |', '|---|---|---|---|---|---|---|']
    for i, n in enumerate(order):
      o = opt[n]
      w = _ties(opt, n)
      out.append(f'| {i + 1} | {n} | {o["learning_rate"]:g} | {_pm(o["test_mean"], o["test_std"])}'
                 f' | {", ".join(f"{t:.4f}" for t in o["test"])} | '
                 f'{_pm(o["val_mean"], o["val_std"])} | {w} |')
    tied = [n for n in order[1:] if _within(best, (opt[n]['test_mean'], opt[n]['test_std']))]
    out += ['', f'{order[0]} has the lowest mean test loss' +
            (f'; {", ".join(tied)} are within the seeds\' spread of it, so no ranking among them '
             'is claimed.' if tied else ', separated from the others by more than the seed '
             'spread.')]
  if 'schedules' in d:
    out += ['', '## 3. Schedules at the tuned rate (test loss, mean ± std over seeds)', '',
            '| optimiser | schedule | peak rate | test loss | vs cosine | how often it acted |',
            '|---|---|---|---|---|---|']
    sch = d['schedules']
    for key, r in sch.items():
      cos = sch.get(f'{r["optimizer"]}/cosine')
      delta = '-' if cos is None or r['schedule'] == 'cosine' else (
          f'{r["test_mean"] - cos["test_mean"]:+.4f}'
          + (' (within spread)' if _within((r['test_mean'], r['test_std']),
                                          (cos['test_mean'], cos['test_std'])) else ''))
      acted = ''
      if r['schedule'] == 'plateau':
        acted = 'lr reductions per seed: ' + ', '.join(str(x) for x in r['plateau_reductions'])
      elif r['schedule'] == 'grad_stats':
        acted = '; '.join(f'mean scale {g["mean"]:.3f}, {g["steps_below_0_9"]} steps < 0.9, '
                          f'{k} skipped' for g, k in zip(r['grad_scale'], r['skipped_steps']))
      out.append(f'| {r["optimizer"]} | {r["schedule"]} | {r["peak_lr"]:g} | '
                 f'{_pm(r["test_mean"], r["test_std"])} | {delta} | {acted} |')
  if 'folio' in d:
    out += ['', '## 4. folio_modernize (trained from scratch; chrF on the test plays, 95% '
            'bootstrap CI)', '',
            '| optimiser | rate | steps | validation loss | test chrF | test BLEU | copy baseline '
            'chrF |', '|---|---|---|---|---|---|---|']
    for n, name in d['folio'].items():
      r = runs[name]
      out.append(f'| {n} | {r["learning_rate"]:g} | {r["steps"]} | {r["final_val_loss"]:.4f} | '
                 f'{_ci(r)} | {r["test_metrics"]["bleu"]:.2f} | '
                 f'{r["copy_baseline"]["chrf"]:.2f} |')
    ex = runs[next(iter(d['folio'].values()))]
    out += ['', f'{ex["test_examples"]} test examples decoded greedily.']
  if 'augment' in d:
    a = d['augment']
    out += ['', f'## 5. Augmentation on folio_modernize ({a["optimizer"]}; test chrF per seed with '
            '95% CI)', '', '| augmentation | settings | chrF per seed | mean ± std | vs none |',
            '|---|---|---|---|---|']
    means = {}
    for aug, names in a['runs'].items():
      rs = [runs[n] for n in names]
      c = [r['test_metrics']['chrf'] for r in rs]
      means[aug] = (float(np.mean(c)), float(np.std(c, ddof=1)) if len(c) > 1 else 0.0)
    for aug, names in sorted(a['runs'].items(), key=lambda kv: kv[0] != 'none'):
      rs = [runs[n] for n in names]
      probs = rs[-1].get('probs', {}) if aug != 'none' else {}
      m = means[aug]
      vs = '-' if aug == 'none' else (f'{m[0] - means["none"][0]:+.2f}' + (
          ' (within spread)' if _within(m, means['none']) else ''))
      out.append(f'| {aug} | {", ".join(f"{k}={v:g}" for k, v in probs.items()) or "-"} | '
                 f'{"; ".join(_ci(r) for r in rs)} | {m[0]:.2f} ± {m[1]:.2f} | {vs} |')
  if 'precision' in d:
    p = d['precision']
    t = d[p['timing']]
    f32 = t['f32']['median_s_per_step']
    out += ['', f'## 6. Precision on folio_modernize ({p["optimizer"]}, same data and seed)', '',
            '| policy | final train loss | validation loss | test chrF | s/step (alternating) | '
            'vs f32 | skipped steps |', '|---|---|---|---|---|---|---|']
    for pol, name in p['runs'].items():
      r = runs[name]
      s = t[pol]['median_s_per_step']
      out.append(f'| {pol} | {r["final_train_loss"]:.4f} | {r["final_val_loss"]:.4f} | {_ci(r)} | '
                 f'{s:.4f} | {s / f32:.2f}x | {r["skipped_steps"]} |')
    out += ['', f'Timing: {t["rounds"]} rounds of {t["steps_per_round"]} steps per policy, the '
            f'policies alternating, on {t["device"]} ({t["cpu_count"]} cores, 1-min load average '
            f'{t["load_average_1min"]:.1f}). This CPU has no fast bf16 or fp16 matmul '
            'hardware, so these step times say nothing about an accelerator\'s; the policies are '
            'compared here for their loss and task metric.']
  return '\n'.join(out) + '\n'


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _ylim(ax, values, pad=0.08):
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)])
  if v.size:
    lo, hi = float(v.min()), float(np.percentile(v, 90))
    span = max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad * span, hi + pad * span)


def plots(d: dict, results: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  runs, paths = d['runs'], []
  if 'sweep' in d:
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    vals = []
    for n, s in d['sweep'].items():
      ys = [runs[f'sweep/{n}/lr{lr:g}']['final_val_loss'] for lr in s['grid']]
      vals += ys
      line, = ax.plot(s['grid'], ys, 'o-', ms=4, label=f'{n} (chosen {s["best_lr"]:g})')
      ax.plot([s['best_lr']], [runs[f'sweep/{n}/lr{s["best_lr"]:g}']['final_val_loss']], '*',
              ms=14, color=line.get_color())
    ax.set_xscale('log')
    ax.set(xlabel='peak learning rate', ylabel='final validation loss',
           title='learning-rate sweep (star: chosen on validation)')
    _ylim(ax, vals)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    vals = []
    if 'optimizers' in d:
      for n, o in d['optimizers'].items():
        c = runs[f'sweep/{n}/lr{o["learning_rate"]:g}']['curves']
        vals += c['eval_loss'][1:]
        ax.plot(c['eval_step'], c['eval_loss'], 'o-', ms=3,
                label=f'{n} lr {o["learning_rate"]:g}: test {o["test_mean"]:.3f} ± '
                      f'{o["test_std"]:.3f}')
      ax.set(xlabel='step', ylabel='validation loss (seed 0)',
             title='at the chosen rate (legend: test loss over seeds)')
      _ylim(ax, vals)
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, os.path.join(results, 'fair_optimizers.png')))
  if 'schedules' in d:
    names = sorted({r['optimizer'] for r in d['schedules'].values()})
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(6 * (1 + len(names)), 5.5))
    ax = axes[0]
    scheds = [r['schedule'] for r in d['schedules'].values() if r['optimizer'] == names[0]]
    w = 0.8 / len(names)
    vals = []
    for i, n in enumerate(names):
      rows = [d['schedules'][f'{n}/{s}'] for s in scheds]
      m = [r['test_mean'] for r in rows]
      e = [r['test_std'] for r in rows]
      vals += [a - b for a, b in zip(m, e)] + [a + b for a, b in zip(m, e)]
      ax.bar(np.arange(len(scheds)) + i * w, m, w, yerr=e, capsize=3, label=n)
    ax.set_xticks(np.arange(len(scheds)) + w * (len(names) - 1) / 2)
    ax.set_xticklabels(scheds, rotation=30, ha='right')
    lo, hi = min(vals), max(vals)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    ax.set(ylabel='test loss (mean ± std over seeds)', title='schedules at the tuned rate')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis='y')
    for ax, n in zip(axes[1:], names):
      for s in scheds:
        r = runs[d['schedules'][f'{n}/{s}']['runs'][0]]
        ax.plot(r['curves']['train_step'], r['curves']['learning_rate'], label=s)
      ax.set(xlabel='step', ylabel='effective learning rate (seed 0)', title=f'{n}: schedules')
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, os.path.join(results, 'fair_schedules.png')))
  if 'augment' in d or 'precision' in d:
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    if 'augment' in d:
      ax = axes[0]
      augs = sorted(d['augment']['runs'], key=lambda a: a != 'none')
      for i, aug in enumerate(augs):
        for j, name in enumerate(d['augment']['runs'][aug]):
          r = runs[name]
          c = r['test_confidence']['chrf']
          s = r['test_metrics']['chrf']
          ax.errorbar([i + 0.15 * (j - 0.5)], [s], yerr=[[s - c['low']], [c['high'] - s]],
                      fmt='o', capsize=4, color=f'C{j}', label=f'seed {r["seed"]}' if i == 0 else None)
      base = runs[d['augment']['runs']['none'][0]]['copy_baseline']['chrf']
      ax.set_xticks(range(len(augs)))
      ax.set_xticklabels(augs)
      ax.set(xlabel='augmentation of the inputs', ylabel='test chrF (95% bootstrap CI)',
             title=f'folio_modernize, {d["augment"]["optimizer"]} (copy baseline chrF {base:.1f})')
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    if 'precision' in d:
      ax = axes[1]
      vals = []
      for pol, name in d['precision']['runs'].items():
        c = runs[name]['curves']
        vals += c['train_loss'][2:]
        ax.plot(c['train_step'], c['train_loss'], label=f'{pol}: chrF '
                f'{runs[name]["test_metrics"]["chrf"]:.2f}')
      ax.set(xlabel='step', ylabel='training loss', title='precision policies, same run')
      _ylim(ax, vals)
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, os.path.join(results, 'fair_folio.png')))
  return paths


def readme(d: dict, xcfg) -> str:
  """The compact summary quoted in README.md (written to fair_readme.md)."""
  runs, tr = d['runs'], xcfg.train
  walls = d.get('phase_wall_s', {})
  opt = d['optimizers']
  order = sorted(opt, key=lambda n: opt[n]['test_mean'])
  out = [f'**Optimisers, schedules, augmentation, precision** (`{COMMAND}`, config '
         '`experiments/configs/fair.py`; raw output `experiments/results/fair/fair.json`, all '
         f'tables in `fair.md`, plots `fair_*.png`; {sum(walls.values()) / 60:.0f} min on this '
         f'2-core CPU shared with other jobs). {tr.model.name}, Shakespeare span corruption, batch '
         f'{tr.data.batch_size} x {tr.data.inputs_length}, {tr.num_steps} steps. Every optimiser '
         f'got the same budget: {xcfg.grid_points} learning rates half a decade apart around its '
         'literature value, widened by one rate while the best sat at an edge (every best ended '
         'interior), chosen on the validation plays, reported on two other held-out plays, two '
         'seeds (mean ± std).', '',
         '| optimiser | rates tried | chosen | test loss | within seed spread of |',
         '|---|---|---|---|---|']
  for i, n in enumerate(order):
    o, s = opt[n], d['sweep'][n]
    w = _ties(opt, n)
    out.append(f'| {n} | {s["grid"][0]:g} .. {s["grid"][-1]:g} ({len(s["grid"])}) | '
               f'{o["learning_rate"]:g} | {_pm(o["test_mean"], o["test_std"])} | {w} |')
  sch = d.get('schedules', {})
  names = sorted({r['optimizer'] for r in sch.values()}, key=order.index)
  if sch:
    scheds = [r['schedule'] for r in sch.values() if r['optimizer'] == names[0]]
    out += ['', 'Schedules at the tuned rate of the best two (test loss, two seeds; "~" marks a '
            'gap to cosine within the seeds\' spread):', '',
            '| schedule | ' + ' | '.join(names) + ' | how often it acted |',
            '|---|' + '---|' * len(names) + '---|']
    for sc in scheds:
      cells, acted = [], []
      for n in names:
        r, c = sch[f'{n}/{sc}'], sch[f'{n}/cosine']
        tilde = ' ~' if sc != 'cosine' and _within((r['test_mean'], r['test_std']),
                                                    (c['test_mean'], c['test_std'])) else ''
        cells.append(_pm(r['test_mean'], r['test_std']) + tilde)
        if sc == 'plateau':
          acted.append(f'{n}: {sum(r["plateau_reductions"])} lr reductions in '
                       f'{len(r["plateau_reductions"])} runs')
        elif sc == 'grad_stats':
          acted.append(f'{n}: mean scale '
                       f'{np.mean([g["mean"] for g in r["grad_scale"]]):.2f}, '
                       f'{sum(r["skipped_steps"])} skipped')
      out.append(f'| {sc} | ' + ' | '.join(cells) + f' | {"; ".join(acted)} |')
  if 'folio' in d:
    out += ['', 'folio_modernize (trained from scratch, chrF on the test plays with 95% bootstrap '
            'CIs):', '', '| run | test chrF | validation loss |', '|---|---|---|']
    for n, name in d['folio'].items():
      r = runs[name]
      out.append(f'| {n}, lr {r["learning_rate"]:g} | {_ci(r)} | {r["final_val_loss"]:.4f} |')
    out.append(f'| copy baseline | {runs[next(iter(d["folio"].values()))]["copy_baseline"]["chrf"]:.2f}'
               ' | |')
  if 'augment' in d:
    a = d['augment']
    for aug, names_ in sorted(a['runs'].items(), key=lambda kv: kv[0] != 'none'):
      c = [runs[x]['test_metrics']['chrf'] for x in names_]
      out.append(f'| {a["optimizer"]}, augmentation {aug} | '
                 + '; '.join(_ci(runs[x]) for x in names_) + f' (mean {np.mean(c):.2f}) | '
                 + ', '.join(f'{runs[x]["final_val_loss"]:.4f}' for x in names_) + ' |')
  if 'precision' in d:
    p = d['precision']
    t = d[p['timing']]
    for pol, name in p['runs'].items():
      r = runs[name]
      out.append(f'| {p["optimizer"]}, {pol} ({t[pol]["median_s_per_step"] / t["f32"]["median_s_per_step"]:.2f}x '
                 f'f32 s/step) | {_ci(r)} | {r["final_val_loss"]:.4f} |')
  return '\n'.join(out) + '\n'


def write(d: dict, results: str, xcfg) -> None:
  os.makedirs(results, exist_ok=True)
  md = markdown(d, xcfg)
  with open(os.path.join(results, 'fair.md'), 'w') as f:
    f.write(md)
  if 'optimizers' in d and 'sweep' in d:
    with open(os.path.join(results, 'fair_readme.md'), 'w') as f:
      f.write(readme(d, xcfg))
  for p in plots(d, results):
    print('wrote', p)
  print(md)
