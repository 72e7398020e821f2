// Talking to the engine: REST reads with the bearer token, and the live feed (SSE).

const TOKEN_KEY = 'gpuflow.token';

export class AuthError extends Error {}

export function token() {
  return localStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const t = token();
  return t ? { ...extra, authorization: `Bearer ${t}` } : extra;
}

async function answer(response) {
  if (response.status === 401) throw new AuthError('this engine needs a token');
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

export async function get(path) {
  return answer(await fetch(path, { headers: headers() }));
}

export async function post(path, body = {}) {
  return answer(await fetch(path, {
    method: 'POST',
    headers: headers({ 'content-type': 'application/json' }),
    body: JSON.stringify(body),
  }));
}

// Opens /v1/events. EventSource cannot send headers, so the token goes in `access_token`
// (accepted on this endpoint only). Calls onEvent(event) per message and onState(state)
// with 'live', 'reconnecting' or 'auth'. Returns a function that closes the feed.
export function openFeed(onEvent, onState) {
  let source = null;
  let retry = null;
  let closed = false;
  const kinds = ['hello', 'resync', 'job_submitted', 'attempt_started', 'attempt_ended', 'stage_cancelled',
    'job_finished', 'lease', 'pool_instance', 'progress', 'findings', 'gpu_samples'];

  const connect = () => {
    const t = token();
    source = new EventSource(t ? `/v1/events?access_token=${encodeURIComponent(t)}` : '/v1/events');
    source.onopen = () => onState('live');
    for (const kind of kinds) {
      source.addEventListener(kind, (message) => {
        try {
          onEvent(JSON.parse(message.data));
        } catch (e) {
          console.warn('unreadable event', e);
        }
      });
    }
    source.onerror = () => {
      if (closed) return;
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. 401): find out why, then try again later.
        source = null;
        get('/healthz').then(() => get('/v1/resources')).then(
          () => onState('reconnecting'),
          (e) => onState(e instanceof AuthError ? 'auth' : 'reconnecting'),
        );
        retry = setTimeout(connect, 3000);
      } else {
        onState('reconnecting');
      }
    };
  };
  connect();
  return () => {
    closed = true;
    clearTimeout(retry);
    if (source) source.close();
  };
}
