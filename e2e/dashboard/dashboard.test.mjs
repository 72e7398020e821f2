// End-to-end test of the dashboard: a real `gpuflow serve` on the quickstart pipeline, and
// headless Chromium (Debian's `chromium` package) driven by playwright-core.
//
//   node e2e/dashboard/dashboard.test.mjs [path/to/gpuflow]     (default: target/debug/gpuflow)
//
// Checks: the page loads with no console errors (and nothing from another origin); a job
// submitted through the API shows up and moves through its states live, with the progress
// its GPU stage reports (bar and message); the GPU lane shows the lease and its holder's
// progress; the waiting queue shows the engine's sentence for what an entry waits for; cancel
// works from the page; on a second engine, GPU memory shares (a pool instance's and stages')
// are shown as shares, counted as shared, and their lease labels do not overlap.
// Screenshots go to target/dashboard-e2e/.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = path.resolve(process.argv[2] || process.env.GPUFLOW_BIN || path.join(repo, 'target/debug/gpuflow'));
const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const shots = path.join(repo, 'target/dashboard-e2e');
const STEP_TIMEOUT = 30_000;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gpuflow-dashboard-e2e-'));
const telemetry = path.join(tmp, 'gpu0.json');
const engineLog = path.join(tmp, 'engine.log');
let engine = null;
let context = null;
let telemetryTimer = null;

function log(message) {
  console.log(`[e2e] ${message}`);
}

// The quickstart pipeline as shipped, with a free port, a temp data dir, telemetry for its
// virtual GPU (so the lane has curves) and a longer GPU stage (so a lease can be watched).
function writeConfig() {
  const original = fs.readFileSync(path.join(repo, 'examples/quickstart.yaml'), 'utf8');
  const edits = [
    [/^listen: .*$/m, 'listen: 127.0.0.1:0'],
    [/^data_dir: .*$/m, `data_dir: ${path.join(tmp, 'data')}`],
    [/gpus: \[\{memory: 16GiB, name: virtual-gpu-0\}\]/, `gpus: [{memory: 16GiB, name: virtual-gpu-0, telemetry: ${telemetry}}]`],
    [/(\n {6}- name: infer[^\n]*\n)/, '$1        env: {QUICKSTART_INFER_SECONDS: "4"}\n'],
  ];
  let text = original;
  for (const [pattern, replacement] of edits) {
    const next = text.replace(pattern, replacement);
    assert.notEqual(next, text, `examples/quickstart.yaml changed shape: ${pattern} no longer matches`);
    text = next;
  }
  const file = path.join(tmp, 'quickstart.yaml');
  fs.writeFileSync(file, text);
  return file;
}

// A made-up but plausible reading every 400 ms, written atomically.
function startTelemetry() {
  const write = () => {
    const t = Date.now() / 1000;
    const utilization = Math.max(0, Math.round(45 + 55 * Math.sin(t / 4)));
    const memory = Math.round((3 + 2 * Math.sin(t / 7)) * 2 ** 30);
    fs.writeFileSync(`${telemetry}.tmp`, JSON.stringify({ utilization, memory_used: memory }));
    fs.renameSync(`${telemetry}.tmp`, telemetry);
  };
  write();
  telemetryTimer = setInterval(write, 400);
}

// A second engine for GPU shares: two virtual GPUs, a worker pool whose instance holds 6 GiB
// of one for its lifetime, and stages that hold 4 GiB shares, several at once on one device.
function writeSharesConfig() {
  const file = path.join(tmp, 'shares.yaml');
  fs.writeFileSync(file, `listen: 127.0.0.1:0
data_dir: ${path.join(tmp, 'shares-data')}
resources:
  gpus: [{memory: 16GiB, name: virtual-gpu-0}, {memory: 16GiB, name: virtual-gpu-1}]
  cpu: 8
workers:
  shared:
    command: [python3, examples/chain/chain_worker.py]
    instances: 1
    needs: {gpu_memory: 6GiB}
    env: {CHAIN_SCALE: "2"}
pipelines:
  pooled:
    stages:
      - {name: ocr, worker: shared}
  shares:
    stages:
      - {name: left, needs: {gpu_memory: 4GiB}, command: [sleep, "8"]}
      - {name: right, after: [], needs: {gpu_memory: 4GiB}, command: [sleep, "8"]}
`);
  return file;
}

const engines = [];

async function startEngine(config, dataDir = 'data') {
  const out = fs.openSync(engineLog, 'a');
  // The quickstart's stage commands are relative to the repository root.
  engine = spawn(bin, ['serve', '--config', config], { cwd: repo, stdio: ['ignore', out, out] });
  engines.push(engine);
  const addrFile = path.join(tmp, dataDir, 'listen.addr');
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (engine.exitCode !== null) throw new Error(`engine exited with ${engine.exitCode}`);
    if (fs.existsSync(addrFile)) {
      const base = `http://${fs.readFileSync(addrFile, 'utf8').trim()}`;
      const ok = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (ok) return base;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('engine did not come up in 30 s');
}

async function api(base, method, route, body) {
  const response = await fetch(`${base}${route}`, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await response.json();
  assert.ok(response.ok, `${method} ${route}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

const submit = (base, text) => api(base, 'POST', '/v1/jobs', { pipeline: 'quickstart', input: { text } }).then((j) => j.id);

async function main() {
  assert.ok(fs.existsSync(bin), `no gpuflow binary at ${bin}; build it (cargo build -p gpuflow) or pass its path`);
  assert.ok(fs.existsSync(chromiumPath), `no Chromium at ${chromiumPath}; apt-get install -y chromium`);
  fs.mkdirSync(shots, { recursive: true });
  startTelemetry();
  const base = await startEngine(writeConfig());
  // The engines' own origins (a second one starts for the shares step).
  const origins = new Set([new URL(base).origin]);
  log(`engine at ${base}, data in ${tmp}`);

  context = await chromium.launchPersistentContext(path.join(tmp, 'profile'), {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1360, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  const consoleErrors = [];
  const foreign = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(`uncaught: ${e.message}`));
  page.on('request', (r) => {
    const url = new URL(r.url());
    if (url.protocol.startsWith('http') && !origins.has(url.origin)) foreign.push(r.url());
  });

  // 1. The page loads, connects to the live feed, and logs no error.
  await page.goto(`${base}/`);
  await page.waitForSelector('.view-overview[data-loaded="true"]');
  await page.waitForSelector('#live[data-state="live"]');
  await page.waitForSelector('.card.pipeline[data-pipeline="quickstart"]');
  assert.deepEqual(consoleErrors, [], 'console errors on load');
  log('page loaded, live feed connected, no console errors');

  // 2. A job submitted through the API shows up in the list, then moves through its states
  //    on its page without a reload.
  await page.goto(`${base}/#/jobs`);
  await page.waitForSelector('.view-jobs[data-loaded="true"]');
  await page.evaluate(() => { window.__notReloaded = true; });
  const jobA = await submit(base, 'the quick brown fox');
  await page.waitForSelector(`.view-jobs tr[data-job="${jobA}"]`);
  log(`job ${jobA} appeared in the list without a reload`);
  await page.click(`.view-jobs tr[data-job="${jobA}"] a`);
  await page.waitForSelector('.view-job[data-loaded="true"] #job-state');
  await page.evaluate(() => {
    window.__states = [];
    window.__progress = [];
    const note = () => {
      const s = document.querySelector('#job-state')?.textContent;
      if (s && window.__states.at(-1) !== s) window.__states.push(s);
      // The infer stage's progress as the page shows it: its card's bar and message, and
      // the percentage on its node in the graph.
      const bar = document.querySelector('.stage-progress[data-stage="infer"] .progress');
      if (bar) {
        const seen = {
          value: bar.querySelector('progress')?.value,
          message: bar.querySelector('.progress-message')?.textContent,
          node: document.querySelector('.node[data-stage="infer"] .node-state')?.textContent,
        };
        if (JSON.stringify(window.__progress.at(-1)) !== JSON.stringify(seen)) window.__progress.push(seen);
      }
    };
    note();
    new MutationObserver(note).observe(document.getElementById('main'), { childList: true, subtree: true, characterData: true });
  });
  await page.waitForFunction(() => document.querySelector('#job-state')?.textContent === 'succeeded', null, { timeout: 60_000 });
  const states = await page.evaluate(() => window.__states);
  assert.ok(await page.evaluate(() => window.__notReloaded === true), 'the page was reloaded');
  assert.ok(states.includes('running'), `job page never showed running: ${states}`);
  assert.equal(states.at(-1), 'succeeded', `states seen: ${states}`);
  assert.ok(states.indexOf('running') < states.indexOf('succeeded'), `states out of order: ${states}`);
  for (const stage of ['prepare', 'infer', 'summarize']) {
    await page.waitForSelector(`.node[data-stage="${stage}"][data-state="succeeded"]`);
  }
  await page.waitForSelector('pre.log[data-stage="infer"]');
  const inferLog = await page.textContent('pre.log[data-stage="infer"]');
  assert.match(inferLog, /scored \d+ tokens on device 0/, 'the infer stage log tail');
  log(`job page followed the job live: ${states.join(' -> ')}`);
  // The quickstart's infer stage reports 8 batches through $GPUFLOW_PROGRESS.
  const progress = await page.evaluate(() => window.__progress);
  assert.ok(progress.length >= 2, `the job page showed the infer stage's progress too rarely: ${JSON.stringify(progress)}`);
  for (const p of progress) {
    assert.match(p.message || '', /^batch [1-8]\/8$/, `progress message: ${JSON.stringify(p)}`);
    assert.ok(p.value >= 0 && p.value < 1, `progress bar value: ${JSON.stringify(p)}`);
    assert.match(p.node || '', /^running · \d+%/, `the graph node shows the percentage: ${JSON.stringify(p)}`);
  }
  const values = progress.map((p) => p.value);
  assert.ok(values.some((v, i) => i > 0 && v > values[i - 1]), `progress never advanced: ${values}`);
  assert.equal(await page.$('.stage-progress'), null, 'progress still shown after the job ended');
  log(`job page showed infer's progress live: ${progress.map((p) => p.message).join(', ')}`);
  await page.screenshot({ path: path.join(shots, 'job.png'), fullPage: true });

  // 3. The GPU lane shows the lease while it is held (and the inventory is labelled virtual).
  await page.goto(`${base}/#/gpus`);
  await page.waitForSelector('.view-gpus[data-loaded="true"]');
  await page.waitForSelector('.lane[data-device="0"] .badge.virtual');
  const jobB = await submit(base, 'subtitle frames to text');
  await page.waitForSelector(`.lane[data-device="0"][data-held="true"] a.lease.open[data-job="${jobB}"][data-stage="infer"]`);
  const header = await page.textContent('.lane[data-device="0"] header');
  assert.match(header, new RegExp(`leased by ${jobB.slice(-8)}/infer`), `lane header: ${header}`);
  assert.ok(await page.$(`.lane[data-device="0"] a.lease.closed[data-job="${jobA}"]`), 'the earlier lease of job A is on the lane');
  log(`GPU 0 lane shows job ${jobB}'s lease on infer`);
  // ...with its holder's progress: on the bar, in the lane header and in "Held now".
  await page.waitForSelector(`.lane[data-device="0"] a.lease.open[data-job="${jobB}"] .lease-progress`);
  await page.waitForFunction((job) => /^batch [2-8]\/8$/.test(
    document.querySelector(`.held tr[data-job="${job}"] .held-progress .progress-message`)?.textContent || ''), jobB);
  const laneProgress = await page.textContent('.lane[data-device="0"] header .lane-progress');
  assert.match(laneProgress, /\d+%batch [1-8]\/8/, `lane header progress: ${laneProgress}`);
  const fraction = Number(await page.getAttribute(`.lane[data-device="0"] a.lease.open[data-job="${jobB}"] .lease-progress`, 'data-fraction'));
  assert.ok(fraction > 0 && fraction < 1, `lease bar progress: ${fraction}`);
  await page.screenshot({ path: path.join(shots, 'gpus-progress.png'), fullPage: true });
  log(`GPU 0 lane shows ${jobB.slice(-8)}'s progress: ${laneProgress}`);

  // 4. The waiting queue says what a waiting stage needs and who holds it.
  const jobC = await submit(base, 'gpus should never idle');
  await page.goto(`${base}/#/queue`);
  await page.waitForSelector(`.view-queue tr[data-job="${jobC}"]`);
  const reason = await page.textContent(`.view-queue tr[data-job="${jobC}"] .reason`);
  assert.match(reason, new RegExp(`^Needs 1 GPU, the only one is held by ${jobB.slice(-8)}/infer`), `queue reason: ${reason}`);
  // The sentence is the engine's (GET /v1/resources), shown as it is, not worded by the page.
  const resources = await api(base, 'GET', '/v1/resources');
  const entry = resources.waiting.find((w) => w.job === jobC);
  assert.ok(entry, `job C is not in the API's waiting queue: ${JSON.stringify(resources.waiting)}`);
  assert.equal(reason, entry.waiting_for.sentence, 'the page shows the API\'s sentence');
  assert.equal(entry.waiting_for.reasons[0].kind, 'gpu', JSON.stringify(entry.waiting_for));
  const script = await (await fetch(`${base}/ui/views.js`)).text();
  assert.doesNotMatch(script, /needs \$\{|the only one is held/, 'the dashboard no longer words the reason itself');
  log(`queue: ${jobC.slice(-8)} ${reason}`);
  // The job page shows the engine's sentence on a waiting stage's card too: `summarize`
  // waits for `infer`, which has not run yet.
  await page.goto(`${base}/#/jobs/${jobC}`);
  await page.waitForSelector('.view-job[data-loaded="true"] .waiting-for[data-stage="summarize"]');
  const shown = await page.textContent('.waiting-for[data-stage="summarize"]');
  const summarize = (await api(base, 'GET', `/v1/jobs/${jobC}`)).stages.find((st) => st.name === 'summarize');
  assert.equal(shown, summarize.waiting_for.sentence, 'the job page shows the API\'s sentence');
  assert.match(shown, /infer/, `summarize waits for infer: ${shown}`);
  log(`job page: ${jobC.slice(-8)}/summarize ${shown}`);
  await page.goto(`${base}/#/gpus`);
  await page.waitForSelector(`.lane[data-device="0"] a.lease.open[data-job="${jobB}"]`);
  await page.waitForTimeout(600);
  await page.screenshot({ path: path.join(shots, 'gpus.png'), fullPage: true });

  // 5. Cancel works from the page.
  const jobD = await submit(base, 'cancel me');
  await page.goto(`${base}/#/jobs/${jobD}`);
  await page.waitForSelector('.view-job[data-loaded="true"] #cancel-job:not([disabled])');
  await page.click('#cancel-job');
  await page.waitForFunction(() => document.querySelector('#job-state')?.textContent === 'cancelled');
  const cancelled = await api(base, 'GET', `/v1/jobs/${jobD}`);
  assert.equal(cancelled.state, 'cancelled', 'the engine did not cancel the job');
  assert.ok(await page.$('#cancel-job[disabled]'), 'cancel button still enabled after cancel');
  log(`job ${jobD} cancelled from its page`);
  await page.screenshot({ path: path.join(shots, 'job-cancelled.png'), fullPage: true });

  // Overview, with jobs in several states.
  await page.goto(`${base}/#/`);
  await page.waitForSelector('.view-overview[data-loaded="true"]');
  await page.waitForFunction(() => {
    const card = document.querySelector('.card.pipeline[data-pipeline="quickstart"]');
    return card && Number(card.querySelector('.stat.succeeded .value').textContent) >= 1;
  });
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(shots, 'overview.png'), fullPage: true });

  // The other views render too.
  for (const view of ['pools', 'findings']) {
    await page.goto(`${base}/#/${view}`);
    await page.waitForSelector(`.view-${view}[data-loaded="true"]`);
  }

  // 6. GPU shares, on a second engine: a pool instance's 6 GiB and stages' 4 GiB shares are
  //    shown as shares, a device they hold is not "free", the overview counts it as shared,
  //    and lease labels never overlap, even with several leases on one device at once.
  await shares(page, consoleErrors, origins);

  assert.deepEqual(consoleErrors, [], 'console errors');
  assert.deepEqual(foreign, [], 'requests to other origins');
  log(`screenshots in ${path.relative(repo, shots)}/: overview.png, job.png, gpus-progress.png, gpus.png, job-cancelled.png, shares-gpus.png, shares-gpus-ended.png`);
}

// Labels (and progress messages) on a lane whose bounding boxes intersect, as pairs.
async function overlappingLabels(page) {
  return page.evaluate(() => {
    const hits = [];
    for (const laneEl of document.querySelectorAll('.lane')) {
      const boxes = [...laneEl.querySelectorAll('text.lease-label, text.lease-message')]
        .map((t) => ({ text: t.textContent, r: t.getBoundingClientRect() }))
        .filter((b) => b.r.width > 0);
      for (let i = 0; i < boxes.length; i++) {
        for (let j = i + 1; j < boxes.length; j++) {
          const [a, b] = [boxes[i].r, boxes[j].r];
          if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) {
            hits.push(`GPU ${laneEl.dataset.device}: "${boxes[i].text}" and "${boxes[j].text}"`);
          }
        }
      }
      // A label stays inside its own bar.
      for (const t of laneEl.querySelectorAll('a.lease text.lease-label')) {
        const bar = t.parentNode.querySelector('rect.lease-bar').getBoundingClientRect();
        const r = t.getBoundingClientRect();
        if (r.left < bar.left - 0.5 || r.right > bar.right + 0.5 || r.top < bar.top - 0.5 || r.bottom > bar.bottom + 0.5) {
          hits.push(`GPU ${laneEl.dataset.device}: "${t.textContent}" spills out of its bar`);
        }
      }
    }
    return hits;
  });
}

async function shares(page, consoleErrors, origins) {
  const base = await startEngine(writeSharesConfig(), 'shares-data');
  origins.add(new URL(base).origin);
  log(`shares engine at ${base}`);
  // The pool instance takes its 6 GiB once it starts.
  let poolDevice = null;
  for (const deadline = Date.now() + STEP_TIMEOUT; Date.now() < deadline; await new Promise((r) => setTimeout(r, 100))) {
    const res = await api(base, 'GET', '/v1/resources');
    const instance = res.pools.find((p) => p.name === 'shared').instances[0];
    if (instance && instance.devices.length && ['idle', 'busy'].includes(instance.state)) {
      assert.equal(instance.gpu_memory_bytes, 6 * 2 ** 30, `the instance's share: ${JSON.stringify(instance)}`);
      assert.equal(res.gpus[instance.devices[0]].memory_leased_bytes, 6 * 2 ** 30, 'the pool share counts as leased memory');
      poolDevice = instance.devices[0];
      break;
    }
  }
  assert.notEqual(poolDevice, null, 'the pool instance never became ready with a device');
  const otherDevice = 1 - poolDevice;

  // The overview counts a device held by a 6 GiB share as shared, not leased.
  await page.goto(`${base}/#/`);
  await page.waitForSelector('.view-overview[data-loaded="true"]');
  const count = await page.textContent('.gpu-count');
  assert.match(count, /^1 shared, 1 free\s*of 2 GPUs$/, `overview GPU count: ${count}`);

  // The GPU the pool holds is badged shared, naming the pool; the other one free.
  await page.goto(`${base}/#/gpus`);
  await page.waitForSelector('.view-gpus[data-loaded="true"]');
  const held = await page.textContent(`.lane[data-device="${poolDevice}"] .hold`);
  assert.match(held, /^shared: 6 GiB of 16 GiB held by pool shared #0$/, `pool device badge: ${held}`);
  assert.equal(await page.textContent(`.lane[data-device="${otherDevice}"] .hold`), 'free');
  const poolRow = await page.textContent('.held tr[data-pool="shared"] .share');
  assert.equal(poolRow, `6 GiB of GPU ${poolDevice}`, 'Held now: the pool instance\'s share');

  // A worker stage on the pool shows its instance's share, not "whole device".
  const pooled = (await api(base, 'POST', '/v1/jobs', { pipeline: 'pooled', input: {} })).id;
  const stageShares = [];
  for (let i = 0; i < 3; i++) stageShares.push((await api(base, 'POST', '/v1/jobs', { pipeline: 'shares', input: {} })).id);
  await page.waitForSelector(`.lane[data-device="${poolDevice}"] a.lease.open[data-job="${pooled}"][data-stage="ocr"]`);
  assert.equal(await page.getAttribute(`a.lease.open[data-job="${pooled}"]`, 'data-share'), `6 GiB of GPU ${poolDevice}`);
  await page.waitForSelector(`.held tr[data-job="${pooled}"] .share`);
  assert.equal(await page.textContent(`.held tr[data-job="${pooled}"] .share`), `6 GiB of GPU ${poolDevice}`);
  // Six 4 GiB stages at once on two devices: some run side by side on one device.
  await page.waitForFunction((jobs) => jobs.every((j) => document.querySelectorAll(`a.lease.open[data-job="${j}"]`).length === 2), stageShares);
  assert.ok(await page.$('a.lease.open[data-row="1"]'), 'leases held at once on one device share its band in rows');
  for (const j of stageShares) {
    for (const share of await page.$$eval(`.held tr[data-job="${j}"] .share`, (cells) => cells.map((c) => c.textContent))) {
      assert.match(share, /^4 GiB of GPU [01]$/, `stage share: ${share}`);
    }
  }
  for (const d of [0, 1]) {
    const badge = await page.textContent(`.lane[data-device="${d}"] .hold`);
    assert.match(badge, /^shared: \d+ GiB of 16 GiB held by /, `GPU ${d} with shares is not free: ${badge}`);
  }
  assert.deepEqual(await overlappingLabels(page), [], 'lease labels overlap');
  await page.screenshot({ path: path.join(shots, 'shares-gpus.png'), fullPage: true });
  // ...and once they ended, side by side in history.
  await page.waitForFunction((jobs) => jobs.every((j) => document.querySelectorAll(`a.lease.closed[data-job="${j}"]`).length === 2), stageShares, { timeout: 60_000 });
  // Now the bars are seconds wide: leases side by side carry labels, and still none overlaps.
  await page.waitForFunction(() => document.querySelectorAll('a.lease[data-row="1"] text.lease-label').length > 0);
  assert.deepEqual(await overlappingLabels(page), [], 'lease labels overlap after the leases ended');
  await page.screenshot({ path: path.join(shots, 'shares-gpus-ended.png'), fullPage: true });

  await page.goto(`${base}/#/pools`);
  await page.waitForSelector('.view-pools[data-loaded="true"]');
  assert.equal(await page.textContent('.pool tr[data-instance="0"] .instance-devices'), `6 GiB of GPU ${poolDevice}`);
  assert.deepEqual(consoleErrors, [], 'console errors on the shares engine');
  log(`shares: pool holds 6 GiB of GPU ${poolDevice}; badges, overview count, shares and labels checked`);
}

let failed = false;
try {
  await main();
  log('PASS');
} catch (e) {
  failed = true;
  console.error(`[e2e] FAIL: ${e.stack || e}`);
  if (context) {
    const page = context.pages()[0];
    if (page) await page.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true }).catch(() => {});
  }
  const text = fs.existsSync(engineLog) ? fs.readFileSync(engineLog, 'utf8') : '';
  console.error(`---- engine log (last 4000 chars) ----\n${text.slice(-4000)}`);
} finally {
  clearInterval(telemetryTimer);
  if (context) await context.close().catch(() => {});
  for (const e of engines) {
    if (e.exitCode === null) {
      e.kill('SIGTERM');
      await new Promise((r) => { e.once('exit', r); setTimeout(r, 10_000); });
    }
  }
  if (!failed) fs.rmSync(tmp, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
