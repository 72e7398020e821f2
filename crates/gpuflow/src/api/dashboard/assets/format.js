// Small DOM and formatting helpers. Everything is built with text nodes: data never
// becomes markup.

const SVG = 'http://www.w3.org/2000/svg';

function build(element, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(element.dataset, value);
    else element.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG, tag), attrs, children);
}

// Replaces an element's children, skipping null/false (conditional parts).
export function fill(element, ...children) {
  element.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export function shortId(id) {
  return id ? id.slice(-8) : '';
}

export function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  // "6 GiB", not "6.0 GiB"; one decimal only when it says something ("1.5 GiB").
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1).replace(/\.0$/, '')} ${units[i]}`;
}

export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const sec = ms / 1000;
  if (sec < 60) return `${sec.toFixed(sec < 10 ? 1 : 0)} s`;
  const min = Math.floor(sec / 60);
  if (min < 60) return `${min} min ${Math.round(sec % 60)} s`;
  return `${Math.floor(min / 60)} h ${min % 60} min`;
}

export function clock(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false });
}

export function when(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour12: false }) : d.toLocaleString([], { hour12: false });
}

export function between(startIso, endIso) {
  if (!startIso) return null;
  const end = endIso ? Date.parse(endIso) : Date.now();
  return end - Date.parse(startIso);
}

export function badge(state) {
  return h('span', { class: `badge state-${state}` }, state);
}

export function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

// A stable colour per name, for lease bars.
export function hue(name) {
  let x = 0;
  for (const c of name) x = (x * 31 + c.charCodeAt(0)) % 360;
  return x;
}

export function empty(text) {
  return h('p', { class: 'empty' }, text);
}

export function jobLink(id, label) {
  return h('a', { href: `#/jobs/${id}`, class: 'mono', title: id }, label || shortId(id));
}

// A running attempt's latest progress: a bar (indeterminate without a fraction), the
// percentage and the message. `p` is `{fraction, message}` as the API sends it.
export function progressBar(p) {
  if (!p) return null;
  const has = typeof p.fraction === 'number';
  const pct = has ? `${Math.round(p.fraction * 100)}%` : null;
  return h('div', { class: 'progress', dataset: { fraction: has ? p.fraction : '' }, title: p.message || pct || '' },
    h('progress', has ? { max: 1, value: p.fraction } : {}),
    pct ? h('span', { class: 'progress-pct' }, pct) : null,
    p.message ? h('span', { class: 'progress-message' }, p.message) : null);
}

// A progress event as the `progress` field of a stage or lease.
export function progressOf(event) {
  return { fraction: event.fraction ?? null, message: event.message ?? null, at: new Date(event.at_ms).toISOString() };
}
