// The dashboard shell: routing, the live feed, and coalesced refreshes. Each view loads
// what it shows over REST; the feed only says when to load again.

import { AuthError, get, openFeed, setToken, token } from './api.js';
import { h } from './format.js';
import { jobsView, overviewView, poolsView, queueView, findingsView } from './views.js';
import { gpusView } from './gpus.js';
import { jobView } from './job.js';

const REFRESH_MIN_MS = 250;

const routes = {
  overview: overviewView,
  gpus: gpusView,
  queue: queueView,
  jobs: jobsView,
  job: jobView,
  pools: poolsView,
  findings: findingsView,
};

const main = document.getElementById('main');
let current = null; // { name, view, params, root, data }
let inFlight = false;
let dirty = false;
let lastLoad = 0;
let timer = null;

function parseRoute() {
  const parts = location.hash.split('?')[0].replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  if (parts[0] === 'jobs' && parts[1]) return { name: 'job', params: { id: parts[1] } };
  const name = routes[parts[0]] ? parts[0] : 'overview';
  return { name, params: {} };
}

function navigate() {
  const { name, params } = parseRoute();
  for (const a of document.querySelectorAll('#nav a')) {
    const active = a.dataset.route === name || (name === 'job' && a.dataset.route === 'jobs');
    a.classList.toggle('active', active);
  }
  const view = routes[name];
  const root = h('section', { class: `view view-${name}` });
  main.replaceChildren(root);
  current = { name, view, params, root, data: null };
  document.title = `gpuflow · ${view.title(params)}`;
  if (view.mount) view.mount(root, params, { refresh: () => refresh(true) });
  refresh(true);
}

// Loads the current view's data at most every REFRESH_MIN_MS; bursts of events coalesce
// into one load.
function refresh(now = false) {
  dirty = true;
  if (inFlight) return;
  const wait = now ? 0 : Math.max(0, lastLoad + REFRESH_MIN_MS - Date.now());
  clearTimeout(timer);
  timer = setTimeout(load, wait);
}

async function load() {
  if (!current) return;
  const target = current;
  dirty = false;
  inFlight = true;
  lastLoad = Date.now();
  try {
    const data = await target.view.load(target.params);
    if (target === current) {
      current.data = data;
      target.view.render(target.root, data, target.params);
      target.root.dataset.loaded = 'true';
    }
  } catch (e) {
    if (e instanceof AuthError) askToken();
    else if (target === current) showError(target.root, e);
  } finally {
    inFlight = false;
    if (dirty) refresh();
  }
}

function showError(root, e) {
  let box = root.querySelector(':scope > .error-banner');
  if (!box) {
    box = h('div', { class: 'error-banner', role: 'alert' });
    root.prepend(box);
  }
  box.textContent = `Could not load: ${e.message}`;
}

async function refreshBadges() {
  try {
    const [res, diag] = await Promise.all([get('/v1/resources'), get('/v1/diagnosis')]);
    setCount('queue-count', res.waiting.length);
    setCount('findings-count', diag.open.length);
  } catch (e) {
    if (e instanceof AuthError) askToken();
  }
}

function setCount(id, n) {
  const el = document.getElementById(id);
  el.textContent = String(n);
  el.hidden = n === 0;
}

let badgeTimer = null;
function refreshBadgesSoon() {
  if (badgeTimer) return;
  badgeTimer = setTimeout(() => {
    badgeTimer = null;
    refreshBadges();
  }, 500);
}

function onEvent(event) {
  if (event.type === 'findings') setCount('findings-count', event.open);
  else if (event.type !== 'gpu_samples') refreshBadgesSoon();
  if (!current) return;
  // A view may apply an event itself (e.g. new GPU readings) instead of reloading.
  if (current.view.apply && current.data && current.view.apply(current.data, event, current.params)) {
    current.view.render(current.root, current.data, current.params);
    return;
  }
  if (event.type === 'hello' || event.type === 'resync' || current.view.wants(event, current.params)) refresh();
}

const live = document.getElementById('live');
function onState(state) {
  live.dataset.state = state;
  live.textContent = { live: 'live', reconnecting: 'reconnecting', auth: 'token needed' }[state] || state;
  if (state === 'auth') askToken();
}

let closeFeed = null;
function startFeed() {
  if (closeFeed) closeFeed();
  closeFeed = openFeed(onEvent, onState);
}

const dialog = document.getElementById('token-dialog');
function askToken() {
  if (!dialog.open) {
    document.getElementById('token-input').value = token();
    dialog.showModal();
  }
}
document.getElementById('token-button').addEventListener('click', askToken);
document.getElementById('token-cancel').addEventListener('click', () => dialog.close());
document.getElementById('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  setToken(document.getElementById('token-input').value.trim());
  dialog.close();
  startFeed();
  refreshBadges();
  refresh(true);
});

// Waiting times and held-for durations grow between events: redraw from what is loaded
// (no request) once a second.
setInterval(() => {
  if (current && current.data && current.view.tick) current.view.tick(current.root, current.data, current.params);
}, 1000);

window.addEventListener('hashchange', navigate);
navigate();
startFeed();
refreshBadges();
