// Overview, waiting queue, jobs list, pools and findings. Each view is
// { title, load, render, wants(event) [, mount, tick, apply] }.

import { get } from './api.js';
import { badge, fill, bytes, clock, duration, empty, h, jobLink, plural, s, shortId, when } from './format.js';

// ---------------------------------------------------------------- overview

function throughputChart(buckets) {
  const width = 240;
  const height = 48;
  const max = Math.max(1, ...buckets.map((b) => b.succeeded + b.failed + b.cancelled));
  const w = width / buckets.length;
  const bars = buckets.flatMap((b, i) => {
    const ok = (b.succeeded / max) * (height - 4);
    const bad = ((b.failed + b.cancelled) / max) * (height - 4);
    const title = `${clock(b.minute_ms)}: ${b.succeeded} succeeded, ${b.failed} failed, ${b.cancelled} cancelled`;
    return [
      s('rect', { x: i * w + 1, y: height - ok, width: Math.max(1, w - 2), height: ok, class: 'bar-ok' }, s('title', {}, title)),
      s('rect', { x: i * w + 1, y: height - ok - bad, width: Math.max(1, w - 2), height: bad, class: 'bar-bad' }, s('title', {}, title)),
    ];
  });
  return s('svg', { class: 'spark', viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
    'aria-label': 'jobs finished per minute' },
  s('line', { x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5, class: 'axis' }), bars);
}

function stat(label, value, cls) {
  return h('div', { class: `stat ${cls || ''}` }, h('span', { class: 'value' }, value), h('span', { class: 'label' }, label));
}

/** What a pool instance holds: a share ("6 GiB of GPU 0") or whole devices. */
export function instanceShare(i) {
  if (!i.devices.length) return '–';
  if (i.gpu_memory_bytes) return i.devices.map((d) => `${bytes(i.gpu_memory_bytes)} of GPU ${d}`).join(', ');
  return i.devices.map((d) => `GPU ${d} (whole)`).join(', ');
}

/** GPUs by how they are held: whole (a lease holds the device), shared (memory shares held,
 * by stages or pool instances) and free. */
export function gpuCounts(gpus) {
  const whole = gpus.filter((g) => g.exclusive).length;
  const shared = gpus.filter((g) => !g.exclusive && g.memory_leased_bytes > 0).length;
  return { whole, shared, free: gpus.length - whole - shared };
}

function gpuSummary(gpus) {
  if (!gpus.length) return 'none';
  const { whole, shared, free } = gpuCounts(gpus);
  // Only the kinds there are: "1 leased", "1 shared, 1 free", "2 free".
  const parts = [];
  if (whole) parts.push(`${whole} leased`);
  if (shared) parts.push(`${shared} shared`);
  if (free) parts.push(`${free} free`);
  return parts.join(', ');
}

export const overviewView = {
  title: () => 'Overview',
  async load() {
    const [overview, res] = await Promise.all([get('/v1/overview?minutes=15'), get('/v1/resources')]);
    return { overview, res };
  },
  wants: (e) => e.type !== 'gpu_samples',
  render(root, { overview, res }) {
    const instances = res.pools.flatMap((p) => p.instances);
    const ready = instances.filter((i) => i.state === 'idle' || i.state === 'busy').length;
    const summary = h('div', { class: 'cards summary' },
      h('a', { class: 'card link gpu-count', href: '#/gpus', title: 'leased: a stage or pool holds the whole device; shared: memory shares are held on it' },
        stat(`of ${res.gpus.length} ${res.gpus.length === 1 ? 'GPU' : 'GPUs'}`, gpuSummary(res.gpus))),
      h('div', { class: 'card' }, stat('CPU slots leased', `${res.cpu.leased} / ${res.cpu.capacity}`)),
      h('a', { class: 'card link', href: '#/queue' }, stat('waiting stages', res.waiting.length)),
      h('div', { class: 'card' }, stat('leases held', res.leases.length)),
      h('a', { class: 'card link', href: '#/pools' }, stat('pool instances ready', `${ready} / ${instances.length}`)),
    );
    const cards = overview.pipelines.map((p) => {
      const recent = p.throughput.slice(-5);
      const perMin = recent.reduce((n, b) => n + b.succeeded + b.failed + b.cancelled, 0) / recent.length;
      return h('article', { class: 'card pipeline', dataset: { pipeline: p.name } },
        h('header', {}, h('h3', {}, p.name), h('a', { href: `#/jobs?pipeline=${encodeURIComponent(p.name)}`, class: 'quiet-link' }, 'jobs →')),
        h('div', { class: 'stats' },
          stat('queued', p.queued, 'queued'),
          stat('running', p.running, 'running'),
          stat('succeeded', p.succeeded, 'succeeded'),
          stat('failed', p.failed, 'failed'),
          p.cancelled ? stat('cancelled', p.cancelled, 'cancelled') : null),
        h('div', { class: 'throughput' },
          throughputChart(p.throughput),
          h('div', { class: 'rate' }, h('strong', {}, perMin.toFixed(perMin < 10 ? 1 : 0)), ' jobs/min',
            h('br'), h('span', { class: 'muted' }, `last 5 of ${overview.minutes} min`))));
    });
    fill(root,
      h('h2', {}, 'Now'), summary,
      h('h2', {}, 'Pipelines'),
      cards.length ? h('div', { class: 'cards pipelines' }, cards) : empty('No pipelines configured.'));
  },
};

// ---------------------------------------------------------------- waiting queue

function holders(leases, pick) {
  const list = leases.filter(pick).map((l) => `${shortId(l.job)}/${l.stage}`);
  if (!list.length) return '';
  return list.length > 3 ? `${list.slice(0, 3).join(', ')} and ${list.length - 3} more` : list.join(', ');
}

// What an entry waits for, in words, from the capacity and the leases held now.
export function waitingFor(w, res, position) {
  const n = w.needs;
  const parts = [];
  if (n.gpu > 0) {
    const free = res.gpus.filter((g) => !g.exclusive && g.memory_leased_bytes === 0 && g.memory_foreign_bytes === 0);
    if (free.length < n.gpu) {
      const by = holders(res.leases, (l) => l.gpus.length > 0 || l.gpu_memory);
      const what = free.length === 0 ? (res.gpus.length === 1 ? 'the only one is held' : 'all held') : `only ${free.length} free`;
      parts.push(`needs ${plural(n.gpu, 'GPU')}, ${what}${by ? ` by ${by}` : ''}`);
    }
  }
  if (n.gpu_memory_bytes > 0) {
    const best = Math.max(0, ...res.gpus.filter((g) => !g.exclusive)
      .map((g) => g.memory_bytes - g.memory_leased_bytes - g.memory_foreign_bytes));
    if (best < n.gpu_memory_bytes) {
      const by = holders(res.leases, (l) => l.gpus.length > 0 || l.gpu_memory);
      parts.push(`needs ${bytes(n.gpu_memory_bytes)} of GPU memory, at most ${bytes(best)} free${by ? `; held by ${by}` : ''}`);
    }
  }
  if (n.cpu > 0 && res.cpu.capacity - res.cpu.leased < n.cpu) {
    const by = holders(res.leases, (l) => l.cpu > 0);
    parts.push(`needs ${plural(n.cpu, 'CPU slot')}, ${res.cpu.leased} of ${res.cpu.capacity} held${by ? ` by ${by}` : ''}`);
  }
  for (const [name, want] of Object.entries(n.counters)) {
    const c = res.counters[name];
    if (!c || c.capacity - c.leased >= want) continue;
    if (name.startsWith('pool:')) {
      const pool = name.slice(5);
      const by = holders(res.leases, (l) => (l.counters[name] || 0) > 0);
      parts.push(`needs an idle instance of pool ${pool}${by ? `, busy with ${by}` : ''}`);
    } else {
      parts.push(`needs ${want} ${name}, ${c.leased} of ${c.capacity} held`);
    }
  }
  if (parts.length) return parts.join('; ');
  return position === 0 ? 'its resources are free: starting' : `resources free; behind ${plural(position, 'earlier entry')}`.replace('entrys', 'entries');
}

export const queueView = {
  title: () => 'Waiting queue',
  load: () => get('/v1/resources').then((res) => ({ res, loadedAt: Date.now() })),
  wants: (e) => e.type !== 'gpu_samples' && e.type !== 'findings',
  render(root, { res }) {
    const rows = res.waiting.map((w, i) => h('tr', { dataset: { job: w.job } },
      h('td', { class: 'num' }, i + 1),
      h('td', {}, jobLink(w.job)),
      h('td', {}, w.pipeline),
      h('td', {}, w.stage),
      h('td', { class: 'num' }, w.priority),
      h('td', { class: 'num waited', dataset: { waited: w.waited_ms } }, duration(w.waited_ms)),
      h('td', { class: 'reason' }, waitingFor(w, res, i))));
    fill(root,
      h('h2', {}, 'Waiting queue ', h('span', { class: 'muted' }, '(in the order they will be served)')),
      rows.length
        ? h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, ['#', 'job', 'pipeline', 'stage', 'priority', 'waiting', 'waiting for'].map((c) => h('th', {}, c)))),
          h('tbody', {}, rows))
        : empty('Nothing is waiting: every queued stage has its resources.'));
  },
  tick(root, data) {
    const elapsed = Date.now() - data.loadedAt;
    for (const td of root.querySelectorAll('td.waited')) td.textContent = duration(Number(td.dataset.waited) + elapsed);
  },
};

// ---------------------------------------------------------------- jobs list

export const jobsFilter = { state: '', pipeline: '', limit: 50 };
let reloadJobs = () => {};
const JOB_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];

export const jobsView = {
  title: () => 'Jobs',
  mount(root, params, { refresh }) {
    reloadJobs = refresh;
    const q = new URLSearchParams(location.hash.split('?')[1] || '');
    if (q.has('pipeline')) jobsFilter.pipeline = q.get('pipeline');
    if (q.has('state')) jobsFilter.state = q.get('state');
    const stateSelect = h('select', { id: 'filter-state', onchange: (e) => { jobsFilter.state = e.target.value; refresh(); } },
      h('option', { value: '' }, 'any state'), JOB_STATES.map((st) => h('option', { value: st }, st)));
    stateSelect.value = jobsFilter.state;
    const pipelineInput = h('input', { id: 'filter-pipeline', type: 'search', placeholder: 'pipeline', value: jobsFilter.pipeline,
      onchange: (e) => { jobsFilter.pipeline = e.target.value.trim(); refresh(); } });
    root.append(
      h('div', { class: 'toolbar' }, h('h2', {}, 'Jobs'),
        h('label', {}, 'State ', stateSelect), h('label', {}, 'Pipeline ', pipelineInput)),
      h('div', { class: 'list' }));
  },
  load() {
    const q = new URLSearchParams({ limit: String(jobsFilter.limit) });
    if (jobsFilter.state) q.set('state', jobsFilter.state);
    if (jobsFilter.pipeline) q.set('pipeline', jobsFilter.pipeline);
    return get(`/v1/jobs?${q}`);
  },
  wants: (e) => ['job_submitted', 'job_finished', 'attempt_started', 'stage_cancelled'].includes(e.type),
  render(root, list) {
    const rows = list.jobs.map((j) => h('tr', { dataset: { job: j.id } },
      h('td', {}, jobLink(j.id)),
      h('td', {}, j.pipeline),
      h('td', {}, badge(j.state)),
      h('td', { class: 'num' }, j.priority),
      h('td', {}, when(j.created_at)),
      h('td', {}, when(j.finished_at)),
      h('td', { class: 'error-text' }, j.error || '')));
    const more = list.next_cursor && jobsFilter.limit < 500
      ? h('button', { type: 'button', class: 'quiet', onclick: () => { jobsFilter.limit = Math.min(500, jobsFilter.limit + 50); reloadJobs(); } }, 'Show more')
      : null;
    fill(root.querySelector('.list'), rows.length
      ? h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['job', 'pipeline', 'state', 'priority', 'created', 'finished', 'error'].map((c) => h('th', {}, c)))),
        h('tbody', {}, rows))
      : empty('No job matches these filters.'), more);
  },
};

// ---------------------------------------------------------------- pools

export const poolsView = {
  title: () => 'Pools',
  async load() {
    const [res, history] = await Promise.all([get('/v1/resources'), get('/v1/pools/history?limit=200')]);
    return { pools: res.pools, history: history.transitions };
  },
  wants: (e) => e.type === 'pool_instance' || e.type === 'attempt_started' || e.type === 'attempt_ended',
  render(root, { pools, history }) {
    if (!pools.length) {
      fill(root, h('h2', {}, 'Worker pools'),
        empty('No worker pools are configured (declare them under `workers:` in the pipeline file).'));
      return;
    }
    fill(root, h('h2', {}, 'Worker pools'), pools.map((p) => {
      const rows = p.instances.map((i) => h('tr', { dataset: { instance: i.index } },
        h('td', { class: 'num' }, `#${i.index}`),
        h('td', {}, badge(i.state)),
        h('td', { class: 'num' }, i.pid || '–'),
        h('td', { class: 'instance-devices' }, instanceShare(i)),
        h('td', { class: 'mono' }, i.task ? i.task.split('/').map((part, k) => (k === 0 ? shortId(part) : part)).join('/') : '–'),
        h('td', { class: 'num' }, i.tasks_done),
        h('td', { class: 'num' }, i.restarts),
        h('td', { class: 'num' }, i.consecutive_failures),
        h('td', { class: 'error-text' }, i.last_error || '')));
      const events = history.filter((t) => t.pool === p.name).slice(0, 30).map((t) => h('li', {},
        h('span', { class: 'mono muted' }, clock(t.at_ms)), ' ',
        `#${t.index} `, t.from ? badge(t.from) : null, t.from ? ' → ' : '', badge(t.to),
        t.restarts ? h('span', { class: 'muted' }, ` restarts: ${t.restarts}`) : null,
        t.last_error && t.to !== 'idle' && t.to !== 'busy' ? h('div', { class: 'error-text' }, t.last_error) : null));
      return h('section', { class: 'card pool' },
        h('h3', {}, p.name),
        h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, ['instance', 'state', 'pid', 'devices', 'task', 'tasks', 'restarts', 'failures in a row', 'last error'].map((c) => h('th', {}, c)))),
          h('tbody', {}, rows)),
        h('h4', {}, 'State changes and restarts'),
        events.length ? h('ul', { class: 'history' }, events) : empty('No changes since the engine started.'));
    }));
  },
};

// ---------------------------------------------------------------- findings

function finding(f) {
  return h('article', { class: `card finding ${f.closed_at ? 'closed' : 'open'}`, dataset: { kind: f.kind } },
    h('header', {}, h('span', { class: 'badge kind' }, f.kind.replaceAll('_', ' ')), h('h3', {}, f.summary)),
    h('p', { class: 'muted' }, `about ${f.subject} · opened ${when(f.opened_at)}`, f.closed_at ? ` · closed ${when(f.closed_at)}` : ''),
    f.evidence.length
      ? h('table', { class: 'evidence' }, h('tbody', {}, f.evidence.map((e) => h('tr', {}, h('th', {}, e.label), h('td', { class: 'mono' }, e.value)))))
      : null,
    h('p', {}, h('strong', {}, 'Cause: '), f.cause),
    h('p', {}, h('strong', {}, 'Fix: '), f.fix));
}

export const findingsView = {
  title: () => 'Findings',
  load: () => get('/v1/diagnosis'),
  wants: (e) => e.type === 'findings',
  render(root, d) {
    fill(root,
      h('h2', {}, 'Findings ', h('span', { class: 'muted' }, `(gpuflow doctor · checked ${when(d.checked_at)})`)),
      d.open.length ? h('div', { class: 'findings' }, d.open.map(finding)) : empty('Nothing is wrong now.'),
      d.recent.length ? h('details', {}, h('summary', {}, `Recently closed (${d.recent.length})`), h('div', { class: 'findings' }, d.recent.map(finding))) : null);
  },
};
