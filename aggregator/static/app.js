/* statsd-aggregator dashboard page.
 *
 * Plain browser JavaScript, no dependencies, no build step. Data comes from
 * the daemon's own JSON API:
 *   GET api/v1/dashboards          definitions (labels, units, charts)
 *   GET api/v1/dashboards/{name}   values and chart points over a range
 *   GET api/v1/metrics, api/v1/series   the metric explorer
 *   GET api/v1/stream              server-sent events, one per stored flush:
 *                                  each one triggers a refetch.
 * A `?token=` in the page's URL is sent as "Authorization: Bearer" (and as
 * ?token= to the event stream, since EventSource cannot send headers).
 * Every text from the server is inserted with textContent, never as HTML.
 */
'use strict';

(() => {
  const RANGES = { '15m': 900, '1h': 3600, '24h': 86400, '7d': 604800 };
  const STATS = {
    counter: ['sum', 'rate', 'count'],
    gauge: ['last', 'min', 'max', 'mean'],
    set: ['unique'],
  };
  const DISTRIBUTION_STATS = ['mean', 'p50', 'p90', 'p95', 'p99', 'count', 'sum', 'min', 'max', 'rate'];
  const COLORS = 6;
  const EXPLORER_GROUPS = 6; // lines drawn by a group_by query
  const POLL_MS = 30000; // without a live stream, refetch this often
  const SVG = 'http://www.w3.org/2000/svg';

  const query = new URLSearchParams(location.search);
  const state = {
    token: query.get('token') || '',
    range: RANGES[query.get('range')] ? query.get('range') : null,
    dashboardName: query.get('dashboard') || null,
    dashboards: [],
    dashboard: null, // the definition shown
    step: null, // bucket width of the last dashboard answer
    metrics: [],
    explore: null, // the explorer's current query
    streamOpen: false,
    stale: false,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'text') node.textContent = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---------------------------------------------------------------- formatting

  function formatNumber(value, decimals) {
    if (typeof value !== 'number' || !Number.isFinite(value)) return '–';
    if (Number.isInteger(value)) return value.toLocaleString('en-US');
    const digits = decimals === null || decimals === undefined ? 2 : Math.min(decimals, 6);
    return value.toLocaleString('en-US', { maximumFractionDigits: digits });
  }

  function formatCompact(value) {
    const abs = Math.abs(value);
    const units = [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
    for (const [size, suffix] of units) {
      if (abs >= size) return `${+(value / size).toFixed(abs >= size * 100 ? 0 : 1)}${suffix}`;
    }
    if (abs === 0) return '0';
    if (abs < 0.01) return value.toExponential(0);
    return `${+value.toFixed(abs >= 100 ? 0 : 2)}`;
  }

  function formatDuration(seconds) {
    if (seconds % 86400 === 0) return `${seconds / 86400} d`;
    if (seconds % 3600 === 0) return `${seconds / 3600} h`;
    if (seconds % 60 === 0) return `${seconds / 60} min`;
    return `${seconds} s`;
  }

  function formatTime(ts, span) {
    const date = new Date(ts * 1000);
    const hm = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false });
    if (span <= 2 * 86400) return span <= 900 ? date.toLocaleTimeString([], { hour12: false }) : hm;
    return `${date.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${hm}`;
  }

  // ---------------------------------------------------------------- HTTP

  async function api(path, params) {
    const url = new URL(path, document.baseURI);
    for (const [key, value] of params || []) url.searchParams.append(key, value);
    const headers = { Accept: 'application/json' };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const response = await fetch(url, { headers, cache: 'no-store' });
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const reason = body && body.error ? body.error : response.statusText;
      const hint = response.status === 401 ? ' (open the page as /?token=YOUR_TOKEN)' : '';
      throw new Error(`${path}: ${response.status} ${reason}${hint}`);
    }
    return body;
  }

  function rangeParams() {
    const range = state.range || '24h';
    return [['from', `-${range}`], ['to', 'now']];
  }

  function showError(message) {
    const box = $('error');
    box.textContent = message || '';
    box.hidden = !message;
  }

  function remember() {
    const params = new URLSearchParams(location.search);
    if (state.range) params.set('range', state.range);
    if (state.dashboard) params.set('dashboard', state.dashboard.name);
    history.replaceState(null, '', `${location.pathname}?${params}`);
  }

  // ---------------------------------------------------------------- charts

  function niceStep(raw) {
    const power = 10 ** Math.floor(Math.log10(raw));
    const fraction = raw / power;
    const nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
    return nice * power;
  }

  function valueTicks(min, max, count) {
    if (max <= min) max = min + 1;
    const step = niceStep((max - min) / count);
    const ticks = [];
    for (let t = Math.floor(min / step) * step; t < max + step * 0.999; t += step) {
      ticks.push(+t.toPrecision(12));
    }
    return ticks;
  }

  function timeTicks(from, to, count) {
    const choices = [10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800];
    const step = choices.find((c) => (to - from) / c <= count) || 86400 * 7;
    // align to local midnight-based steps so labels read 12:00, 12:15, ...
    const offset = new Date(from * 1000).getTimezoneOffset() * 60;
    const ticks = [];
    for (let t = Math.ceil((from - offset) / step) * step + offset; t <= to; t += step) ticks.push(t);
    return ticks;
  }

  /* Draw `lines` ([{name, points: [[ts, value], ...]}]) over [from, to) into
   * `plot`. Buckets without data break the line. */
  function drawChart(plot, lines, from, to, step, unit) {
    plot.chart = { lines, from, to, step, unit };
    const width = Math.max(200, Math.round(plot.clientWidth || 600));
    const height = Math.max(120, Math.round(plot.clientHeight || 200));
    const margin = { left: 46, right: 10, top: 8, bottom: 22 };
    const innerW = width - margin.left - margin.right;
    const innerH = height - margin.top - margin.bottom;
    let low = 0;
    let high = 0;
    let total = 0;
    for (const line of lines) {
      for (const [, v] of line.points) {
        low = Math.min(low, v);
        high = Math.max(high, v);
        total += 1;
      }
    }
    const yTicks = valueTicks(low, high, 4);
    const y0 = yTicks[0];
    const y1 = yTicks[yTicks.length - 1];
    const span = Math.max(1, to - from);
    const x = (t) => margin.left + Math.min(1, Math.max(0, (t - from) / span)) * innerW;
    const y = (v) => margin.top + innerH - ((v - y0) / (y1 - y0)) * innerH;

    const root = svg('svg', {
      viewBox: `0 0 ${width} ${height}`,
      role: 'img',
      'aria-label': `${lines.map((l) => l.name).join(', ')}: ${total} points`,
    });
    for (const t of yTicks) {
      root.append(svg('line', { class: 'grid-line', x1: margin.left, x2: width - margin.right, y1: y(t), y2: y(t) }));
      root.append(svg('text', { class: 'axis-label', x: margin.left - 6, y: y(t) + 4, 'text-anchor': 'end' }, formatCompact(t)));
    }
    const timeCount = Math.max(2, Math.floor(innerW / 90));
    for (const t of timeTicks(from, to, timeCount)) {
      root.append(svg('text', { class: 'axis-label', x: x(t), y: height - 6, 'text-anchor': 'middle' }, formatTime(t, span)));
    }
    const half = step / 2;
    lines.forEach((line, i) => {
      if (!line.points.length) return;
      const color = `c${i % COLORS}`;
      let d = '';
      let previous = null;
      for (const [t, v] of line.points) {
        const jump = previous === null || t - previous > step * 1.5;
        d += `${jump ? 'M' : 'L'}${x(t + half).toFixed(1)} ${y(v).toFixed(1)}`;
        previous = t;
      }
      root.append(svg('path', { class: `line ${color}`, d, 'data-line': line.name, 'data-points': line.points.length }));
      // Dots where a point stands alone, or all of them when there are few.
      line.points.forEach(([t, v], k) => {
        const alone = (k === 0 || t - line.points[k - 1][0] > step * 1.5)
          && (k === line.points.length - 1 || line.points[k + 1][0] - t > step * 1.5);
        if (alone || line.points.length <= 40) {
          root.append(svg('circle', { class: color, cx: x(t + half).toFixed(1), cy: y(v).toFixed(1), r: alone ? 3 : 2 }));
        }
      });
    });
    if (!total) {
      root.append(svg('text', { class: 'nodata', x: margin.left + innerW / 2, y: margin.top + innerH / 2, 'text-anchor': 'middle' }, 'No data in this range'));
    }
    const cursor = svg('line', { class: 'cursor', y1: margin.top, y2: margin.top + innerH, visibility: 'hidden' });
    root.append(cursor);
    const tip = el('div', { class: 'tip', hidden: true });
    // The read-out under the pointer; kept across redraws (each flush redraws).
    const point = (px) => {
      const t = from + ((px - margin.left) / innerW) * span;
      const bucket = Math.floor(t / step) * step;
      const rows = lines
        .map((line, i) => [line, i, line.points.find((p) => p[0] === bucket)])
        .filter(([, , p]) => p);
      if (!rows.length) {
        cursor.setAttribute('visibility', 'hidden');
        tip.hidden = true;
        return;
      }
      const at = x(bucket + half);
      cursor.setAttribute('x1', at);
      cursor.setAttribute('x2', at);
      cursor.setAttribute('visibility', 'visible');
      tip.replaceChildren(el('div', { text: formatTime(bucket, 0) }));
      for (const [line, i, p] of rows) {
        tip.append(el('div', { class: `c${i % COLORS}` }, el('b', { text: `${line.name}: ` }), `${formatNumber(p[1], 3)}${unit ? ` ${unit}` : ''}`));
      }
      tip.hidden = false;
      const share = at / width;
      tip.style.left = share > 0.5 ? '' : `calc(${(share * 100).toFixed(2)}% + 8px)`;
      tip.style.right = share > 0.5 ? `calc(${((1 - share) * 100).toFixed(2)}% + 8px)` : '';
    };
    root.addEventListener('pointermove', (event) => {
      const box = root.getBoundingClientRect();
      plot.hoverX = ((event.clientX - box.left) / box.width) * width;
      point(plot.hoverX);
    });
    root.addEventListener('pointerleave', () => {
      plot.hoverX = undefined;
      cursor.setAttribute('visibility', 'hidden');
      tip.hidden = true;
    });
    if (plot.hoverX !== undefined) point(plot.hoverX);
    plot.replaceChildren(root, tip);
  }

  function legend(names) {
    return el('div', { class: 'legend' }, ...names.map((name, i) => el('span', { class: `c${i % COLORS}` }, el('i'), el('em', { text: name }))));
  }

  const resizer = typeof ResizeObserver === 'function'
    ? new ResizeObserver((entries) => {
      for (const entry of entries) {
        const plot = entry.target;
        const c = plot.chart;
        if (c && Math.abs((plot.drawnWidth || 0) - plot.clientWidth) > 2) {
          plot.drawnWidth = plot.clientWidth;
          drawChart(plot, c.lines, c.from, c.to, c.step, c.unit);
        }
      }
    })
    : null;

  function newPlot() {
    const plot = el('div', { class: 'plot' });
    if (resizer) resizer.observe(plot);
    return plot;
  }

  // ---------------------------------------------------------------- the dashboard

  function buildDashboard() {
    const dashboard = state.dashboard;
    const cards = $('cards');
    const lists = $('lists');
    const charts = $('charts');
    cards.replaceChildren();
    lists.replaceChildren();
    charts.replaceChildren();
    if (!dashboard) {
      $('title').textContent = 'statsd-aggregator';
      return;
    }
    $('title').textContent = dashboard.title;
    document.title = `${dashboard.title} · statsd-aggregator`;
    for (const value of dashboard.values) {
      if (value.kind === 'top') {
        lists.append(el('section', { class: 'panel toplist', 'data-name': value.name },
          el('h2', { text: value.label }),
          el('ol'),
          el('p', { class: 'empty', text: 'No data in this range' })));
      } else {
        cards.append(el('div', { class: 'card', 'data-name': value.name },
          el('div', { class: 'label', text: value.label }),
          el('div', { class: 'figure' },
            el('span', { class: 'num', text: '…' }),
            value.unit ? el('span', { class: 'unit', text: value.unit }) : null)));
      }
    }
    for (const chart of dashboard.charts) {
      charts.append(el('section', { class: 'panel chart', 'data-name': chart.name },
        el('h2', {}, chart.unit ? `${chart.title} (${chart.unit})` : chart.title, el('span', { class: 'step' })),
        newPlot(),
        legend(chart.lines)));
    }
  }

  function renderDashboard(answer) {
    const dashboard = state.dashboard;
    for (const value of dashboard.values) {
      const got = answer.values[value.name];
      if (value.kind === 'top') {
        renderTopList(value, Array.isArray(got) ? got : []);
      } else {
        const num = document.querySelector(`.card[data-name="${CSS.escape(value.name)}"] .num`);
        num.textContent = formatNumber(got, value.decimals);
        num.dataset.value = JSON.stringify(got);
      }
    }
    for (const chart of answer.charts) {
      const panel = document.querySelector(`.chart[data-name="${CSS.escape(chart.name)}"]`);
      if (!panel) continue;
      const definition = dashboard.charts.find((c) => c.name === chart.name);
      panel.querySelector('h2 .step').textContent = ` · ${formatDuration(answer.step)} buckets`;
      drawChart(panel.querySelector('.plot'), chart.lines, answer.from, answer.to, answer.step, definition ? definition.unit : '');
    }
  }

  function renderTopList(value, entries) {
    const panel = document.querySelector(`.toplist[data-name="${CSS.escape(value.name)}"]`);
    const [idField, valueField] = value.fields || ['id', 'value'];
    const top = entries.length ? Math.max(...entries.map((e) => e[valueField]), 0) : 0;
    const items = entries.map((entry) => {
      const v = entry[valueField];
      const share = top > 0 ? Math.max(0, (v / top) * 100) : 0;
      return el('li', { 'data-id': entry[idField], 'data-value': JSON.stringify(v) },
        el('span', { class: 'id', text: entry[idField], title: entry[idField] }),
        el('span', { class: 'num', text: formatNumber(v, value.decimals) }),
        el('span', { class: 'bar' }, el('i', { style: `width:${share.toFixed(1)}%` })));
    });
    panel.querySelector('ol').replaceChildren(...items);
    panel.querySelector('.empty').hidden = items.length > 0;
  }

  async function refreshDashboard() {
    if (!state.dashboard) return;
    const answer = await api(`api/v1/dashboards/${encodeURIComponent(state.dashboard.name)}`, rangeParams());
    state.step = answer.step;
    state.window = [answer.from, answer.to];
    renderDashboard(answer);
    document.body.dataset.refreshed = String(Date.now());
  }

  // ---------------------------------------------------------------- the explorer

  function statsOf(type) {
    return STATS[type] || DISTRIBUTION_STATS;
  }

  function fillMetricPicker() {
    const picker = $('x-metric');
    const chosen = picker.value;
    const options = [el('option', { value: '', text: state.metrics.length ? 'pick a metric…' : 'no metrics yet' })];
    for (const metric of state.metrics) {
      const key = `${metric.name}|${metric.type}`;
      options.push(el('option', { value: key, text: `${metric.name} (${metric.type})` }));
    }
    picker.replaceChildren(...options);
    if (chosen && state.metrics.some((m) => `${m.name}|${m.type}` === chosen)) picker.value = chosen;
  }

  function chosenMetric() {
    const key = $('x-metric').value;
    return state.metrics.find((m) => `${m.name}|${m.type}` === key) || null;
  }

  function onMetricPicked() {
    const metric = chosenMetric();
    const stat = $('x-stat');
    const group = $('x-group');
    const keepStat = stat.value;
    const keepGroup = group.value;
    stat.replaceChildren(...(metric ? statsOf(metric.type) : []).map((s) => el('option', { value: s, text: s })));
    if (metric && statsOf(metric.type).includes(keepStat)) stat.value = keepStat;
    const keys = metric ? metric.tags : [];
    group.replaceChildren(el('option', { value: '', text: '(none)' }), ...keys.map((k) => el('option', { value: k, text: k })));
    if (keys.includes(keepGroup)) group.value = keepGroup;
  }

  async function refreshMetricList() {
    const answer = await api('api/v1/metrics');
    const before = JSON.stringify(state.metrics.map((m) => [m.name, m.type, m.tags]));
    state.metrics = answer.metrics;
    if (JSON.stringify(state.metrics.map((m) => [m.name, m.type, m.tags])) !== before) {
      fillMetricPicker();
      onMetricPicked();
    }
  }

  function readExplorer() {
    const metric = chosenMetric();
    if (!metric) return null;
    const tags = $('x-tag').value.split(',').map((t) => t.trim()).filter(Boolean);
    return { metric, stat: $('x-stat').value, tags, groupBy: $('x-group').value };
  }

  async function refreshExplorer() {
    const explore = state.explore;
    if (!explore) return;
    const params = [['metric', explore.metric.name], ['type', explore.metric.type], ...rangeParams()];
    if (explore.stat) params.push(['stat', explore.stat]);
    if (state.step) params.push(['step', String(state.step)]);
    for (const tag of explore.tags) params.push(['tag', tag]);
    if (explore.groupBy) params.push(['group_by', explore.groupBy], ['limit', String(EXPLORER_GROUPS)]);
    const result = $('x-result');
    let answer;
    try {
      answer = await api('api/v1/series', params);
    } catch (err) {
      result.replaceChildren(el('p', { class: 'error', text: err.message }));
      return;
    }
    if (state.explore !== explore) return; // a newer query was asked meanwhile
    const label = (series) => {
      if (explore.groupBy) return series.tags[explore.groupBy] === '' ? '(empty)' : String(series.tags[explore.groupBy]);
      return explore.tags.length ? explore.tags.join(', ') : 'all series';
    };
    const lines = answer.series.map((s) => ({ name: label(s), points: s.points }));
    const plot = result.querySelector('.plot') || newPlot();
    const title = `${answer.metric} · ${answer.stat}${explore.groupBy ? ` by ${explore.groupBy}` : ''}`;
    const rows = answer.series.map((s, i) => el('tr', {},
      el('td', {}, el('span', { class: `legend` }, el('span', { class: `c${i % COLORS}` }, el('i'), el('em', { text: label(s) })))),
      el('td', { class: 'num', 'data-value': JSON.stringify(s.value), text: formatNumber(s.value, 3) })));
    const table = el('table', { class: 'x-table' },
      el('thead', {}, el('tr', {}, el('th', { text: explore.groupBy || 'series' }), el('th', { text: `${answer.stat} over the range` }))),
      el('tbody', {}, ...rows));
    result.replaceChildren(el('h2', { text: title }), plot,
      answer.series.length ? table : el('p', { class: 'empty', text: 'No data in this range' }));
    drawChart(plot, lines, answer.from, answer.to, answer.step, '');
  }

  // ---------------------------------------------------------------- refresh loop

  let running = null;
  let again = false;

  /* Refetch everything; calls while one runs collapse into one more run. */
  function refresh() {
    if (document.hidden) {
      state.stale = true;
      return Promise.resolve();
    }
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        await refreshDashboard();
        await refreshMetricList();
        await refreshExplorer();
        showError('');
      } catch (err) {
        showError(err.message);
      }
    })().finally(() => {
      running = null;
      if (again) {
        again = false;
        refresh();
      }
    });
    return running;
  }

  function setLive(stateName, text) {
    const live = $('live');
    live.dataset.state = stateName;
    live.textContent = text;
  }

  function connect() {
    if (typeof EventSource !== 'function') {
      setLive('error', `polling every ${POLL_MS / 1000} s`);
      return;
    }
    const url = new URL('api/v1/stream', document.baseURI);
    if (state.token) url.searchParams.set('token', state.token);
    const source = new EventSource(url);
    source.addEventListener('open', () => {
      state.streamOpen = true;
      setLive('live', 'live');
      refresh(); // catch up on whatever was missed while disconnected
    });
    source.addEventListener('flush', (event) => {
      let flush = {};
      try {
        flush = JSON.parse(event.data);
      } catch (err) {
        flush = {};
      }
      const at = new Date().toLocaleTimeString([], { hour12: false });
      setLive('live', `live · flush #${flush.seq || '?'} at ${at}`);
      document.body.dataset.flushes = String(flush.seq || 0);
      refresh();
    });
    source.addEventListener('error', () => {
      state.streamOpen = false;
      setLive('error', 'reconnecting…');
    });
  }

  // ---------------------------------------------------------------- start

  function pickRange(range) {
    state.range = range;
    for (const button of document.querySelectorAll('#ranges button')) {
      button.setAttribute('aria-pressed', String(button.dataset.range === range));
    }
  }

  function pickDashboard(name) {
    state.dashboard = state.dashboards.find((d) => d.name === name) || null;
    if (!state.range && state.dashboard) {
      const match = Object.entries(RANGES).find(([, seconds]) => seconds === state.dashboard.range);
      pickRange(match ? match[0] : '24h');
    }
    buildDashboard();
  }

  async function start() {
    for (const button of document.querySelectorAll('#ranges button')) {
      button.addEventListener('click', () => {
        pickRange(button.dataset.range);
        remember();
        refresh();
      });
    }
    if (state.range) pickRange(state.range);
    $('x-metric').addEventListener('change', onMetricPicked);
    $('explore-form').addEventListener('submit', (event) => {
      event.preventDefault();
      state.explore = readExplorer();
      if (state.explore) refreshExplorer();
    });
    $('dashboard-picker').addEventListener('change', (event) => {
      pickDashboard(event.target.value);
      remember();
      refresh();
    });
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && state.stale) {
        state.stale = false;
        refresh();
      }
    });
    setInterval(() => {
      if (!state.streamOpen) refresh();
    }, POLL_MS);

    try {
      const answer = await api('api/v1/dashboards');
      state.dashboards = answer.dashboards;
      const picker = $('dashboard-picker');
      picker.replaceChildren(...answer.dashboards.map((d) => el('option', { value: d.name, text: d.title })));
      picker.hidden = answer.dashboards.length < 2;
      const wanted = state.dashboards.some((d) => d.name === state.dashboardName)
        ? state.dashboardName
        : answer.default || (answer.dashboards[0] && answer.dashboards[0].name);
      picker.value = wanted || '';
      pickDashboard(wanted);
    } catch (err) {
      showError(err.message);
    }
    if (!state.range) pickRange('24h');
    remember();
    await refresh();
    connect();
  }

  start();
})();
