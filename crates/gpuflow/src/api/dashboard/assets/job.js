// One job: the stage DAG with states, each running stage's progress, each stage's attempts,
// durations, outputs and errors, the tails of its logs, and a cancel button. Progress events
// from the feed are applied in place (no reload); other events of the job reload it.

import { get, post } from './api.js';
import { badge, fill, between, bytes, duration, empty, h, progressBar, progressOf, s, when } from './format.js';

const LOG_TAIL = 8192;
let reload = () => {};
const chosenStream = {}; // stage -> 'stderr' | 'stdout'

export const jobView = {
  title: (p) => `job ${p.id.slice(-8)}`,
  mount(root, params, { refresh }) {
    reload = refresh;
  },
  async load({ id }) {
    const job = await get(`/v1/jobs/${encodeURIComponent(id)}`);
    const logs = await Promise.all(job.stages.map((st) => {
      if (!st.attempts) return null;
      const stream = chosenStream[st.name] || 'stderr';
      return get(`/v1/jobs/${encodeURIComponent(id)}/stages/${encodeURIComponent(st.name)}/log?stream=${stream}&tail_bytes=${LOG_TAIL}`)
        .catch((e) => ({ note: e.message, text: '' }));
    }));
    return { job, logs };
  },
  wants: (e, p) => e.job === p.id && e.type !== 'progress',
  apply(data, e, p) {
    if (e.type !== 'progress' || e.job !== p.id) return false;
    const st = data.job.stages.find((x) => x.name === e.stage);
    if (!st || st.state !== 'running' || st.attempts !== e.attempt) return false;
    st.progress = progressOf(e);
    return true;
  },
  render(root, { job, logs }, { id }) {
    const active = job.state === 'queued' || job.state === 'running';
    const cancel = h('button', { type: 'button', id: 'cancel-job', class: 'danger', disabled: !active,
      onclick: async (e) => {
        e.target.disabled = true;
        e.target.textContent = 'Cancelling…';
        try {
          await post(`/v1/jobs/${encodeURIComponent(id)}/cancel`);
        } catch (err) {
          e.target.textContent = `Cancel failed: ${err.message}`;
        }
        reload();
      } }, active ? 'Cancel job' : 'Cancel job');
    fill(root,
      h('div', { class: 'toolbar' },
        h('h2', {}, 'Job ', h('span', { class: 'mono' }, job.id)), h('span', { id: 'job-state' }, badge(job.state)), cancel),
      h('dl', { class: 'facts' },
        fact('pipeline', job.pipeline), fact('priority', job.priority),
        fact('created', when(job.created_at)), fact('started', when(job.started_at)),
        fact('finished', when(job.finished_at)),
        fact('duration', job.started_at ? duration(between(job.started_at, job.finished_at)) : '–'),
        job.idempotency_key ? fact('idempotency key', job.idempotency_key) : null),
      job.error ? h('div', { class: 'error-banner' }, job.error) : null,
      h('section', { class: 'card' }, h('h3', {}, 'Stages'), dag(job.stages)),
      h('div', { class: 'stages' }, job.stages.map((st, i) => stageCard(job, st, logs[i]))),
      h('div', { class: 'io' },
        h('section', { class: 'card' }, h('h3', {}, 'Input'), json(job.input)),
        h('section', { class: 'card' }, h('h3', {}, 'Output'), job.output ? json(job.output) : empty(active ? 'No output yet.' : 'No output.'))));
  },
};

function fact(label, value) {
  return h('div', { class: 'fact' }, h('dt', {}, label), h('dd', {}, value));
}

function json(value) {
  const text = JSON.stringify(value, null, 2);
  return h('pre', { class: 'json' }, text.length > 4000 ? `${text.slice(0, 4000)}\n…` : text);
}

// Stages in columns by depth (longest path from a first stage), edges from each `after`.
function dag(stages) {
  const index = new Map(stages.map((st, i) => [st.name, i]));
  const depth = stages.map(() => 0);
  for (let pass = 0; pass < stages.length; pass += 1) {
    stages.forEach((st, i) => {
      for (const p of st.after) depth[i] = Math.max(depth[i], depth[index.get(p)] + 1);
    });
  }
  const cols = Math.max(...depth) + 1;
  const rows = [];
  const pos = stages.map((st, i) => {
    const col = depth[i];
    rows[col] = (rows[col] || 0) + 1;
    return { col, row: rows[col] - 1 };
  });
  const W = 168;
  const H = 52;
  const GX = 56;
  const GY = 16;
  const width = cols * W + (cols - 1) * GX + 8;
  const height = Math.max(...rows) * (H + GY) - GY + 8;
  const at = (i) => ({ x: 4 + pos[i].col * (W + GX), y: 4 + pos[i].row * (H + GY) });
  const edges = stages.flatMap((st, i) => st.after.map((p) => {
    const a = at(index.get(p));
    const b = at(i);
    const x1 = a.x + W;
    const y1 = a.y + H / 2;
    const x2 = b.x;
    const y2 = b.y + H / 2;
    const mid = (x1 + x2) / 2;
    return s('path', { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 6},${y2}`, class: 'edge', 'marker-end': 'url(#arrow)' });
  }));
  const nodes = stages.map((st, i) => {
    const { x, y } = at(i);
    const took = st.started_at ? duration(between(st.started_at, st.finished_at)) : '';
    const fraction = st.progress && typeof st.progress.fraction === 'number' ? st.progress.fraction : null;
    return s('a', { href: `#stage-${st.name}`, class: `node state-${st.state}`, dataset: { stage: st.name, state: st.state },
      onclick: (e) => {
        e.preventDefault();
        document.getElementById(`stage-${st.name}`)?.scrollIntoView({ behavior: 'smooth' });
      } },
    s('rect', { x, y, width: W, height: H, rx: 8 }),
    s('text', { x: x + 10, y: y + 20, class: 'node-name' }, st.name),
    s('text', { x: x + 10, y: y + 39, class: 'node-state' },
      `${st.state}${fraction !== null ? ` · ${Math.round(fraction * 100)}%` : ''}${st.attempts > 1 ? ` · ${st.attempts} attempts` : ''}${took ? ` · ${took}` : ''}`),
    fraction !== null ? s('rect', { x: x + 1, y: y + H - 5, width: Math.max(0, (W - 2) * fraction), height: 4, class: 'node-progress' }) : null);
  });
  return h('div', { class: 'dag-wrap' }, s('svg', { class: 'dag', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'stage graph' },
    s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 2, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      s('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrow' }))),
    edges, nodes));
}

function lease(l) {
  if (!l || typeof l !== 'object') return '–';
  const parts = [];
  if (l.gpus && l.gpus.length) parts.push(`GPU ${l.gpus.join(', ')}`);
  if (l.gpu_memory) parts.push(`${bytes(l.gpu_memory.bytes)} on GPU ${l.gpu_memory.device}`);
  if (l.cpu) parts.push(`${l.cpu} CPU`);
  for (const [k, v] of Object.entries(l.counters || {})) parts.push(`${v} ${k}`);
  return parts.join(', ') || 'nothing';
}

function stageCard(job, st, log) {
  const attempts = st.attempt_history.map((a) => h('tr', {},
    h('td', { class: 'num' }, a.attempt), h('td', {}, badge(a.state)), h('td', {}, when(a.started_at)),
    h('td', { class: 'num' }, duration(between(a.started_at, a.finished_at))),
    h('td', {}, lease(a.lease)),
    h('td', { class: 'num attempt-batch' }, a.batch_size ?? '–'),
    h('td', { class: 'num' }, a.exit_code ?? (a.signal ? `signal ${a.signal}` : '–')),
    h('td', { class: 'error-text' }, a.error || '')));
  const stream = chosenStream[st.name] || 'stderr';
  const switcher = st.attempts ? h('div', { class: 'segmented small' }, ['stderr', 'stdout'].map((name) => h('button', {
    type: 'button', class: name === stream ? 'seg active' : 'seg',
    onclick: () => {
      chosenStream[st.name] = name;
      reload();
    },
  }, name))) : null;
  let logBody = null;
  if (log) {
    logBody = log.text
      ? h('pre', { class: 'log', dataset: { stage: st.name } }, log.truncated ? `… (last ${bytes(log.text.length)} of ${bytes(log.size_bytes)})\n${log.text}` : log.text)
      : empty(log.note || `attempt ${log.attempt} wrote nothing to ${stream}`);
  }
  return h('section', { class: 'card stage', id: `stage-${st.name}`, dataset: { stage: st.name } },
    h('header', {}, h('h3', {}, st.name), badge(st.state),
      st.after.length ? h('span', { class: 'muted' }, `after ${st.after.join(', ')}`) : null),
    h('dl', { class: 'facts' },
      fact('attempts', `${st.attempts}${st.failures ? ` (${st.failures} failed)` : ''}`),
      fact('started', when(st.started_at)), fact('finished', when(st.finished_at)),
      fact('duration', st.started_at ? duration(between(st.started_at, st.finished_at)) : '–'),
      st.retry_at ? fact('retry at', when(st.retry_at)) : null,
      st.exit_code !== null && st.exit_code !== undefined ? fact('exit code', st.exit_code) : null),
    // What a waiting stage waits for, as the engine words it (GET /v1/jobs/{id}: waiting_for).
    st.waiting_for ? h('div', { class: 'waiting-for reason', dataset: { stage: st.name } }, st.waiting_for.sentence) : null,
    st.progress ? h('div', { class: 'stage-progress', dataset: { stage: st.name } }, progressBar(st.progress)) : null,
    st.error ? h('div', { class: 'error-banner' }, st.error) : null,
    st.output ? h('details', {}, h('summary', {}, 'Output'), json(st.output)) : null,
    attempts.length ? h('table', { class: 'grid attempts' },
      h('thead', {}, h('tr', {}, ['attempt', 'result', 'started', 'took', 'lease', 'batch', 'exit', 'error'].map((c) => h('th', {}, c)))),
      h('tbody', {}, attempts)) : null,
    st.attempts ? h('div', { class: 'log-head' }, h('h4', {}, `Log tail · attempt ${log && log.attempt ? log.attempt : st.attempts}`), switcher) : null,
    logBody);
}
