// Deployment Engine web console.
//
// One script, no framework and no build step: it is compiled into the
// controller binary and must work offline. Every page talks to the same API
// as dectl (docs/API.md) with the operator's token. Values from the API are
// only ever put into the page as text (textContent), never as markup. Paths
// are relative to the page (served at the root), so a reverse proxy may
// serve the console under a prefix.
'use strict';

const TOKEN_KEY = 'de.token';
const POLL_MS = 2000;
const LOG_LINES_KEPT = 2000;
// Lines of a file the Logs page shows, and of local.log the Deploy page starts with.
const VIEW_LINES = 500;
const BACKLOG_LINES = 200;
// How often the Deploy page asks again what a deploy would do, between deployments.
const DIFF_POLL_MS = 5000;

// ---------------------------------------------------------------- helpers

/** h('div', {class: 'x', onclick: f}, 'text', child, [more]) builds an element. */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, kids);
  return el;
}

function append(el, ...kids) {
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return el;
}

function clear(el, ...kids) {
  el.replaceChildren();
  return append(el, kids);
}

function fmtTime(s) {
  if (!s) return '-';
  const d = new Date(s);
  return Number.isNaN(d.getTime()) ? s : d.toLocaleString();
}

function ago(s) {
  if (!s) return 'never';
  const secs = Math.round((Date.now() - new Date(s).getTime()) / 1000);
  if (!Number.isFinite(secs)) return s;
  if (secs < 2) return 'just now';
  if (secs < 90) return `${secs} s ago`;
  if (secs < 5400) return `${Math.round(secs / 60)} min ago`;
  if (secs < 172800) return `${Math.round(secs / 3600)} h ago`;
  return fmtTime(s);
}

function mb(n) {
  if (n === null || n === undefined) return '-';
  return n >= 10240 ? `${(n / 1024).toFixed(0)} GB` : n >= 1024 ? `${(n / 1024).toFixed(1)} GB` : `${n} MB`;
}

function pct(n) {
  return typeof n === 'number' ? `${n.toFixed(0)}%` : '-';
}

function badge(text, kind) {
  return h('span', {class: `badge ${kind || 'muted'}`}, text);
}

function stateKind(s) {
  const v = String(s || '').toUpperCase();
  if (['RUNNING', 'ONLINE', 'SUCCEEDED', 'DONE', 'OK'].includes(v)) return 'good';
  if (['STARTING', 'STOPPING', 'PENDING', 'QUEUED'].includes(v)) return 'warn';
  if (v === 'RUNNING_DEPLOY') return 'info';
  if (['DOWN', 'STOPPED', 'FAILED', 'REVOKED', 'REFUSED'].includes(v) || v.startsWith('OFFLINE')) return 'bad';
  if (v === 'CANCELLED') return 'cancelled';
  return 'muted';
}

/** A deployment's state as a badge: running in blue, cancelled in its own colour. */
function deployBadge(state) {
  return badge(state, state === 'running' ? 'info' : stateKind(state));
}

function notice(kind, ...kids) {
  return h('div', {class: `notice ${kind}`, role: kind === 'bad' ? 'alert' : 'status'}, kids);
}

/** A button that asks "sure?" on the first click and acts on a second one within 5 s. */
function confirmButton(label, confirmLabel, attrs, action) {
  let armed = null;
  const b = h('button', Object.assign({type: 'button'}, attrs), label);
  b.addEventListener('click', async () => {
    if (!armed) {
      b.textContent = confirmLabel;
      b.classList.add('armed');
      armed = setTimeout(() => { armed = null; b.textContent = label; b.classList.remove('armed'); }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.textContent = label;
    b.classList.remove('armed');
    await action(b);
  });
  return b;
}

/**
 * Keeps one <tr> per key in tbody, in the order of items. A row's data cells
 * are refreshed from cells(item) on every call; its last cell, the actions,
 * is built once by actions(item) and kept, so a half-confirmed button
 * survives the refresh. Put what an action depends on into the key.
 */
function syncRows(tbody, items, keyOf, cells, actions, rowAttrs) {
  const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
  tbody.replaceChildren(...items.map((it) => {
    const key = keyOf(it);
    const tds = cells(it).map((c) => (c instanceof HTMLTableCellElement ? c : h('td', {}, c)));
    let tr = old.get(key);
    if (tr) {
      const act = actions ? tr.lastElementChild : null;
      tr.replaceChildren(...tds, ...(act ? [act] : []));
    } else {
      tr = h('tr', Object.assign({'data-key': key}, rowAttrs ? rowAttrs(it) : {}), tds,
        actions ? h('td', {class: 'actions'}, actions(it)) : null);
    }
    return tr;
  }));
}

/** True when data differs from what was last drawn under this name. */
function changed(memo, name, data) {
  const text = JSON.stringify(data);
  if (memo[name] === text) return false;
  memo[name] = text;
  return true;
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], {type: 'text/plain'}));
  const a = h('a', {href: url, download: name});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, body, text) {
    const msg = body && typeof body === 'object' && body.message ? body.message
      : (text || '').trim() || `HTTP ${status}`;
    super(msg);
    this.status = status;
    this.code = body && body.error;
    this.problems = (body && body.problems) || [];
  }
}

const session = {
  token: sessionStorage.getItem(TOKEN_KEY),
  signOut(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    session.token = null;
    page.stop();
    renderSignIn(why);
  },
};

/** One API call; resolves to the parsed JSON (or text), rejects with ApiError. */
async function api(method, path, body, opts) {
  const used = (opts && opts.token) || session.token;
  const headers = {Authorization: `Bearer ${used}`};
  const init = {method, headers, cache: 'no-store'};
  if (body !== undefined) {
    init.body = typeof body === 'string' ? body : JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, {message: `cannot reach the controller (${e.message}); is it running?`});
  }
  const text = await res.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* plain text answer */ }
  // Only the first refusal signs out: the other requests of the page that
  // were under way must not redraw the sign-in form while it is being used.
  if (res.status === 401 && !(opts && opts.token) && used === session.token) {
    session.signOut('The controller refused the token (was it rotated?). Sign in again.');
  }
  if (!res.ok) throw new ApiError(res.status, data, text);
  return data;
}

// ------------------------------------------------------ page lifecycle

/** What the current page started (timers, sockets); all stopped on leaving it. */
const page = {
  timers: [],
  sockets: [],
  gen: 0,
  stop() {
    page.gen += 1;
    page.timers.forEach(clearInterval);
    page.sockets.forEach((s) => { s.onclose = null; s.close(); });
    page.timers = [];
    page.sockets = [];
  },
  /** Runs fn now and every ms, never two at once, until the page changes. */
  every(ms, fn) {
    const gen = page.gen;
    let busy = false;
    const tick = async () => {
      if (busy || gen !== page.gen) return;
      busy = true;
      try { await fn(); } finally { busy = false; }
    };
    tick();
    page.timers.push(setInterval(tick, ms));
  },
  alive(gen) { return gen === page.gen; },
};

const ROUTES = [
  ['install', 'Install', renderInstall],
  ['nodes', 'Nodes', renderNodes],
  ['plan', 'Plan', renderPlan],
  ['deploy', 'Deploy', renderDeploy],
  ['status', 'Status', renderStatus],
  ['run', 'Run', renderRun],
  ['logs', 'Logs', renderLogs],
];

function route() {
  if (!session.token) { renderSignIn(); return; }
  const [name, arg] = location.hash.replace(/^#\/?/, '').split('/');
  const found = ROUTES.find((r) => r[0] === name);
  if (!found) { location.hash = '#/install'; return; }
  page.stop();
  const app = document.getElementById('app');
  const main = h('main', {id: 'page', 'data-page': found[0]});
  clear(app, shell(found[0]), main);
  document.title = `${found[1]} · Deployment Engine`;
  found[2](main, arg ? decodeURIComponent(arg) : null);
}

function shell(active) {
  const version = h('span', {class: 'version'});
  api('GET', 'healthz').then((v) => { version.textContent = `controller ${v.version}`; }).catch(() => {});
  return h('header', {class: 'top'},
    h('a', {class: 'brand', href: '#/install'}, h('img', {src: 'favicon.ico', alt: ''}), 'Deployment Engine'),
    h('nav', {}, ROUTES.map(([name, label]) =>
      h('a', {href: `#/${name}`, id: `nav-${name}`, class: name === active ? 'active' : null}, label))),
    h('div', {class: 'right'}, version,
      h('button', {type: 'button', id: 'sign-out', class: 'link', onclick: () => session.signOut()}, 'Sign out')));
}

// ---------------------------------------------------------------- sign in

function renderSignIn(why) {
  const app = document.getElementById('app');
  const input = h('input', {id: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'API token', 'aria-label': 'API token', required: true});
  const error = h('div', {id: 'signin-error'});
  if (why) clear(error, notice('warn', why));
  const form = h('form', {id: 'signin', class: 'card signin'},
    h('h1', {}, h('img', {src: 'favicon.ico', alt: ''}), 'Deployment Engine'),
    h('p', {}, 'Sign in with the controller\'s API token. It is in the file ',
      h('code', {}, 'admin.token'), ' in the controller\'s data directory (printed once when the controller first started).'),
    input,
    h('button', {type: 'submit', id: 'signin-submit', class: 'primary'}, 'Sign in'),
    error);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    try {
      await api('GET', 'api/v1/nodes', undefined, {token});
    } catch (e) {
      clear(error, notice('bad', e.status === 401
        ? 'That token was refused: copy it again from admin.token in the controller\'s data directory.'
        : e.message));
      return;
    }
    session.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    // Setting the hash routes (hashchange); an unchanged one needs a nudge.
    if (!location.hash || location.hash === '#/') location.hash = '#/install';
    else route();
  });
  clear(app, h('main', {class: 'signin-page'}, form));
  document.title = 'Sign in · Deployment Engine';
  input.focus();
}

// ---------------------------------------------------------------- install

function renderInstall(main) {
  const codeBox = h('div', {id: 'code-box'});
  const nodesBox = h('div', {id: 'install-nodes'});
  const msg = h('div', {class: 'msg'});
  let code = null;
  let fetchedAt = 0;
  let drawn = undefined; // the code the box shows (null: none)
  let seen = null; // node ids present when the page opened
  const joined = new Set();

  const ttl = h('select', {id: 'code-ttl', 'aria-label': 'code lifetime'},
    h('option', {value: '600'}, '10 minutes'),
    h('option', {value: '3600', selected: true}, '1 hour'),
    h('option', {value: '28800'}, '8 hours'),
    h('option', {value: '86400'}, '1 day'));

  // By the controller's clock: it said how many seconds were left when asked.
  const remaining = () => (code ? Math.max(0, code.expires_in_secs - Math.floor((Date.now() - fetchedAt) / 1000)) : 0);

  const setCode = (c) => { code = c; fetchedAt = Date.now(); draw(); };
  // Bumped by every change made here, so a poll that was under way when the
  // operator generated or ended a code cannot put the old state back.
  let epoch = 0;

  const newCode = async () => {
    epoch += 1;
    try {
      setCode(await api('POST', 'api/v1/install-codes', {ttl_secs: Number(ttl.value)}));
      clear(msg);
    } catch (e) {
      clear(msg, notice('bad', e.message));
    }
  };

  const endInstall = async () => {
    epoch += 1;
    try {
      await api('DELETE', 'api/v1/install-codes');
      setCode(null);
      clear(msg, notice('good', 'Installation ended: no code is open, nodes can no longer enrol.'));
    } catch (e) {
      clear(msg, notice('bad', e.message));
    }
  };

  const tick = () => {
    const el = document.getElementById('code-remaining');
    if (!el) return;
    const left = remaining();
    if (left === 0) { setCode(null); return; }
    const hours = Math.floor(left / 3600);
    const mm = String(Math.floor((left % 3600) / 60)).padStart(2, '0');
    const ss = String(left % 60).padStart(2, '0');
    el.textContent = `expires in ${hours ? `${hours} h ` : ''}${mm}:${ss}`;
    el.className = left < 120 ? 'remaining soon' : 'remaining';
  };

  // Wrong guesses on the code (where from, when), and why it no longer admits nodes.
  const guesses = () => {
    const tries = code.failed_attempts || [];
    const kids = [];
    if (code.state === 'burned') {
      kids.push(notice('bad', `This code was burned by ${tries.length} wrong guesses and admits no node: generate a new one.`));
    } else if (code.state === 'used') {
      kids.push(notice('good', `This code admitted all ${code.nodes} node(s) it was made for: generate a new one to add more.`));
    } else if (code.nodes) {
      kids.push(h('p', {class: 'muted small'}, `Admits ${code.nodes_left} more of ${code.nodes} node(s).`));
    }
    if (tries.length) {
      kids.push(h('p', {class: 'small'}, 'Wrong guesses:'),
        h('ul', {id: 'code-guesses', class: 'small'},
          ...tries.map((t) => h('li', {}, `${t.source} at ${fmtTime(t.at)}${t.in_progress ? ' (in progress)' : ''}`))));
    }
    return kids;
  };

  const draw = () => {
    const shown = code && remaining() > 0
      ? `${code.code} ${code.state || 'open'} ${(code.failed_attempts || []).map((t) => t.at + t.in_progress).join()} ${code.nodes_admitted || 0}`
      : null;
    if (shown === drawn) { tick(); return; }
    drawn = shown;
    if (!shown) {
      clear(codeBox,
        h('p', {class: 'lead'}, 'No install code is open. Generate one, then run the command it shows on each node.'),
        h('div', {class: 'row'}, h('label', {}, 'Valid for ', ttl),
          h('button', {type: 'button', id: 'new-code', class: 'primary', onclick: newCode}, 'Generate install code')));
      return;
    }
    const cmd = h('pre', {id: 'agent-command', class: 'command'}, code.agent_command);
    clear(codeBox,
      h('div', {class: 'code-row'},
        h('div', {id: 'install-code', class: 'code', 'aria-label': 'install code'}, code.code),
        h('div', {},
          h('div', {id: 'code-remaining', class: 'remaining'}),
          h('div', {class: 'muted small'}, `until ${fmtTime(code.expires_at)}`))),
      h('p', {}, 'On each node, as root (the agent package installed, or this script from the controller package copied over):'),
      h('div', {class: 'command-row'}, cmd,
        h('button', {type: 'button', class: 'small', onclick: (ev) => {
          const b = ev.currentTarget;
          const fallback = () => { getSelection().selectAllChildren(cmd); b.textContent = 'Press Ctrl+C'; };
          if (navigator.clipboard) navigator.clipboard.writeText(cmd.textContent).then(() => { b.textContent = 'Copied'; }, fallback);
          else fallback();
        }}, 'Copy')),
      h('p', {class: 'muted small'}, 'Anyone with this code can enrol a machine until it expires or you end the install; a few wrong tries burn it.'),
      ...guesses(),
      h('div', {class: 'row'},
        h('label', {}, 'Valid for ', ttl),
        h('button', {type: 'button', id: 'regenerate-code', onclick: newCode}, 'New code'),
        h('button', {type: 'button', id: 'end-install', class: 'danger', onclick: endInstall}, 'End install')));
    tick();
  };

  append(main,
    h('section', {class: 'card'}, h('h2', {}, 'Install code'), codeBox, msg),
    h('section', {class: 'card'}, h('h2', {}, 'Nodes ', h('span', {class: 'live-dot', title: 'refreshed live'})), nodesBox));

  const gen = page.gen;
  page.every(POLL_MS, async () => {
    let c = null;
    const at = epoch;
    try {
      c = await api('GET', 'api/v1/install-codes');
    } catch (e) {
      if (e.status !== 404) { clear(msg, notice('bad', e.message)); return; }
    }
    if (page.alive(gen) && at === epoch) setCode(c);
  });
  page.timers.push(setInterval(tick, 1000));

  page.every(POLL_MS, async () => {
    let nodes;
    try { nodes = await api('GET', 'api/v1/nodes'); } catch (e) { clear(nodesBox, notice('bad', e.message)); return; }
    if (!page.alive(gen)) return;
    if (seen === null) seen = new Set(nodes.map((n) => n.id));
    nodes.forEach((n) => { if (!seen.has(n.id)) joined.add(n.id); });
    if (!nodes.length) {
      clear(nodesBox, h('p', {class: 'muted', id: 'no-nodes'}, 'No node has enrolled yet. They appear here as they join.'));
      return;
    }
    const sorted = nodes.slice().sort((a, b) => String(b.enrolled_at).localeCompare(String(a.enrolled_at)));
    clear(nodesBox, h('table', {class: 'grid', id: 'install-nodes-table'},
      h('thead', {}, h('tr', {}, ['Host', 'IP', 'State', 'Hardware', 'Enrolled'].map((t) => h('th', {}, t)))),
      h('tbody', {}, sorted.map((n) => h('tr', {'data-node-id': n.id, class: joined.has(n.id) ? 'fresh' : null},
        h('td', {}, n.hostname, joined.has(n.id) ? [' ', badge('just joined', 'info')] : null),
        h('td', {class: 'mono'}, n.ips.join(', ')),
        h('td', {}, nodeState(n)),
        h('td', {}, `${n.hardware.cpus} CPU · ${mb(n.hardware.ram_mb)} RAM · ${mb(n.hardware.disk_mb)} disk`),
        h('td', {}, ago(n.enrolled_at)))))));
  });
}

function nodeState(n) {
  if (n.revoked) return badge('revoked', 'bad');
  return n.online ? badge('online', 'good') : badge('offline', 'bad');
}

// ---------------------------------------------------------------- nodes

function usageBar(label, v) {
  const n = typeof v === 'number' ? Math.max(0, Math.min(100, v)) : 0;
  const kind = n > 90 ? 'bad' : n > 75 ? 'warn' : 'good';
  return h('div', {class: 'usage', title: `${label} ${pct(v)}`},
    h('span', {class: 'usage-label'}, label),
    h('span', {class: 'bar'}, h('span', {class: `fill ${kind}`, style: null, 'data-pct': n.toFixed(0)})),
    h('span', {class: 'usage-value'}, pct(v)));
}

/** Bar widths are set from script, since the policy forbids inline styles in markup. */
function sizeBars(root) {
  root.querySelectorAll('.fill[data-pct]').forEach((el) => { el.style.width = `${el.dataset.pct}%`; });
}

function renderNodes(main) {
  const box = h('div', {id: 'nodes'});
  const msg = h('div', {class: 'msg'});
  const tbody = h('tbody');
  const table = h('table', {class: 'grid', id: 'nodes-table'},
    h('thead', {}, h('tr', {}, ['Node', 'IPs', 'State', 'Hardware', 'Usage', 'Components', 'Agent', 'Last seen', ''].map((t) => h('th', {}, t)))),
    tbody);
  append(main, h('section', {class: 'card'},
    h('h2', {}, 'Nodes ', h('span', {class: 'live-dot', title: 'refreshed live'})),
    h('p', {class: 'muted'}, 'Every enrolled node. Revoking one drops its link and refuses its certificate from then on; to use the machine again, enrol it with a new code.'),
    msg, box));
  const gen = page.gen;
  const refresh = async () => {
    let nodes;
    try { nodes = await api('GET', 'api/v1/nodes'); } catch (e) { clear(box, notice('bad', e.message)); return; }
    if (!page.alive(gen)) return;
    if (!nodes.length) {
      clear(box, h('p', {class: 'muted'}, 'No node has enrolled yet: generate a code on the ', h('a', {href: '#/install'}, 'Install'), ' page.'));
      return;
    }
    if (!box.contains(table)) clear(box, table);
    syncRows(tbody, nodes, (n) => `${n.id}${n.revoked ? ':revoked' : ''}`, (n) => {
      const running = n.components.filter((c) => c.status === 'RUNNING').length;
      return [
        [h('div', {}, n.hostname), h('div', {class: 'mono small muted'}, n.id)],
        h('td', {class: 'mono'}, n.ips.join(', ')),
        nodeState(n),
        [h('div', {}, `${n.hardware.cpus} CPU`), h('div', {}, `${mb(n.hardware.ram_mb)} RAM`), h('div', {}, `${mb(n.hardware.disk_mb)} disk`)],
        h('td', {class: 'usage-cell'}, n.online ? [usageBar('cpu', n.usage.cpu_pct), usageBar('mem', n.usage.mem_pct), usageBar('disk', n.usage.disk_pct)] : h('span', {class: 'muted'}, '-')),
        n.components.length
          ? h('span', {title: n.components.map((c) => `${c.name}: ${c.status}`).join('\n')}, `${running}/${n.components.length} running`)
          : h('span', {class: 'muted'}, 'none'),
        h('td', {class: 'small'}, n.agent_version),
        h('td', {class: 'small'}, ago(n.last_seen)),
      ];
    }, (n) => (n.revoked ? null : confirmButton('Revoke', 'Confirm revoke', {class: 'danger small', 'data-action': 'revoke'}, async () => {
      try {
        await api('DELETE', `api/v1/nodes/${encodeURIComponent(n.id)}`);
        clear(msg, notice('good', `Node ${n.hostname} (${n.ips.join(', ')}) is revoked.`));
      } catch (e) { clear(msg, notice('bad', e.message)); }
      refresh();
    })), (n) => ({'data-node-id': n.id, class: n.revoked ? 'revoked' : null}));
    sizeBars(box);
  };
  page.every(POLL_MS, refresh);
}

// ---------------------------------------------------------------- plan

function planTemplate(cat) {
  const components = {};
  for (const c of cat.components) components[c.name] = [];
  const properties = {domain: 'cluster.local', checkdisk: 0, adduser: 0, catalog: cat.name};
  for (const p of cat.required || []) if (!(p in properties)) properties[p] = '';
  return JSON.stringify({components, properties}, null, 2);
}

function problemWhere(p) {
  return [p.component, p.ip, p.property].filter(Boolean).join(' · ') || 'plan';
}

function renderPlan(main) {
  const catSelect = h('select', {id: 'catalog', 'aria-label': 'catalog'});
  const catInfo = h('div', {id: 'catalog-info'});
  const editor = h('textarea', {id: 'plan-json', spellcheck: 'false', rows: 18, 'aria-label': 'plan JSON'});
  const result = h('div', {id: 'plan-result'});
  const nodesBox = h('div', {id: 'plan-nodes'});
  let catalogs = [];
  let problems = [];

  const current = () => catalogs.find((c) => c.name === catSelect.value);

  const drawCatalog = () => {
    const cat = current();
    if (!cat) { clear(catInfo); return; }
    let plan = null;
    try { plan = JSON.parse(editor.value); } catch (_) { /* shown on validate */ }
    const inPlan = (name) => (plan && plan.components && Array.isArray(plan.components[name])) ? plan.components[name] : [];
    const known = new Set(cat.components.map((c) => c.name));
    const propertyProblems = problems.filter((p) => !p.component || !known.has(p.component));
    clear(catInfo,
      h('p', {class: 'muted'}, cat.description, cat.required && cat.required.length ? ` Required properties: ${cat.required.join(', ')}.` : ''),
      h('table', {class: 'grid', id: 'catalog-components'},
        h('thead', {}, h('tr', {}, ['Component', 'How many', 'Minimum per node', 'After', 'In this plan', 'Problems'].map((t) => h('th', {}, t)))),
        h('tbody', {}, cat.components.map((c) => {
          const mine = problems.filter((p) => p.component === c.name);
          return h('tr', {'data-component': c.name, class: mine.length ? 'has-problem' : null},
            h('td', {}, h('strong', {}, c.name), c.description ? h('div', {class: 'small muted'}, c.description) : null),
            h('td', {}, c.cardinality === 'one' ? 'exactly one' : c.cardinality === 'many' ? 'one or more' : String(c.cardinality)),
            h('td', {class: 'small'}, `${c.minimum.cpus} CPU · ${mb(c.minimum.ram_mb)} RAM · ${mb(c.minimum.disk_mb)} disk`),
            h('td', {class: 'small'}, (c.after || []).join(', ') || '-'),
            h('td', {class: 'mono small'}, inPlan(c.name).join(', ') || h('span', {class: 'muted'}, 'not deployed')),
            h('td', {class: 'problems-cell'}, mine.length ? h('ul', {}, mine.map((p) => h('li', {}, p.ip ? h('span', {class: 'mono'}, `${p.ip}: `) : null, p.problem))) : null));
        }))),
      propertyProblems.length ? h('div', {id: 'property-problems', class: 'problem-block'},
        h('h3', {}, 'Plan and properties'),
        h('ul', {}, propertyProblems.map((p) => h('li', {}, h('strong', {}, problemWhere(p)), ': ', p.problem)))) : null);
  };

  const showProblems = (e) => {
    problems = e.problems || [];
    clear(result, notice('bad', h('strong', {}, e.message),
      problems.length ? h('ul', {id: 'problems', class: 'problems'}, problems.map((p) => h('li', {'data-kind': p.kind},
        badge(p.kind, 'bad'), ' ', h('span', {class: 'where'}, problemWhere(p)), ': ', p.problem,
        p.found || p.needed ? h('div', {class: 'small muted'}, p.found ? `found: ${p.found}` : '', p.found && p.needed ? ' · ' : '', p.needed ? `needed: ${p.needed}` : '') : null))) : null));
    const json = problems.find((p) => p.kind === 'malformed_json' && p.found);
    const at = json && /line (\d+) column (\d+)/.exec(json.found);
    if (at) {
      const lines = editor.value.split('\n');
      const line = Math.min(Number(at[1]), lines.length) - 1;
      const offset = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0) + Math.max(0, Number(at[2]) - 1);
      editor.focus();
      editor.setSelectionRange(offset, offset + 1);
    }
    drawCatalog();
  };

  // Problems are shown against the catalog the plan names.
  const followPlanCatalog = () => {
    let plan = null;
    try { plan = JSON.parse(editor.value); } catch (_) { return; }
    const name = (plan && plan.properties && plan.properties.catalog) || 'cf-v170';
    if (catalogs.some((c) => c.name === name)) catSelect.value = name;
  };

  const validate = async () => {
    followPlanCatalog();
    clear(result, notice('info', 'Checking the plan…'));
    try {
      const v = await api('POST', 'api/v1/plan/validate', editor.value);
      problems = [];
      clear(result, notice('good', h('strong', {}, 'The plan is valid. '), v.message || '',
        h('div', {class: 'small'}, `Install order: ${(v.order || []).join(' → ')}`)));
    } catch (e) {
      if (e.status === 400) showProblems(e); else clear(result, notice('bad', e.message));
    }
    drawCatalog();
  };

  const save = async () => {
    followPlanCatalog();
    clear(result, notice('info', 'Saving the plan…'));
    try {
      const v = await api('POST', 'deployment-engine/config', editor.value);
      problems = [];
      clear(result, notice('good', h('strong', {}, `Saved as revision ${v.revision}. `), v.message || '',
        h('div', {}, 'Next: ', h('a', {href: '#/deploy'}, 'deploy it'), '.')));
    } catch (e) {
      if (e.status === 400) showProblems(e); else clear(result, notice('bad', e.message));
    }
    drawCatalog();
  };

  const templateButton = confirmButton('Start from the catalog', 'Replace the editor?', {id: 'plan-template'}, () => {
    const cat = current();
    if (cat) { editor.value = planTemplate(cat); problems = []; clear(result); drawCatalog(); }
  });

  append(main,
    h('section', {class: 'card'},
      h('h2', {}, 'Plan'),
      h('p', {class: 'muted'}, 'Which component runs on which node, and the cluster\'s properties. Validate checks it against the catalog and the enrolled nodes\' hardware; nothing runs until you deploy. Passwords read back as "******"; leave them so to keep the stored ones.'),
      h('div', {class: 'row'}, h('label', {}, 'Catalog ', catSelect), templateButton),
      catInfo),
    h('div', {class: 'two-col'},
      h('section', {class: 'card grow'},
        h('div', {class: 'row spread'}, h('h2', {}, 'Plan JSON'),
          h('div', {class: 'row'},
            h('button', {type: 'button', id: 'validate', onclick: validate}, 'Validate'),
            h('button', {type: 'button', id: 'save-plan', class: 'primary', onclick: save}, 'Save plan'))),
        result,
        editor),
      h('section', {class: 'card side'}, h('h2', {}, 'Enrolled nodes'), nodesBox)));

  catSelect.addEventListener('change', drawCatalog);
  editor.addEventListener('change', drawCatalog);

  // The page becomes usable only once both the catalogs and the stored plan
  // are in, so nothing the operator picks or types is overwritten by them.
  editor.readOnly = true;
  editor.value = 'Loading…';
  (async () => {
    let loaded;
    let plan = null;
    try {
      loaded = await api('GET', 'api/v1/catalogs');
      plan = await api('GET', 'deployment-engine/config');
    } catch (e) {
      if (!loaded || e.status !== 404) {
        clear(result, notice('bad', e.message));
        if (!loaded) { editor.value = ''; return; }
      }
    }
    catalogs = loaded;
    clear(catSelect, catalogs.map((c) => h('option', {value: c.name}, `${c.name}${c.builtin ? '' : ' (local)'}`)));
    if (plan) {
      editor.value = JSON.stringify(plan, null, 2);
      followPlanCatalog();
    } else {
      const cat = catalogs.find((c) => c.name === 'debian-demo') || catalogs[0];
      if (cat) { catSelect.value = cat.name; editor.value = planTemplate(cat); }
      if (!result.firstChild) {
        clear(result, notice('info', 'No plan is stored yet: this is a template from the catalog. Put node IPs into the components, then validate and save.'));
      }
    }
    editor.readOnly = false;
    drawCatalog();
  })();

  const gen = page.gen;
  page.every(5000, async () => {
    let nodes;
    try { nodes = await api('GET', 'api/v1/nodes'); } catch (_) { return; }
    if (!page.alive(gen)) return;
    const live = nodes.filter((n) => !n.revoked);
    clear(nodesBox, live.length ? h('ul', {class: 'plain'}, live.map((n) => h('li', {},
      h('span', {class: 'mono'}, n.ips.join(', ')), ' ', nodeState(n),
      h('div', {class: 'small muted'}, `${n.hostname} · ${n.hardware.cpus} CPU · ${mb(n.hardware.ram_mb)} RAM · ${mb(n.hardware.disk_mb)} disk`))))
      : h('p', {class: 'muted'}, 'No node yet: enrol nodes on the ', h('a', {href: '#/install'}, 'Install'), ' page.'));
  });
}

// ---------------------------------------------------------------- deploy

/**
 * Feeds onLine with local.log as it grows: the live WebSocket, preceded on
 * every (re)connection by the file's last lines, so a page opened in the
 * middle of a deployment shows what came before. Lines that arrive while the
 * backlog loads wait for it; the caller drops the ones it already shows.
 */
function openLogSocket(onLine, onState) {
  const gen = page.gen;
  let delay = 500;
  const connect = () => {
    if (!page.alive(gen)) return;
    // Relative to the page, like every other path here, so the console also
    // works behind a reverse proxy that serves it under a path prefix.
    const url = new URL('deployment-engine/log', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '';
    url.hash = '';
    const base = url.href;
    let ws;
    try {
      // The token rides as a subprotocol, so it never appears in a URL.
      ws = new WebSocket(base, ['de.log', `de.token.${session.token}`]);
    } catch (_) {
      // A token with characters a subprotocol cannot hold: the query string.
      ws = new WebSocket(`${base}?token=${encodeURIComponent(session.token)}`);
    }
    let waiting = [];
    page.sockets.push(ws);
    onState('connecting');
    ws.onopen = async () => {
      delay = 500;
      try {
        const text = String(await api('GET', `api/v1/logs/local.log?tail=${BACKLOG_LINES}`) || '');
        if (!page.alive(gen)) return;
        text.split('\n').filter((l) => l).forEach(onLine);
      } catch (_) { /* no backlog: the live lines still come */ }
      const held = waiting;
      waiting = null;
      held.forEach(onLine);
      onState('live');
    };
    ws.onmessage = (ev) => { if (waiting) waiting.push(String(ev.data)); else onLine(String(ev.data)); };
    ws.onclose = () => {
      page.sockets = page.sockets.filter((s) => s !== ws);
      if (!page.alive(gen)) return;
      onState('reconnecting');
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  connect();
}

function groupSteps(steps) {
  const groups = new Map();
  for (const st of steps) {
    const key = `${st.instance}@${st.ip}`;
    const g = groups.get(key) || {instance: st.instance, component: st.component, ip: st.ip, done: 0, total: 0,
      failed: 0, cancelled: 0, skipped: 0, running: null, kind: st.kind};
    g.total += 1;
    if (st.state === 'done') g.done += 1;
    if (st.state === 'skipped') g.skipped += 1;
    if (st.state === 'failed') g.failed += 1;
    if (st.state === 'cancelled') g.cancelled += 1;
    if (st.state === 'running') g.running = st.action;
    groups.set(key, g);
  }
  return [...groups.values()];
}

/** What one instance's row of a deployment says: failed, cancelled, running, done, skipped or waiting. */
function groupState(g) {
  if (g.failed) return badge('failed', 'bad');
  if (g.cancelled) return badge('cancelled', 'cancelled');
  if (g.running) return [badge('running', 'info'), ` ${g.running}`];
  if (g.done === g.total) return badge('done', 'good');
  if (g.skipped) return badge('skipped', 'muted');
  return badge('waiting', 'muted');
}

const ACTION_KINDS = {install: 'info', uninstall: 'bad', reapply: 'warn', start: 'warn', nothing: 'muted'};

/** The table of GET /api/v1/plan/diff: what a deployment started now would do, per instance. */
function diffView(diff) {
  const changes = diff.instances.filter((c) => c.action !== 'nothing');
  const applied = diff.applied_revision ? `revision ${diff.applied_revision} applied` : 'none applied yet';
  const revisions = `plan revision ${diff.plan_revision}, ${applied}`;
  return [
    diff.steps === 0 && !changes.length
      ? notice('good', h('span', {id: 'plan-diff-summary'}, h('strong', {}, 'Nothing to do: '),
        `every instance is as the plan says and runs as it should (${revisions}).`))
      : h('p', {id: 'plan-diff-summary'}, h('strong', {}, `${changes.length} of ${diff.instances.length} instance${diff.instances.length === 1 ? '' : 's'} to change`),
        `, ${diff.steps} step${diff.steps === 1 ? '' : 's'} (${revisions}).`),
    diff.offline.length ? h('div', {id: 'plan-diff-offline'}, notice('warn',
      h('strong', {}, `Offline: ${diff.offline.join(', ')}. `),
      'A deployment is refused until these nodes are back (or the plan no longer uses them).')) : null,
    diff.instances.length ? h('table', {class: 'grid', id: 'plan-diff-table'},
      h('thead', {}, h('tr', {}, ['Instance', 'Node', 'Action', 'Why'].map((t) => h('th', {}, t)))),
      h('tbody', {}, diff.instances.map((c) => h('tr', {'data-instance': c.instance || c.component, 'data-ip': c.ip, 'data-action': c.action},
        h('td', {}, c.instance || h('span', {}, c.component, h('span', {class: 'small muted'}, ' (no node)'))),
        h('td', {class: 'mono'}, c.ip),
        h('td', {}, badge(c.action, ACTION_KINDS[c.action] || 'muted')),
        h('td', {class: 'small'}, c.why)))))
      : h('p', {class: 'muted'}, 'The plan places no component on any node.'),
  ];
}

function progress(done, total, kind) {
  const n = total ? Math.round((done / total) * 100) : 0;
  return h('span', {class: 'bar wide'}, h('span', {class: `fill ${kind}`, 'data-pct': String(n)}));
}

function renderDeploy(main, selected) {
  const startMsg = h('div', {id: 'deploy-msg'});
  const diffBox = h('div', {id: 'plan-diff'}, h('p', {class: 'muted'}, 'Loading…'));
  const detailMsg = h('div', {id: 'deployment-msg'});
  const detail = h('div', {id: 'deployment'});
  const historyBox = h('div', {id: 'history'});
  const log = h('pre', {id: 'live-log', class: 'log', tabindex: '0'});
  const logState = h('span', {id: 'live-log-state', class: 'badge muted'}, 'connecting');
  let shownId = selected;
  let lines = 0;
  const memo = {};
  // The deployment last seen running: when it ends, the diff is asked again.
  let watching = null;
  let diffAsked = 0;
  let diffAt = 0;

  const loadDiff = async () => {
    diffAsked += 1;
    diffAt = Date.now();
    const asked = diffAsked;
    let diff;
    try {
      diff = await api('GET', 'api/v1/plan/diff');
    } catch (e) {
      if (asked !== diffAsked) return;
      clear(diffBox, e.status === 403
        ? notice('info', 'No plan is stored yet: write one on the ', h('a', {href: '#/plan'}, 'Plan'), ' page.')
        : notice('bad', e.message));
      return;
    }
    if (asked === diffAsked && changed(memo, 'diff', diff)) clear(diffBox, diffView(diff));
  };

  const start = async (b) => {
    b.disabled = true;
    try {
      const d = await api('GET', 'deployment-engine/deploy');
      clear(startMsg, notice('good', `Deployment ${d.id} started: ${d.steps} step${d.steps === 1 ? '' : 's'}.`));
      watching = d.id;
      shownId = d.id;
      window.history.replaceState(null, '', `#/deploy/${d.id}`);
      await refresh();
    } catch (e) {
      clear(startMsg, notice('bad', e.message));
    } finally { b.disabled = false; }
  };

  append(main,
    h('section', {class: 'card'},
      h('h2', {}, 'Deploy'),
      h('p', {class: 'muted'}, 'Applies the saved plan: installs what is new, removes what left the plan, re-applies what changed or drifted on its node, starts what was stopped outside the controller. Components go in catalog order; nodes run in parallel.'),
      h('h3', {}, 'What a deploy would do'),
      diffBox,
      h('div', {class: 'row'}, h('button', {type: 'button', id: 'start-deploy', class: 'primary', onclick: (ev) => start(ev.currentTarget)}, 'Start deployment')),
      startMsg),
    h('section', {class: 'card'}, h('h2', {}, 'Deployment'), detailMsg, detail),
    h('section', {class: 'card'}, h('h2', {}, 'Live log ', logState), log),
    h('section', {class: 'card'}, h('h2', {}, 'History'), historyBox));

  // Each line starts with its time to the nanosecond, so a line already
  // shown (from the backlog, or before a reconnection) is recognised.
  const shown = new Set();
  openLogSocket((line) => {
    if (!line.startsWith('[de]') && shown.has(line)) return;
    shown.add(line);
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    const el = h('div', {class: line.startsWith('[de]') ? 'line note' : 'line'}, line);
    log.append(el);
    lines += 1;
    if (lines > LOG_LINES_KEPT) { shown.delete(log.firstChild.textContent); log.firstChild.remove(); lines -= 1; }
    if (atBottom) log.scrollTop = log.scrollHeight;
  }, (s) => { logState.textContent = s; logState.className = `badge ${s === 'live' ? 'good' : 'warn'}`; });

  let finishedShown = null;
  const head = h('div', {class: 'row spread'});
  const body = h('div');
  const cancelSlot = h('span', {id: 'cancel-slot'});
  const pauseSlot = h('span', {id: 'pause-slot'});
  let pauseFor = null;
  let headFor = null;

  // Pause (the steps in flight finish, no new one starts) or resume.
  const setPaused = async (id, paused, b) => {
    b.disabled = true;
    try {
      const d = await api('POST', `api/v1/deployments/${encodeURIComponent(id)}/${paused ? 'pause' : 'resume'}`);
      clear(detailMsg, notice('info', h('strong', {}, `Deployment ${d.id} ${d.paused ? 'paused' : 'resumed'}`),
        d.paused ? ': the steps in flight finish; no new step starts until you resume it.' : ': its next steps start.'));
      if (d.steps && d.id === headFor) drawDetail(d);
    } catch (e) {
      clear(detailMsg, notice('bad', e.message));
    }
    b.disabled = false;
    await refresh();
  };

  const cancelDeployment = async (id, b) => {
    b.disabled = true;
    clear(detailMsg, notice('info', `Cancelling deployment ${id}…`));
    try {
      const d = await api('POST', `api/v1/deployments/${encodeURIComponent(id)}/cancel`);
      clear(detailMsg, notice('cancelled', h('strong', {}, `Deployment ${d.id} ${d.state}`),
        `: ${d.steps_done} of ${d.steps_total} step${d.steps_total === 1 ? '' : 's'} were done; its running steps were stopped on their nodes and the rest skipped. A new deployment can start.`));
      if (d.steps && d.id === headFor) drawDetail(d);
    } catch (e) {
      clear(detailMsg, notice('bad', e.message));
    }
    b.disabled = false;
    finishedShown = null;
    await refresh();
  };

  const drawHead = (d) => {
    if (headFor === d.id) return;
    headFor = d.id;
    clear(detailMsg);
    clear(cancelSlot);
    clear(pauseSlot);
    pauseFor = null;
    clear(head,
      h('div', {}, h('strong', {class: 'mono', id: 'deployment-id'}, d.id), ' ', h('span', {id: 'deployment-state'})),
      h('div', {class: 'small muted', id: 'deployment-when'}),
      h('div', {class: 'row'}, pauseSlot, cancelSlot,
        h('button', {type: 'button', class: 'small', id: 'download-deployment-log', onclick: async () => {
          try {
            download(`${d.id}.log`, await api('GET', `api/v1/deployments/${encodeURIComponent(d.id)}/log`));
          } catch (e) { clear(startMsg, notice('bad', e.message)); }
        }}, 'Download log')));
  };

  const drawDetail = (d) => {
    if (!detail.contains(head)) clear(detail, head, body);
    drawHead(d);
    // Cancel while it runs; the button is kept across refreshes so a first
    // click stays armed.
    if (d.state !== 'running') clear(cancelSlot);
    else if (!cancelSlot.firstChild) {
      append(cancelSlot, confirmButton('Cancel deployment', 'Confirm cancel', {id: 'cancel-deployment', class: 'small danger'},
        (b) => cancelDeployment(d.id, b)));
    }
    const pauseState = d.state === 'running' ? (d.paused ? 'paused' : 'running') : null;
    if (pauseState !== pauseFor) {
      pauseFor = pauseState;
      clear(pauseSlot, pauseState === null ? null : pauseState === 'paused'
        ? h('button', {type: 'button', class: 'small', id: 'resume-deployment', onclick: (e) => setPaused(d.id, false, e.currentTarget)}, 'Resume')
        : h('button', {type: 'button', class: 'small', id: 'pause-deployment', onclick: (e) => setPaused(d.id, true, e.currentTarget)}, 'Pause'));
    }
    if (!changed(memo, 'detail', d)) return;
    clear(document.getElementById('deployment-state'), deployBadge(d.state));
    document.getElementById('deployment-when').textContent =
      `plan revision ${d.plan_revision} · started ${fmtTime(d.created_at)}${d.finished_at ? ` · finished ${fmtTime(d.finished_at)}` : ''}`;
    const steps = d.steps || [];
    const groups = groupSteps(steps);
    const failed = steps.filter((st) => st.state === 'failed' || st.state === 'cancelled');
    const overall = d.state === 'failed' ? 'bad' : d.state === 'cancelled' ? 'cancelled' : 'good';
    clear(body,
      h('div', {class: 'overall'}, progress(d.steps_done, d.steps_total, overall),
        h('span', {id: 'deployment-steps'}, ` ${d.steps_done}/${d.steps_total} steps`)),
      d.error ? notice(d.state === 'cancelled' ? 'cancelled' : 'bad', d.error) : null,
      d.paused && d.state === 'running' ? h('div', {id: 'deployment-paused'},
        notice('warn', 'Paused: the steps in flight finish; no new step starts until it is resumed.')) : null,
      (d.rollout || []).some((r) => r.canaries || r.max_in_flight !== null || r.watch_secs || !r.serial)
        ? h('table', {class: 'grid', id: 'rollout'},
          h('thead', {}, h('tr', {}, ['Component', 'Canaries', 'At once', 'Watch', 'In flight', 'Watching', 'Done'].map((t) => h('th', {}, t)))),
          h('tbody', {}, (d.rollout || []).map((r) => h('tr', {'data-component': r.component},
            h('td', {}, r.component),
            h('td', {class: 'small'}, r.canary_instances.length ? r.canary_instances.join(', ') : '-'),
            h('td', {}, r.max_in_flight === null ? 'all' : String(r.max_in_flight)),
            h('td', {}, r.watch_secs ? `${r.watch_secs} s` : '-'),
            h('td', {class: 'small in-flight'}, r.in_flight.length ? r.in_flight.join(', ') : '-'),
            h('td', {class: 'small watching'}, r.watching.length ? r.watching.join(', ') : '-'),
            h('td', {}, `${r.done}/${r.instances}`)))))
        : null,
      groups.length ? h('table', {class: 'grid', id: 'progress'},
        h('thead', {}, h('tr', {}, ['Instance', 'Node', 'Kind', 'Progress', ''].map((t) => h('th', {}, t)))),
        h('tbody', {}, groups.map((g) => h('tr', {'data-instance': g.instance, 'data-ip': g.ip},
          h('td', {}, g.instance), h('td', {class: 'mono'}, g.ip), h('td', {class: 'small'}, g.kind),
          h('td', {}, progress(g.done, g.total, g.failed ? 'bad' : g.cancelled ? 'cancelled' : 'good'),
            h('span', {class: 'small'}, ` ${g.done}/${g.total}${g.skipped ? ` · ${g.skipped} skipped` : ''}`)),
          h('td', {class: 'small'}, groupState(g))))))
        : h('p', {class: 'muted'}, 'Nothing to do: the nodes already run this plan.'),
      failed.length ? h('div', {class: 'failures'}, failed.map((st) => h('details', {open: true, class: st.state},
        h('summary', {}, st.state === 'cancelled'
          ? `${st.instance} on ${st.ip}: ${st.action} was cancelled while it ran (attempt ${st.attempts})`
          : `${st.instance} on ${st.ip}: ${st.action} failed after ${st.attempts} attempt(s)${typeof st.exit_code === 'number' ? `, exit ${st.exit_code}` : ''}`),
        st.error ? h('div', {}, st.error) : null,
        st.output ? h('pre', {class: 'log small'}, st.output) : null))) : null);
    sizeBars(body);
  };

  const refresh = async () => {
    let list;
    try { list = await api('GET', 'api/v1/deployments'); } catch (e) { clear(historyBox, notice('bad', e.message)); return; }
    // What a deploy would do is asked again when a deployment ends (or
    // started and ended between two looks), and every few seconds between
    // deployments: it follows what the nodes report (a process stopped
    // behind the controller's back, a changed file).
    const running = list.find((d) => d.state === 'running');
    if (watching && (!running || running.id !== watching)) {
      watching = null;
      loadDiff();
    } else if (!running && Date.now() - diffAt >= DIFF_POLL_MS) {
      loadDiff();
    }
    if (running) watching = running.id;
    const id = shownId || (list[0] && list[0].id);
    if (changed(memo, 'history', [id, list])) {
      clear(historyBox, list.length ? h('table', {class: 'grid', id: 'history-table'},
        h('thead', {}, h('tr', {}, ['Deployment', 'State', 'Plan', 'Steps', 'Started', 'Finished'].map((t) => h('th', {}, t)))),
        h('tbody', {}, list.map((d) => h('tr', {'data-deployment': d.id, class: d.id === id ? 'selected' : null},
          h('td', {}, h('a', {class: 'mono', href: `#/deploy/${encodeURIComponent(d.id)}`}, d.id)),
          h('td', {}, deployBadge(d.state)),
          h('td', {}, `rev ${d.plan_revision}`),
          h('td', {}, `${d.steps_done}/${d.steps_total}`),
          h('td', {class: 'small'}, fmtTime(d.created_at)),
          h('td', {class: 'small'}, fmtTime(d.finished_at))))))
        : h('p', {class: 'muted'}, 'No deployment yet.'));
    }
    if (!id) { clear(detail, h('p', {class: 'muted'}, 'No deployment yet: save a plan, then start one here.')); return; }
    // A finished deployment no longer changes: fetched once, not every second.
    if (id === finishedShown) return;
    try {
      const d = await api('GET', `api/v1/deployments/${encodeURIComponent(id)}`);
      drawDetail(d);
      if (d.state !== 'running') finishedShown = d.id;
    } catch (e) { clear(detail, notice('bad', e.message)); }
  };
  loadDiff();
  page.every(1000, refresh);
}

// ---------------------------------------------------------------- status

function renderStatus(main) {
  const box = h('div', {id: 'status'});
  const msg = h('div', {id: 'op-result'});
  const stamp = h('span', {class: 'small muted', id: 'status-updated'});
  const tbody = h('tbody');
  const table = h('table', {class: 'grid', id: 'status-table'},
    h('thead', {}, h('tr', {}, ['Component', 'Node', 'Status', 'CPU', 'Memory', 'Disk', ''].map((t) => h('th', {}, t)))),
    tbody);
  let busy = false;

  const setBusy = (b) => {
    busy = b;
    main.querySelectorAll('button[data-op]').forEach((el) => { el.disabled = b; });
  };

  const operate = async (verb, comp, ip) => {
    if (busy) return;
    setBusy(true);
    const what = comp === 'all' ? 'every component' : `${comp} on ${ip}`;
    const doing = {start: 'Starting', restart: 'Restarting', stop: 'Stopping'}[verb];
    clear(msg, notice('info', `${doing} ${what}…`));
    try {
      const rows = await api('PUT', `deployment-engine/${verb}`, {name: comp, ip});
      const bad = rows.filter((r) => r.Result !== 'ok');
      clear(msg, notice(bad.length ? 'bad' : 'good',
        h('strong', {}, bad.length ? `${verb} failed on ${bad.length} of ${rows.length}:` : `${verb} done: ok on ${rows.length} instance(s)`),
        h('ul', {}, rows.map((r) => h('li', {}, `${r.Comp} ${r.Ip}: ${r.Result}`)))));
    } catch (e) {
      clear(msg, notice('bad', e.message));
    } finally {
      setBusy(false);
    }
    refresh();
  };

  append(main, h('section', {class: 'card'},
    h('div', {class: 'row spread'}, h('h2', {}, 'Status ', h('span', {class: 'live-dot', title: 'refreshed live'})), stamp),
    h('p', {class: 'muted'}, 'Every component instance of the plan, as the node\'s monit reports it. An instance stopped here stays stopped, deployments included, until it is started or restarted here.'),
    h('div', {class: 'row'},
      h('button', {type: 'button', id: 'start-all', 'data-op': 'start', onclick: () => operate('start', 'all', '0.0.0.0')}, 'Start all'),
      h('button', {type: 'button', id: 'restart-all', 'data-op': 'restart', onclick: () => operate('restart', 'all', '0.0.0.0')}, 'Restart all'),
      confirmButton('Stop all', 'Confirm stop all', {id: 'stop-all', class: 'danger', 'data-op': 'stop'}, () => operate('stop', 'all', '0.0.0.0'))),
    msg, box));

  const gen = page.gen;
  const refresh = async () => {
    let rows;
    try { rows = await api('GET', 'deployment-engine/status'); } catch (e) {
      clear(box, e.status === 403
        ? notice('info', 'No plan is stored yet: write one on the ', h('a', {href: '#/plan'}, 'Plan'), ' page.')
        : notice('bad', e.message));
      return;
    }
    if (!page.alive(gen)) return;
    stamp.textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (!box.contains(table)) clear(box, table);
    syncRows(tbody, rows, (r) => `${r.Comp}@${r.Ip}`, (r) => [
      h('strong', {}, r.Comp),
      h('td', {class: 'mono'}, r.Ip),
      h('td', {class: 'status-cell'}, badge(r.Status, stateKind(r.Status.split(' ')[0]))),
      r.Cpu, r.Mem, r.Disk,
    ], (r) => [
      h('button', {type: 'button', class: 'small', 'data-op': 'start', disabled: busy, onclick: () => operate('start', r.Comp, r.Ip)}, 'Start'),
      h('button', {type: 'button', class: 'small', 'data-op': 'restart', disabled: busy, onclick: () => operate('restart', r.Comp, r.Ip)}, 'Restart'),
      confirmButton('Stop', 'Confirm stop', {class: 'small danger', 'data-op': 'stop', disabled: busy}, () => operate('stop', r.Comp, r.Ip)),
    ], (r) => ({'data-comp': r.Comp, 'data-ip': r.Ip}));
  };
  page.every(POLL_MS, refresh);
}

// ---------------------------------------------------------------- run

function renderRun(main) {
  const script = h('textarea', {id: 'run-script', rows: 4, spellcheck: 'false', 'aria-label': 'command',
    placeholder: 'uptime; df -h /'});
  const timeout = h('input', {id: 'run-timeout', type: 'number', min: 1, max: 3600, value: 60, 'aria-label': 'timeout in seconds'});
  const user = h('input', {id: 'run-user', type: 'text', placeholder: 'root', 'aria-label': 'user', autocomplete: 'off'});
  const targets = h('div', {id: 'run-targets', class: 'targets'});
  const results = h('div', {id: 'run-results'});
  const runButton = h('button', {type: 'button', id: 'run-command', class: 'primary'}, 'Run');

  const run = async () => {
    const chosen = [...targets.querySelectorAll('input[type=checkbox]:checked')].map((c) => c.value);
    if (!script.value.trim()) { clear(results, notice('bad', 'Write the command to run first.')); return; }
    if (!chosen.length) { clear(results, notice('bad', 'Pick at least one node.')); return; }
    const body = {script: script.value, targets: chosen, timeout_secs: Number(timeout.value) || 60};
    if (user.value.trim()) body.user = user.value.trim();
    runButton.disabled = true;
    clear(results, notice('info', `Running on ${chosen.length} node(s)…`));
    try {
      const rows = await api('POST', 'api/v1/exec', body);
      const failed = rows.filter((r) => r.exit_code !== 0).length;
      clear(results,
        notice(failed ? 'bad' : 'good', failed ? `Failed on ${failed} of ${rows.length} node(s).` : `Done on ${rows.length} node(s).`),
        rows.map((r) => h('div', {class: 'run-result', 'data-ip': r.ip},
          h('div', {class: 'row'},
            h('strong', {class: 'mono'}, r.ip),
            badge(typeof r.exit_code === 'number' ? `exit ${r.exit_code}` : (r.timed_out ? 'timed out' : 'no exit code'), r.exit_code === 0 ? 'good' : 'bad'),
            h('span', {class: 'small muted'}, `${r.duration_ms} ms`),
            r.error ? h('span', {class: 'small'}, r.error) : null),
          r.stdout ? h('pre', {class: 'log small run-stdout'}, r.stdout) : null,
          r.stderr ? h('pre', {class: 'log small run-stderr'}, r.stderr) : null,
          !r.stdout && !r.stderr ? h('p', {class: 'small muted'}, 'no output') : null)));
    } catch (e) {
      clear(results, notice('bad', e.message));
    } finally { runButton.disabled = false; }
  };
  runButton.addEventListener('click', run);

  append(main,
    h('section', {class: 'card'},
      h('h2', {}, 'Run a command'),
      h('p', {class: 'muted'}, 'Runs a shell command (/bin/sh -c) on the nodes you pick, as root unless you name a user, as a signed step; waits for every node. The last 64 KiB of each output is shown.'),
      script,
      h('div', {class: 'row'},
        h('label', {}, 'Timeout (s) ', timeout), h('label', {}, 'User ', user), runButton),
      h('h3', {}, 'Nodes'),
      targets),
    h('section', {class: 'card'}, h('h2', {}, 'Results'), results));
  clear(results, h('p', {class: 'muted'}, 'Nothing run yet.'));

  (async () => {
    let nodes;
    try { nodes = await api('GET', 'api/v1/nodes'); } catch (e) { clear(targets, notice('bad', e.message)); return; }
    const usable = nodes.filter((n) => !n.revoked);
    if (!usable.length) {
      clear(targets, h('p', {class: 'muted'}, 'No node yet: enrol nodes on the ', h('a', {href: '#/install'}, 'Install'), ' page.'));
      return;
    }
    clear(targets, usable.map((n) => h('label', {class: 'target'},
      h('input', {type: 'checkbox', value: n.id, 'data-ip': n.ips[0] || '', checked: n.online}),
      ' ', h('span', {class: 'mono'}, n.ips.join(', ')), ' ', nodeState(n), ' ', h('span', {class: 'small muted'}, n.hostname))));
  })();
}

// ---------------------------------------------------------------- logs

function renderLogs(main) {
  const box = h('div', {id: 'logs'});
  const view = h('div', {id: 'log-view'});
  append(main,
    h('section', {class: 'card'}, h('h2', {}, 'Log files'),
      h('p', {class: 'muted'}, h('code', {}, 'local.log'), ' has every operation and every line of step output; each component instance also has its own file.'),
      box),
    view);
  const show = async (name) => {
    try {
      const text = String(await api('GET', `api/v1/logs/${encodeURIComponent(name)}?tail=${VIEW_LINES}`) || '');
      const count = text ? text.replace(/\n$/, '').split('\n').length : 0;
      clear(view, h('section', {class: 'card'},
        h('div', {class: 'row spread'}, h('h2', {}, name),
          h('span', {class: 'small muted'}, count >= VIEW_LINES ? `the last ${VIEW_LINES} lines (Download has them all)` : `${count} lines`)),
        h('pre', {class: 'log', id: 'log-text'}, text)));
    } catch (e) { clear(view, notice('bad', e.message)); }
  };
  (async () => {
    let names;
    try { names = await api('GET', 'api/v1/logs'); } catch (e) { clear(box, notice('bad', e.message)); return; }
    clear(box, names.length ? h('table', {class: 'grid', id: 'logs-table'},
      h('tbody', {}, names.map((n) => h('tr', {'data-log': n},
        h('td', {class: 'mono'}, n),
        h('td', {class: 'actions'},
          h('button', {type: 'button', class: 'small', onclick: () => show(n)}, 'View'),
          h('button', {type: 'button', class: 'small', 'data-download': n, onclick: async () => {
            try { download(n, await api('GET', `api/v1/logs/${encodeURIComponent(n)}`)); } catch (e) { clear(view, notice('bad', e.message)); }
          }}, 'Download'))))))
      : h('p', {class: 'muted'}, 'No log file yet.'));
  })();
}

// ---------------------------------------------------------------- start

/** A bug in this script is shown on the page, not only in the browser's console. */
function showBug(what) {
  let bar = document.getElementById('console-error');
  if (!bar) {
    bar = h('div', {id: 'console-error', class: 'notice bad bug', role: 'alert'});
    document.body.prepend(bar);
  }
  bar.textContent = `The console hit an error (reload the page; if it stays, report it): ${what}`;
}
window.addEventListener('error', (ev) => showBug(ev.message));
window.addEventListener('unhandledrejection', (ev) => showBug(ev.reason && ev.reason.stack ? ev.reason.stack : String(ev.reason)));
window.addEventListener('hashchange', route);
route();
