// GPUs: one lane per device on a timeline. Bars are leases (which job and stage held the
// device, and when, and how far the holder has got); the line is utilisation and the shaded
// area memory in use; hatching marks a leased device that was idle. New readings and
// progress arrive on the feed and are applied without a reload.

import { get } from './api.js';
import { bytes, fill, clock, duration, empty, h, hue, jobLink, progressBar, progressOf, s, shortId } from './format.js';

const WINDOWS = [[300, '5 min'], [900, '15 min'], [3600, '1 h']];

let windowS = 300;
// Readings seen on the feed, kept across reloads (the engine returns only its latest ones).
const kept = new Map();
let reload = () => {};

const LANE_H = 96;
const BAR_TOP = 20;
const BAR_H = 44;
// The least height of one row of leases when several are held at once: room for a label.
const ROW_MIN_H = 20;
const AXIS_H = 18;

export const gpusView = {
  title: () => 'GPUs',
  mount(root, params, { refresh }) {
    reload = refresh;
    const buttons = WINDOWS.map(([sec, label]) => h('button', {
      type: 'button', class: sec === windowS ? 'seg active' : 'seg', dataset: { window: sec },
      onclick: (e) => {
        windowS = sec;
        for (const b of root.querySelectorAll('.seg')) b.classList.toggle('active', b === e.target);
        reload();
      },
    }, label));
    root.append(
      h('div', { class: 'toolbar' }, h('h2', {}, 'GPUs'), h('div', { class: 'segmented' }, buttons),
        h('span', { class: 'legend' },
          h('span', { class: 'key lease-key' }), 'lease ', h('span', { class: 'key util-key' }), 'utilisation ',
          h('span', { class: 'key mem-key' }), 'memory used ', h('span', { class: 'key idle-key' }), 'idle under lease')),
      h('div', { class: 'lanes' }),
      h('div', { class: 'held' }));
  },
  async load() {
    // The resources say who holds each device now, pool instances included (they hold
    // memory shares between tasks, with no lease interval on the timeline).
    const [data, res] = await Promise.all([get(`/v1/gpus/timeline?window_s=${windowS}`), get('/v1/resources')]);
    data.res = res;
    data.offset = data.now_ms - Date.now();
    for (const d of data.devices) {
      const first = d.samples.length ? d.samples[0][0] : Infinity;
      const older = (kept.get(d.index) || []).filter((p) => p[0] < first && p[0] >= data.since_ms);
      d.samples = older.concat(d.samples);
      kept.set(d.index, d.samples);
    }
    return data;
  },
  wants: (e) => e.type === 'lease' || e.type === 'findings' || e.type === 'pool_instance',
  apply(data, e) {
    if (e.type === 'progress') {
      const held = data.devices.flatMap((d) => d.leases)
        .filter((l) => l.end_ms === null && l.job === e.job && l.stage === e.stage && l.attempt === e.attempt);
      for (const l of held) l.progress = progressOf(e);
      return held.length > 0;
    }
    if (e.type !== 'gpu_samples') return false;
    e.samples.forEach((r, i) => {
      const d = data.devices[i];
      if (!d || !r) return;
      d.samples.push([e.at_ms, r[0], r[1]]);
      kept.set(d.index, d.samples);
      d.telemetry = true;
    });
    return true;
  },
  render(root, data) {
    const now = Date.now() + data.offset;
    // An engine that started recently fills the lane instead of its right edge.
    const earliest = Math.min(...data.devices.flatMap((d) => [d.samples[0]?.[0], d.leases[0]?.start_ms])
      .filter((t) => t !== undefined));
    let since = now - windowS * 1000;
    if (Number.isFinite(earliest)) since = Math.max(since, Math.min(earliest - 5_000, now - 60_000));
    const lanes = root.querySelector('.lanes');
    if (!data.devices.length) {
      fill(lanes, empty('This engine has no GPUs (resources.gpus is empty).'));
      fill(root.querySelector('.held'));
      return;
    }
    // The lane card's padding and border take 26 px of the container's width.
    const width = Math.max(480, Math.floor(lanes.clientWidth || 900) - 26);
    fill(lanes, ...data.devices.map((d) => lane(d, data, since, now, width)));
    fitLabels(lanes);
    const held = data.devices.flatMap((d) => d.leases.filter((l) => l.end_ms === null).map((l) => ({ d, l })));
    const pooled = data.devices.flatMap((d) => poolHolders(data.res, d.index).map((x) => ({ d, ...x })));
    const rows = [
      ...held.map(({ d, l }) => h('tr', { dataset: { job: l.job } },
        h('td', {}, `GPU ${d.index} · ${d.name}`), h('td', {}, jobLink(l.job)), h('td', {}, l.pipeline),
        h('td', {}, l.pool ? `${l.stage} (pool ${l.pool})` : l.stage), h('td', { class: 'num' }, l.attempt),
        h('td', { class: 'share' }, share(l.memory_bytes, d.index)),
        h('td', { class: 'num' }, duration(now - l.start_ms)),
        h('td', { class: 'held-progress' }, l.progress ? progressBar(l.progress) : '–'))),
      // Pool instances hold their share for their lifetime, between tasks too.
      ...pooled.map(({ d, pool, i }) => h('tr', { dataset: { pool, instance: i.index } },
        h('td', {}, `GPU ${d.index} · ${d.name}`), h('td', { class: 'muted' }, '–'), h('td', { class: 'muted' }, '–'),
        h('td', {}, `pool ${pool} #${i.index} (${i.state})`), h('td', { class: 'num' }, '–'),
        h('td', { class: 'share' }, share(i.gpu_memory_bytes, d.index)),
        h('td', { class: 'num' }, '–'), h('td', {}, '–'))),
    ];
    fill(root.querySelector('.held'),
      h('h3', {}, 'Held now'),
      rows.length
        ? h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, ['device', 'job', 'pipeline', 'stage', 'attempt', 'share', 'held for', 'progress'].map((c) => h('th', {}, c)))),
          h('tbody', {}, rows))
        : empty('No GPU is leased now.'));
  },
  tick(root, data) {
    gpusView.render(root, data);
  },
};

/** "6 GiB of GPU 0" for a memory share, "whole device" otherwise. */
function share(memoryBytes, device) {
  return memoryBytes ? `${bytes(memoryBytes)} of GPU ${device}` : 'whole device';
}

/** The pool instances holding (part of) a device now. */
function poolHolders(res, device) {
  if (!res) return [];
  return res.pools.flatMap((p) => p.instances
    .filter((i) => i.devices.includes(device) && !['failed', 'restarting'].includes(i.state))
    .map((i) => ({ pool: p.name, i })));
}

/** The lane header's badge: leased (the whole device), shared (memory shares held, by
 * stages or pool instances), or free (nothing held). */
function holdBadge(d, data, held) {
  const g = data.res ? data.res.gpus.find((x) => x.index === d.index) : null;
  const pools = poolHolders(data.res, d.index);
  const open = d.leases.filter((l) => l.end_ms === null);
  if (g && g.exclusive) {
    const whole = open.find((l) => !l.memory_bytes && !l.pool);
    if (whole) return h('span', { class: 'badge state-running hold', dataset: { hold: 'leased' } }, `leased by ${shortId(whole.job)}/${whole.stage}`);
    const pool = pools[0];
    return h('span', { class: 'badge state-running hold', dataset: { hold: 'leased' } }, pool ? `held by pool ${pool.pool} #${pool.i.index}` : 'leased');
  }
  const leasedBytes = g ? g.memory_leased_bytes : open.reduce((n, l) => n + (l.memory_bytes || 0), 0);
  if (leasedBytes > 0 || (!g && held)) {
    const who = [...new Set([
      ...pools.map(({ pool, i }) => `pool ${pool} #${i.index}`),
      ...open.filter((l) => !l.pool).map((l) => `${shortId(l.job)}/${l.stage}`),
    ])];
    return h('span', { class: 'badge state-shared hold', dataset: { hold: 'shared' }, title: who.length ? `held by ${who.join(', ')}` : '' },
      `shared: ${bytes(leasedBytes)} of ${bytes(d.memory_bytes)} held${who.length ? ` by ${who.join(', ')}` : ''}`);
  }
  return h('span', { class: 'badge state-free hold', dataset: { hold: 'free' } }, 'free');
}

/** Leases that overlap in time go on separate rows of the bar band (memory shares let
 * several stages hold one device at once), so their bars and labels never overlap. */
function leaseRows(leases, now) {
  const rowEnds = [];
  const rows = new Map();
  for (const l of [...leases].sort((a, b) => a.start_ms - b.start_ms)) {
    const end = l.end_ms === null ? now : l.end_ms;
    let row = rowEnds.findIndex((e) => e <= l.start_ms);
    if (row < 0) {
      row = rowEnds.length;
      rowEnds.push(end);
    } else {
      rowEnds[row] = end;
    }
    rows.set(l, row);
  }
  return { rows, count: Math.max(1, rowEnds.length) };
}

/** Labels are sized by guess when drawn; here, measured, a label wider than its bar is
 * shortened to the stage alone, or dropped, so no label spills onto its neighbour. */
function fitLabels(container) {
  for (const text of container.querySelectorAll('text.lease-label, text.lease-message')) {
    const room = Number(text.dataset.room);
    if (typeof text.getComputedTextLength !== 'function' || !(room > 0)) continue;
    if (text.getComputedTextLength() <= room) continue;
    if (text.dataset.short) {
      text.textContent = text.dataset.short;
      if (text.getComputedTextLength() <= room) continue;
    }
    text.remove();
  }
}

function lane(d, data, since, now, width) {
  const x = (t) => ((Math.max(t, since) - since) / (now - since)) * width;
  // Leases held at once get a row each; the lane grows so each row keeps room for a label.
  const { rows, count } = leaseRows(d.leases, now);
  const band = Math.max(BAR_H, count * ROW_MIN_H);
  const laneH = LANE_H + band - BAR_H;
  const plotH = laneH - AXIS_H;
  const samples = d.samples.filter((p) => p[0] >= since);
  const held = d.leases.find((l) => l.end_ms === null);
  const idle = d.idle_under_lease;
  const parts = [];
  const hatch = `hatch-${d.index}`;
  parts.push(s('defs', {}, s('pattern', { id: hatch, width: 6, height: 6, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
    s('rect', { width: 6, height: 6, class: 'hatch-bg' }), s('line', { x1: 0, y1: 0, x2: 0, y2: 6, class: 'hatch-line' }))));
  parts.push(s('rect', { x: 0, y: 0, width, height: plotH, class: 'lane-bg' }));
  // Minute grid and labels.
  const span = now - since;
  const step = [10_000, 30_000, 60_000, 120_000, 300_000, 600_000].find((st) => span / st <= 10) || 900_000;
  for (let t = Math.ceil(since / step) * step; t <= now; t += step) {
    parts.push(s('line', { x1: x(t), x2: x(t), y1: 0, y2: plotH, class: 'grid-line' }));
    parts.push(s('text', { x: x(t) + 3, y: laneH - 5, class: 'axis-label' }, step < 60_000 ? clock(t) : clock(t).slice(0, 5)));
  }
  // Leases.
  const rowH = band / count;
  for (const l of d.leases) {
    const top = BAR_TOP + rows.get(l) * rowH;
    const barH = rowH - (count > 1 ? 2 : 0);
    const x0 = x(l.start_ms);
    const x1 = x(l.end_ms === null ? now : l.end_ms);
    const w = Math.max(2, x1 - x0);
    const color = hue(`${l.pipeline}/${l.stage}`);
    const p = l.end_ms === null ? l.progress : null;
    const fraction = p && typeof p.fraction === 'number' ? p.fraction : null;
    const pct = fraction !== null ? ` · ${Math.round(fraction * 100)}%` : '';
    const progressText = [fraction !== null ? `${Math.round(fraction * 100)}%` : null, p && p.message].filter(Boolean).join(' ');
    const label = `${shortId(l.job)} ${l.stage}#${l.attempt}${pct}${l.memory_bytes ? ` · ${bytes(l.memory_bytes)}` : ''}`;
    const shortLabel = `${l.stage}#${l.attempt}`;
    const title = `job ${l.job}\n${l.pipeline} / ${l.stage} attempt ${l.attempt}\n${clock(l.start_ms)} → ${l.end_ms === null ? 'now' : clock(l.end_ms)} (${duration((l.end_ms ?? now) - l.start_ms)})${l.result ? `\n${l.result}` : ''}${progressText ? `\nprogress: ${progressText}` : ''}`;
    const link = s('a', { href: `#/jobs/${l.job}`, class: `lease ${l.end_ms === null ? 'open' : 'closed'}`,
      dataset: { job: l.job, stage: l.stage, row: rows.get(l), share: share(l.memory_bytes, d.index) } },
      s('title', {}, `${title}\n${share(l.memory_bytes, d.index)}${l.pool ? ` (pool ${l.pool})` : ''}`),
      s('rect', { x: x0, y: top, width: w, height: barH, rx: 3, fill: `hsl(${color} 55% 62%)`, class: 'lease-bar' }),
      fraction !== null ? s('rect', { x: x0, y: top + barH - Math.min(6, barH / 3), width: Math.max(1, w * fraction), height: Math.min(6, barH / 3), class: 'lease-progress', dataset: { fraction } }) : null);
    // Only a label that fits, by estimate here and measured in fitLabels: the full one,
    // else the stage alone; none on a row too thin for text.
    const room = w - 10;
    const fitting = barH >= 14 ? [label, shortLabel].find((t) => t.length * 6.6 <= room) : null;
    if (fitting) {
      link.append(s('text', { x: x0 + 5, y: top + Math.min(17, barH / 2 + 4), class: 'lease-label',
        dataset: { room, short: fitting === label ? shortLabel : '' } }, fitting));
    }
    if (count === 1 && p && p.message && p.message.length * 6.2 <= room) {
      link.append(s('text', { x: x0 + 5, y: top + 32, class: 'lease-message', dataset: { room } }, p.message));
    }
    parts.push(link);
    // Idle stretches of this lease, from the readings.
    if (d.telemetry) {
      const end = l.end_ms === null ? now : l.end_ms;
      let runStart = null;
      const inLease = samples.filter((p) => p[0] >= l.start_ms && p[0] <= end);
      inLease.forEach((p, i) => {
        const isIdle = p[1] <= data.idle_utilization_pct;
        if (isIdle && runStart === null) runStart = p[0];
        const last = i === inLease.length - 1;
        if (runStart !== null && (!isIdle || last)) {
          const stop = isIdle ? (l.end_ms === null ? now : p[0]) : p[0];
          if (stop > runStart) {
            parts.push(s('rect', { x: x(runStart), y: top + barH - Math.min(12, barH / 2), width: Math.max(2, x(stop) - x(runStart)), height: Math.min(12, barH / 2),
              fill: `url(#${hatch})`, class: 'idle-mark' }, s('title', {}, `idle under lease: ${duration(stop - runStart)}`)));
          }
          runStart = null;
        }
      });
    }
  }
  // Curves: memory as an area, utilisation as a line, both over the lane height.
  if (samples.length) {
    const y = (frac) => plotH - 2 - frac * (plotH - 4);
    const mem = samples.map((p) => `${x(p[0]).toFixed(1)},${y(d.memory_bytes ? p[2] / d.memory_bytes : 0).toFixed(1)}`);
    parts.push(s('polygon', { points: `${x(samples[0][0])},${plotH} ${mem.join(' ')} ${x(samples.at(-1)[0])},${plotH}`, class: 'mem-area' }));
    parts.push(s('polyline', { points: samples.map((p) => `${x(p[0]).toFixed(1)},${y(p[1] / 100).toFixed(1)}`).join(' '), class: 'util-line' }));
  } else {
    parts.push(s('text', { x: width - 8, y: 14, class: 'note', 'text-anchor': 'end' },
      d.source === 'virtual' ? 'virtual device: no telemetry, no curves' : 'no readings'));
  }
  parts.push(s('line', { x1: width - 0.5, x2: width - 0.5, y1: 0, y2: plotH, class: 'now-line' }));
  const latest = samples.at(-1);
  return h('article', { class: `lane${idle ? ' idle' : ''}`, dataset: { device: d.index, held: held ? 'true' : 'false' } },
    h('header', {},
      h('h3', {}, `GPU ${d.index}`), h('span', { class: 'device-name' }, d.name),
      d.source === 'virtual' ? h('span', { class: 'badge virtual', title: 'Declared in the pipeline file; no physical device behind it' }, 'virtual') : null,
      h('span', { class: 'muted' }, bytes(d.memory_bytes)),
      latest ? h('span', { class: 'reading' }, `${latest[1]}% · ${bytes(latest[2])} used`) : null,
      holdBadge(d, data, held),
      held && held.progress ? h('span', { class: 'lane-progress' }, progressBar(held.progress)) : null,
      idle ? h('span', { class: 'badge idle-badge' }, `idle under lease ${duration(d.idle_ms)}`) : null),
    s('svg', { width, height: laneH, viewBox: `0 0 ${width} ${laneH}`, class: 'timeline', role: 'img',
      'aria-label': `GPU ${d.index} timeline` }, parts));
}
