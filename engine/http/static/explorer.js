// The usage explorer: a static page that reads everything through the engine's native
// HTTP routes (/api/meters, /api/query, /api/meters/{name}/dimensions,
// /api/customers/{id}/limits, /alerts, the event streams). Its state lives in the URL
// (/?meter=…&range=…), so a view is a link. No build step, no framework: one file of
// plain modern JavaScript next to the vendored uPlot.
"use strict";

(() => {
  const MAX_POINTS = 100000;
  const TABLE_PAGE = 50;
  const KEY_STORAGE = "metering-engine.api-key";
  const RANGES = ["24h", "7d", "30d", "this-month", "last-month", "custom"];
  const WINDOWS = ["minute", "hour", "day", "week", "month"];
  const WINDOW_MS = { minute: 60e3, hour: 3600e3, day: 86400e3, week: 7 * 86400e3, month: 30 * 86400e3 };
  const RANGE_WINDOW = { "24h": "hour", "7d": "day", "30d": "day", "this-month": "day", "last-month": "day", custom: "day" };
  const ADDITIVE = new Set(["sum", "count"]);
  // Ten colours that stay apart for common colour-vision deficiencies; "other" is grey.
  const PALETTE = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899",
    "#84cc16", "#f97316", "#64748b", "#0ea5e9", "#a855f7"];
  const OTHER_COLOUR = "#c4cbd4";
  const BROWSER_TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  };

  // ---- exact numbers ---------------------------------------------------------------
  // The API writes exact values as JSON numbers (ints and decimals digit for digit).
  // JSON.parse would round them to doubles, so "value" and "threshold" fields keep their
  // source text; they become doubles only where they are drawn.

  const EXACT_KEYS = new Set(["value", "usage", "threshold", "meterValue"]);
  // Exact: "value", "usage", "threshold", an amended event's "meterValue" and every number
  // inside an array (thresholds, reached). JSON.parse hands the reviver each number's source text (context.source).
  function parseExactArrays(text) {
    return JSON.parse(text, function (key, value, context) {
      if (typeof value !== "number") return value;
      const exact = EXACT_KEYS.has(key) || Array.isArray(this);
      return exact ? (context && context.source !== undefined ? context.source : String(value)) : value;
    });
  }

  function splitDecimal(text) {
    let s = String(text).trim();
    if (/e/i.test(s)) s = Number(s).toFixed(20).replace(/0+$/, "").replace(/\.$/, "");
    const negative = s.startsWith("-");
    if (negative || s.startsWith("+")) s = s.slice(1);
    const [whole, fraction = ""] = s.split(".");
    return { negative, whole: whole || "0", fraction };
  }
  // Exact decimal addition (BigInt digits at the largest scale): the grand total of a sum
  // meter is the page's rows plus the server's exact "other", never a float sum.
  function exactSum(values) {
    const parts = values.map(splitDecimal);
    const scale = Math.max(0, ...parts.map((p) => p.fraction.length));
    let total = 0n;
    for (const { negative, whole, fraction } of parts) {
      const digits = BigInt(whole + fraction.padEnd(scale, "0"));
      total += negative ? -digits : digits;
    }
    const negative = total < 0n;
    const digits = (negative ? -total : total).toString().padStart(scale + 1, "0");
    let text = scale ? `${digits.slice(0, -scale)}.${digits.slice(-scale)}` : digits;
    if (scale) text = text.replace(/0+$/, "").replace(/\.$/, "");
    return (negative && text !== "0" ? "-" : "") + text;
  }
  function formatExact(text) {
    if (text === null || text === undefined) return "–";
    const { negative, whole, fraction } = splitDecimal(text);
    const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return (negative ? "−" : "") + grouped + (fraction ? "." + fraction : "");
  }
  const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
  const formatCompact = (n) => (Math.abs(n) < 1000 ? String(+n.toPrecision(4))
    : Math.abs(n) < 1e15 ? compact.format(n) : n.toExponential(1));

  // ---- time zones and calendar ranges -----------------------------------------------

  const partsFormats = new Map();
  function zoneParts(ms, tz) {
    let format = partsFormats.get(tz);
    if (!format) {
      format = new Intl.DateTimeFormat("en-US", { timeZone: tz, hourCycle: "h23", year: "numeric",
        month: "numeric", day: "numeric", hour: "numeric", minute: "numeric", second: "numeric",
        weekday: "short" });
      partsFormats.set(tz, format);
    }
    const parts = {};
    for (const { type, value } of format.formatToParts(new Date(ms))) parts[type] = value;
    return { year: +parts.year, month: +parts.month, day: +parts.day, hour: +parts.hour % 24,
      minute: +parts.minute, second: +parts.second,
      weekday: ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].indexOf(parts.weekday) };
  }
  function zoneOffsetMs(ms, tz) {
    const p = zoneParts(ms, tz);
    return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second) - Math.floor(ms / 1000) * 1000;
  }
  // The instant of a local wall-clock time in tz (fields may overflow: day 0, month 13).
  function zoned(tz, year, month, day, hour = 0, minute = 0) {
    const guess = Date.UTC(year, month - 1, day, hour, minute);
    const first = guess - zoneOffsetMs(guess, tz);
    const second = guess - zoneOffsetMs(first, tz);
    return second;
  }
  function validZone(tz) {
    try { new Intl.DateTimeFormat("en-US", { timeZone: tz }); return true; } catch { return false; }
  }
  function parseLocal(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2}))?$/.exec(text || "");
    return m ? [+m[1], +m[2], +m[3], +(m[4] || 0), +(m[5] || 0)] : null;
  }
  function localText(ms, tz) {
    const p = zoneParts(ms, tz);
    const two = (n) => String(n).padStart(2, "0");
    return `${p.year}-${two(p.month)}-${two(p.day)}T${two(p.hour)}:${two(p.minute)}`;
  }

  // [startMs, endMs) of a range preset, in tz, at nowMs.
  function resolveRange(state, nowMs) {
    const tz = state.tz;
    const today = zoneParts(nowMs, tz);
    const { year, month, day } = today;
    switch (state.range) {
      case "24h": {
        const end = Math.ceil((nowMs + 1) / 60e3) * 60e3;
        return [end - 86400e3, end];
      }
      case "30d": return [zoned(tz, year, month, day - 29), zoned(tz, year, month, day + 1)];
      case "this-month": return [zoned(tz, year, month, 1), zoned(tz, year, month + 1, 1)];
      case "last-month": return [zoned(tz, year, month - 1, 1), zoned(tz, year, month, 1)];
      case "custom": {
        const from = parseLocal(state.from);
        const to = parseLocal(state.to);
        if (from && to) return [zoned(tz, ...from), zoned(tz, ...to)];
        return [zoned(tz, year, month, day - 6), zoned(tz, year, month, day + 1)];
      }
      default: return [zoned(tz, year, month, day - 6), zoned(tz, year, month, day + 1)];
    }
  }

  // The start of every calendar window that meets [start, end), as the engine counts them.
  function windowStarts(start, end, window, tz) {
    const starts = [];
    if (window === "minute" || window === "hour") {
      const step = WINDOW_MS[window];
      const p = zoneParts(start, tz);
      let t = window === "minute" ? Math.floor(start / step) * step
        : zoned(tz, p.year, p.month, p.day, p.hour);
      if (t > start) t -= step;
      for (; t < end && starts.length <= MAX_POINTS; t += step) starts.push(t);
      return starts;
    }
    const p = zoneParts(start, tz);
    let index = 0;
    for (;;) {
      let t;
      if (window === "day") t = zoned(tz, p.year, p.month, p.day + index);
      else if (window === "week") t = zoned(tz, p.year, p.month, p.day - p.weekday + 7 * index);
      else t = zoned(tz, p.year, p.month + index, 1);
      if (t >= end || starts.length > MAX_POINTS) break;
      starts.push(t);
      index += 1;
    }
    return starts;
  }
  function estimatedWindows(start, end, window) {
    return Math.max(1, Math.ceil((end - start) / WINDOW_MS[window]));
  }

  const labelFormats = new Map();
  function formatWindow(ms, window, tz) {
    const key = window + "|" + tz;
    let format = labelFormats.get(key);
    if (!format) {
      const options = { timeZone: tz };
      if (window === "minute" || window === "hour") {
        Object.assign(options, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
      } else if (window === "month") Object.assign(options, { month: "long", year: "numeric" });
      else Object.assign(options, { weekday: "short", month: "short", day: "numeric", year: "numeric" });
      format = new Intl.DateTimeFormat("en-US", options);
      labelFormats.set(key, format);
    }
    return (window === "week" ? "Week of " : "") + format.format(new Date(ms));
  }
  function formatInstant(ms, tz) {
    return new Intl.DateTimeFormat("en-US", { timeZone: tz, month: "short", day: "numeric",
      year: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" }).format(new Date(ms));
  }
  // A range of whole local days reads as its first and last day; others as two instants.
  function formatRange(start, end, tz) {
    const a = zoneParts(start, tz);
    const b = zoneParts(end, tz);
    if (a.hour || a.minute || b.hour || b.minute) return `${formatInstant(start, tz)} – ${formatInstant(end, tz)}`;
    const day = new Intl.DateTimeFormat("en-US", { timeZone: tz, month: "short", day: "numeric", year: "numeric" });
    const last = zoned(tz, b.year, b.month, b.day - 1);
    return last <= start ? day.format(new Date(start)) : `${day.format(new Date(start))} – ${day.format(new Date(last))}`;
  }

  // ---- the page's state in its URL ---------------------------------------------------

  function defaults() {
    return { view: "usage", meter: null, customer: "", range: "7d", from: "", to: "", window: null,
      tz: BROWSER_TZ, group: ["customer_id"], top: 10, chart: null, page: 0, order: "desc", filters: [] };
  }
  function readState() {
    const q = new URLSearchParams(location.search);
    const s = defaults();
    if (q.get("view") === "customer") s.view = "customer";
    if (q.get("meter")) s.meter = q.get("meter");
    if (q.get("customer")) s.customer = q.get("customer");
    if (RANGES.includes(q.get("range"))) s.range = q.get("range");
    s.from = q.get("from") || "";
    s.to = q.get("to") || "";
    if (s.from && s.to && !q.get("range")) s.range = "custom";
    if (WINDOWS.includes(q.get("window"))) s.window = q.get("window");
    if (q.get("tz")) s.tz = q.get("tz");
    if (q.has("group")) s.group = q.get("group").split(",").filter(Boolean);
    const top = parseInt(q.get("top"), 10);
    if (top >= 1 && top <= 50) s.top = top;
    if (q.get("chart") === "lines" || q.get("chart") === "bars") s.chart = q.get("chart");
    const page = parseInt(q.get("page"), 10);
    if (page >= 1) s.page = page - 1;
    if (q.get("order") === "asc") s.order = "asc";
    for (const f of q.getAll("f")) {
      const at = f.indexOf(":");
      if (at > 0) s.filters.push([f.slice(0, at), f.slice(at + 1)]);
    }
    if (!s.window) s.window = RANGE_WINDOW[s.range];
    return s;
  }
  function stateQuery(s) {
    const q = new URLSearchParams();
    const d = defaults();
    if (s.view !== "usage") q.set("view", s.view);
    if (s.meter) q.set("meter", s.meter);
    if (s.view === "customer" && s.customer) q.set("customer", s.customer);
    q.set("range", s.range);
    if (s.range === "custom") { q.set("from", s.from); q.set("to", s.to); }
    q.set("window", s.window);
    q.set("tz", s.tz); // a shared link shows the same days wherever it is opened
    if (s.view === "usage") {
      if (s.group.join(",") !== d.group.join(",")) q.set("group", s.group.join(","));
      if (s.top !== d.top) q.set("top", String(s.top));
      if (s.chart) q.set("chart", s.chart);
      if (s.page) q.set("page", String(s.page + 1));
      if (s.order !== "desc") q.set("order", s.order);
    }
    for (const [key, value] of s.filters) q.append("f", `${key}:${value}`);
    return "?" + q.toString();
  }
  function navigate(change, { push = true } = {}) {
    const next = { ...state, ...change };
    if (!("page" in change)) next.page = 0;
    // The default meter by name: a link keeps showing it when other meters are added.
    if (!next.meter && $("meter").value) next.meter = $("meter").value;
    state = next;
    const url = "/" + stateQuery(state);
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
    render();
  }

  // ---- the API -----------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, retryAfterS) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfterS = retryAfterS;
    }
  }
  let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
  let keyPrompt = null;

  async function api(method, path, body) {
    for (;;) {
      const headers = { Accept: "application/json" };
      if (apiKey) headers["X-API-KEY"] = apiKey;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      let response;
      try {
        response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      } catch (error) {
        throw new ApiError(0, "unreachable", "The server cannot be reached: " + error.message);
      }
      const text = await response.text();
      if (response.status === 401) {
        await askForKey(apiKey ? "That key was refused. Enter another." : "");
        continue;
      }
      if (!response.ok) {
        let detail = { error: text, code: "http_" + response.status };
        try { detail = JSON.parse(text); } catch { /* not JSON: keep the text */ }
        throw new ApiError(response.status, detail.code, detail.error || response.statusText,
          parseInt(response.headers.get("retry-after") || "0", 10));
      }
      return { data: parseExactArrays(text), text };
    }
  }
  function askForKey(message) {
    if (!keyPrompt) {
      keyPrompt = new Promise((resolve) => {
        const dialog = $("key-dialog");
        $("key-error").hidden = !message;
        $("key-error").textContent = message;
        $("key-input").value = "";
        dialog.showModal();
        $("key-form").onsubmit = () => {
          apiKey = $("key-input").value.trim();
          sessionStorage.setItem(KEY_STORAGE, apiKey);
          $("key-button").hidden = false;
          keyPrompt = null;
          resolve();
        };
      });
    }
    return keyPrompt;
  }
  // Answers are kept for QUERY_CACHE_MS, so going back to a view, or changing only the
  // window (the totals stay the same), asks the server only what changed. New events
  // (the stats stream's count moved) drop them all at once.
  const QUERY_CACHE_MS = 15000;
  const QUERY_CACHE_SIZE = 64;
  const queryCache = new Map();
  function query(body) {
    const key = JSON.stringify(body);
    const hit = queryCache.get(key);
    if (hit && performance.now() - hit.at < QUERY_CACHE_MS) return hit.answer;
    const answer = api("POST", "/api/query", body);
    queryCache.set(key, { at: performance.now(), answer });
    answer.catch(() => queryCache.delete(key));
    while (queryCache.size > QUERY_CACHE_SIZE) queryCache.delete(queryCache.keys().next().value);
    return answer;
  }

  let metersCache = null;
  async function meters() {
    if (!metersCache) {
      // The engine's Meter leaves its defaults out: "sum" is the default aggregation.
      metersCache = (await api("GET", "/api/meters")).data.map((m) => ({ ...m, aggregation: m.aggregation || "sum" }));
    }
    return metersCache;
  }
  const dimensionsCache = new Map();
  // The dimension keys a meter has seen and their top values, {key: [value, …]}, over the
  // server's default range (the last 30 days): each key costs the server a query, so they
  // are asked for once per meter, beside the view rather than before it.
  async function dimensions(meter) {
    const cacheKey = meter;
    if (!dimensionsCache.has(cacheKey)) {
      let keys = {};
      try {
        const answer = (await api("GET", `/api/meters/${encodeURIComponent(meter)}/dimensions?top=20`)).data;
        keys = readDimensions(answer);
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 404 || error.code === "unknown_meter") throw error;
      }
      dimensionsCache.set(cacheKey, keys);
    }
    return dimensionsCache.get(cacheKey);
  }
  function readDimensions(answer) {
    const keys = {};
    const list = Array.isArray(answer) ? answer : answer.dimensions || answer.keys || [];
    if (!Array.isArray(list)) {
      for (const [key, values] of Object.entries(list)) keys[key] = topValues(values);
      return keys;
    }
    for (const item of list) {
      if (typeof item === "string") keys[item] = [];
      else keys[item.key || item.name] = topValues(item.values || item.topValues || item.top || []);
    }
    return keys;
  }
  function topValues(values) {
    return values.map((v) => (typeof v === "object" && v !== null ? v.value : v)).filter((v) => v !== undefined);
  }

  // ---- rendering: status, summary, chart, table --------------------------------------

  let state = readState();
  let renderSeq = 0;
  let chart = null;
  let lastView = null; // what the current view drew: for downloads and tests

  let renderStartedAt = 0;
  function setBusy(busy) {
    if (busy) renderStartedAt = performance.now();
    document.documentElement.dataset.busy = busy ? "1" : "0";
  }
  // A view is done: counted (tests wait on the count) and timed (benchmarks/explorer.py
  // reads how long the view took and, for the first, how long since navigation began).
  function finished(chartState) {
    $("chart").dataset.state = chartState;
    const root = document.documentElement.dataset;
    const done = (parseInt(root.renders || "0", 10) + 1);
    root.renders = String(done);
    root.renderMs = (performance.now() - renderStartedAt).toFixed(1);
    if (done === 1) root.firstViewMs = performance.now().toFixed(1);
    setBusy(false);
  }
  function showStatus(kind, title, text, actions = []) {
    const box = $("status");
    box.className = "status " + kind;
    box.dataset.kind = kind;
    box.replaceChildren(el("h3", { text: title }), el("p", { text }), ...actions);
    box.hidden = false;
  }
  function clearStatus() { $("status").hidden = true; $("status").dataset.kind = ""; }
  function placeholder(text) {
    destroyChart();
    $("chart").replaceChildren(el("div", { class: "placeholder" }, text));
  }
  function destroyChart() {
    if (chart) { chart.destroy(); chart = null; }
  }
  function stat(label, value, id, small = false) {
    return el("div", { class: "stat", id }, el("div", { class: "k", text: label }),
      el("div", { class: small ? "v small" : "v", text: value }));
  }
  function groupLabel(group, keys) {
    if (!keys.length) return "total";
    return keys.map((k) => (group[k] === null || group[k] === undefined ? "(none)" : group[k])).join(" · ");
  }
  function groupKeyOf(group, keys) { return JSON.stringify(keys.map((k) => group[k] ?? null)); }
  function groupNoun(groupBy, capital) {
    const noun = groupBy.length === 1 && groupBy[0] === "customer_id" ? "customers"
      : `groups (${groupBy.map(keyTitle).join(" × ")})`;
    return capital ? noun[0].toUpperCase() + noun.slice(1) : noun;
  }
  function keyTitle(key) { return key === "customer_id" ? "Customer" : key; }

  function filterMap(s) {
    const filter = {};
    for (const [key, value] of s.filters) (filter[key] ||= []).push(value);
    return filter;
  }

  async function render() {
    const seq = ++renderSeq;
    setBusy(true);
    syncControls();
    const current = () => seq === renderSeq;
    try {
      if (state.view === "customer") await renderCustomer(current);
      else await renderUsage(current);
    } catch (error) {
      if (!current()) return;
      renderError(error);
      finished("error");
    }
  }

  function renderError(error) {
    destroyChart();
    $("chart").replaceChildren();
    if (error instanceof ApiError && error.status === 503) {
      const wait = Math.max(1, error.retryAfterS || 2);
      showStatus("error", "The engine is starting", `It is recovering its data. This page tries again in ${wait} s.`);
      setTimeout(() => render(), wait * 1000);
    } else if (error instanceof ApiError && error.status === 403) {
      showStatus("error", "Not allowed", `This API key may not read this: ${error.message}.`);
    } else if (error instanceof ApiError && error.code === "unknown_meter") {
      unknownMeter(state.meter, metersCache || []);
    } else {
      showStatus("error", "Something went wrong", error.message || String(error),
        [el("button", { type: "button", class: "ghost", onclick: () => render(), text: "Try again" })]);
    }
  }

  function unknownMeter(name, known) {
    const actions = known.slice(0, 8).map((m) => el("button", { type: "button", class: "ghost",
      onclick: () => navigate({ meter: m.name, filters: [] }), text: m.name }));
    showStatus("error", `No meter named “${name}”`, known.length
      ? "This server has no such meter. Pick one of its meters:" : "This server has no meters yet.", actions);
  }

  async function chooseMeter(current) {
    const all = await meters();
    if (!current()) return null;
    fillMeterSelect(all);
    if (!all.length) {
      $("usage-view").hidden = true;
      $("usage-controls").hidden = true;
      showStatus("empty", "No meters yet", "Define a meter and send events, then come back: for example " +
        "POST /meters with {\"meterApiName\": \"api_calls\", \"aggregation\": \"sum\"} and POST /ingest.");
      finished("empty");
      return null;
    }
    const name = state.meter || all[0].name;
    const meter = all.find((m) => m.name === name);
    if (!meter) {
      $("usage-view").hidden = true;
      $("customer-view").hidden = true;
      $("usage-controls").hidden = true; // no meter: nothing to group or filter
      unknownMeter(name, all);
      finished("error");
      return null;
    }
    return meter;
  }

  async function renderUsage(current) {
    $("customer-view").hidden = true;
    const meter = await chooseMeter(current);
    if (!meter) return;
    const s = state;
    const [startMs, endMs] = resolveRange(s, Date.now());
    if (!(startMs < endMs)) {
      showStatus("error", "Empty range", "The range ends before it starts: pick another.");
      placeholder("No range");
      finished("error");
      return;
    }
    const groupBy = s.group;
    const filter = filterMap(s);
    const base = { meterApiName: meter.name, startMs, endMs, timezone: s.tz, groupBy, filter };
    const descending = s.order !== "asc";
    const windows = windowStarts(startMs, endMs, s.window, s.tz);
    const windowCount = windows.length > MAX_POINTS ? estimatedWindows(startMs, endMs, s.window) : windows.length;
    const topN = groupBy.length ? s.top : 1;

    // One round trip where possible: the totals (they size the view and fill the table),
    // the dimension keys (the controls) and, when the view cannot be over the limit
    // whatever the number of groups, the series too, all at once.
    const totalsTake = groupBy.length ? { limit: TABLE_PAGE + 1, offset: s.page * TABLE_PAGE, ascending: !descending } : undefined;
    const mostPoints = windowCount * (groupBy.length ? topN + 1 : 1);
    const seriesAnswer = mostPoints <= MAX_POINTS ? seriesQuery(base, groupBy, topN) : null;
    seriesAnswer?.catch(() => {}); // awaited below; a failure before then is not "unhandled"
    // A sum or count's grand total is the page plus the exact rest ("other"): one query
    // less; other aggregations (a max of maxima is not a sum) ask for it.
    const additive = ADDITIVE.has(meter.aggregation);
    const dims = dimensionsCache.get(meter.name);
    const dimsAnswer = dims ? null : dimensions(meter.name);
    dimsAnswer?.then((found) => { if (current() || state.meter === meter.name) fillGroupAndFilterControls(meter, found); })
      .catch(() => {}); // the controls keep what they have; the view does not depend on them
    fillGroupAndFilterControls(meter, dims || {});
    const [totals, grand] = await Promise.all([
      query({ ...base, window: null, take: totalsTake, other: !!groupBy.length && additive }),
      groupBy.length && !additive ? query({ ...base, window: null, groupBy: [] }) : null,
    ]);
    if (!current()) return;
    $("chart-kind").value = chartKind(meter);
    $("usage-view").hidden = false;
    const totalRows = totals.data.rows;
    const grandValue = grand ? (grand.data.rows[0]?.value ?? "0")
      : groupBy.length ? exactSum([...totalRows.map((r) => r.value), ...(totals.data.other || []).map((r) => r.value)])
        : (totalRows[0]?.value ?? "0");
    const moreGroups = totalRows.length > TABLE_PAGE;
    // groupCount: every group before paging (a server without it: what the first page shows).
    const groupsKnown = typeof totals.data.groupCount === "number" ? totals.data.groupCount
      : s.page === 0 && !moreGroups ? totalRows.length : null;

    const groupCount = groupBy.length ? (groupsKnown ?? Infinity) : 1;
    const seriesCount = Math.min(groupCount, topN) + (groupCount > topN ? 1 : 0);
    const points = windowCount * seriesCount;

    renderSummary(meter, grandValue, groupBy, groupsKnown, moreGroups || s.page > 0, startMs, endMs, points);
    renderTable(meter, groupBy, totalRows.slice(0, TABLE_PAGE), grandValue, moreGroups, groupsKnown);
    lastView = { meter: meter.name, aggregation: totals.data.aggregation, startMs, endMs, window: s.window,
      timezone: s.tz, groupBy, filter, totals: totalRows.slice(0, TABLE_PAGE), grandTotal: grandValue,
      windows: [], series: [], points, answers: {} };
    window.explorer.view = lastView;

    $("chart-title").textContent = `${meter.name} by ${s.window}`;
    $("chart-note").textContent = "";
    $("download-csv").disabled = $("download-json").disabled = true;
    if (points > MAX_POINTS) {
      const coarser = WINDOWS.slice(WINDOWS.indexOf(s.window) + 1)
        .find((w) => estimatedWindows(startMs, endMs, w) * seriesCount <= MAX_POINTS);
      showStatus("refused", "Too many points for one view",
        `This view would draw ${points.toLocaleString("en-US")} points (${windowCount.toLocaleString("en-US")} ` +
        `${s.window}s × ${seriesCount} series), over the ${MAX_POINTS.toLocaleString("en-US")}-point limit. ` +
        `Pick a coarser window${coarser ? ` (${coarser})` : ""} or a shorter range.`,
        coarser ? [el("button", { type: "button", onclick: () => navigate({ window: coarser }), text: `Show by ${coarser}` })] : []);
      placeholder("Refused: pick a coarser window or a shorter range.");
      finished("refused");
      return;
    }
    if (!totalRows.length && s.page === 0) {
      showStatus("empty", "No usage in this range", `No event of ${meter.name} falls in ` +
        `${formatRange(startMs, endMs, s.tz)}${s.filters.length ? " with these filters" : ""}. ` +
        "Try a longer range or fewer filters.");
      placeholder(`No usage of ${meter.name} in this range`);
      lastView.windows = windows;
      finished("empty");
      return;
    }
    clearStatus();

    const series = await (seriesAnswer ?? seriesQuery(base, groupBy, topN));
    if (!current()) return;
    lastView.answers.series = series.text;
    drawUsageChart(meter, windows, groupBy, series);
    $("download-csv").disabled = $("download-json").disabled = false;
    finished("ready");
  }

  // The top groups per window, plus "other": every other group together, exactly, per
  // window (the server's "other" rows, so it is right for max, min and averages too).
  async function seriesQuery(base, groupBy, topN) {
    if (!groupBy.length) {
      const answer = await query({ ...base, window: state.window });
      return { rows: answer.data.rows, other: null, text: answer.text };
    }
    const answer = await query({ ...base, window: state.window, take: { limit: topN }, other: true });
    const other = Array.isArray(answer.data.other)
      ? new Map(answer.data.other.map((r) => [r.windowStartMs, r.value])) : null;
    return { rows: answer.data.rows, other, text: answer.text };
  }

  function renderSummary(meter, grandValue, groupBy, groupsKnown, paged, startMs, endMs, points) {
    const cards = [stat(`Total ${meter.aggregation}`, formatExact(grandValue), "summary-total")];
    if (groupBy.length) {
      cards.push(stat(groupNoun(groupBy, true),
        groupsKnown !== null ? groupsKnown.toLocaleString("en-US") : "more than " + TABLE_PAGE, "summary-groups"));
    }
    cards.push(stat("Range", formatRange(startMs, endMs, state.tz), "summary-range", true));
    cards.push(stat(points > MAX_POINTS ? "Points (over the limit)" : "Points drawn", points.toLocaleString("en-US"), "summary-points"));
    $("summary").replaceChildren(...cards);
  }

  function renderTable(meter, groupBy, rows, grandValue, more, groupCount) {
    const s = state;
    const head = $("totals").tHead;
    const body = $("totals").tBodies[0];
    const additive = ADDITIVE.has(meter.aggregation);
    const sortButton = el("button", { type: "button", id: "sort-total",
      "aria-label": "Sort by total", onclick: () => navigate({ order: s.order === "asc" ? "desc" : "asc" }),
      text: `Total ${s.order === "asc" ? "↑" : "↓"}` });
    head.replaceChildren(el("tr", {},
      el("th", { class: "rank", text: "#" }),
      ...(groupBy.length ? groupBy : ["(all)"]).map((k) => el("th", { text: k === "(all)" ? "" : keyTitle(k) })),
      el("th", { class: "num", "aria-sort": s.order === "asc" ? "ascending" : "descending" }, sortButton),
      additive ? el("th", { text: "Share" }) : null));
    const grand = Number(grandValue);
    body.replaceChildren(...rows.map((row, i) => {
      const share = additive && grand > 0 ? Number(row.value) / grand : null;
      const cells = (groupBy.length ? groupBy : [null]).map((k) => {
        if (k === null) return el("td", { text: "total" });
        const value = row.group[k];
        if (k === "customer_id" && value !== null && value !== undefined) {
          return el("td", {}, el("a", { href: "/" + stateQuery({ ...s, view: "customer", customer: value, filters: [] }),
            onclick: (event) => { event.preventDefault(); navigate({ view: "customer", customer: value, filters: [] }); },
            text: value }));
        }
        return el("td", { text: value ?? "(none)" });
      });
      return el("tr", { "data-group": groupKeyOf(row.group, groupBy), "data-value": row.value },
        el("td", { class: "rank", text: String(s.page * TABLE_PAGE + i + 1) }), ...cells,
        el("td", { class: "num", text: formatExact(row.value) }),
        !additive ? null : el("td", { class: "muted" }, share === null ? "" : [
          el("span", { text: (share * 100).toFixed(share < 0.001 ? 2 : 1) + "%" }),
          el("span", { class: "share" }, el("span", { style: `width:${Math.min(100, share * 100)}%` }))]));
    }));
    if (!rows.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: String(groupBy.length + 3), class: "muted",
        text: s.page ? "No more groups." : "No usage in this range." })));
    }
    $("table-note").textContent = groupBy.length
      ? `${s.order === "asc" ? "quietest" : "busiest"} first · ${TABLE_PAGE} per page` : "";
    $("page-prev").disabled = s.page === 0;
    $("page-next").disabled = !more;
    $("page-label").textContent = groupCount === null ? `Page ${s.page + 1}`
      : `Page ${s.page + 1} of ${Math.max(1, Math.ceil(groupCount / TABLE_PAGE))} · ${groupCount.toLocaleString("en-US")} groups`;
    $("pager").hidden = !groupBy.length;
  }

  // ---- the chart ---------------------------------------------------------------------

  function drawUsageChart(meter, windows, groupBy, series) {
    const s = state;
    const index = new Map(windows.map((t, i) => [t, i]));
    for (const row of series.rows) {
      if (!index.has(row.windowStartMs)) index.set(row.windowStartMs, -1);
    }
    if ([...index.values()].includes(-1)) {
      const all = [...index.keys()].sort((a, b) => a - b);
      windows = all;
      all.forEach((t, i) => index.set(t, i));
    }
    const byGroup = new Map();
    for (const row of series.rows) {
      const key = groupKeyOf(row.group, groupBy);
      if (!byGroup.has(key)) byGroup.set(key, { label: groupLabel(row.group, groupBy), group: row.group, values: windows.map(() => null) });
      byGroup.get(key).values[index.get(row.windowStartMs)] = row.value;
    }
    // Busiest first: the order of the totals over the whole range.
    const groups = [...byGroup.values()].sort((a, b) => sumOf(b.values) - sumOf(a.values));
    if (series.other) {
      const values = windows.map((t) => series.other.get(t) ?? null);
      if (values.some((v) => v !== null && Number(v) !== 0)) {
        groups.push({ label: "other", group: null, other: true, values });
      }
    }
    const plotted = groups.map((g, i) => ({ ...g, colour: g.other ? OTHER_COLOUR : PALETTE[i % PALETTE.length] }));
    lastView.windows = windows;
    lastView.series = plotted.map((g) => ({ label: g.label, group: g.group, other: !!g.other, values: g.values }));
    const kind = chartKind(meter);
    $("chart-title").textContent = `${meter.name} by ${s.window}`;
    const hasOther = plotted.some((g) => g.other);
    $("chart-note").textContent = (groupBy.length ? `top ${s.top} ${groupNoun(groupBy, false)}` +
      (hasOther ? " and other" : "") + " · " : "") + `time zone ${s.tz}` + (kind === "bars" ? " · stacked" : "");
    makeChart($("chart"), windows, plotted, kind, s.window, s.tz, 320, true);
  }
  // Stacking adds values up, which only means something for sum and count.
  function chartKind(meter) { return state.chart || (ADDITIVE.has(meter.aggregation) ? "bars" : "lines"); }
  function sumOf(values) { return values.reduce((a, v) => a + (v === null ? 0 : Number(v)), 0); }

  function makeChart(container, windows, plotted, kind, windowName, tz, height, main) {
    const stacked = kind === "bars";
    // Stacked bars are drawn from the top of the stack down (each bar covers the ones
    // above it from zero), so uPlot's series go "other" first and the busiest last.
    const order = stacked ? plotted.map((_, i) => i).reverse() : plotted.map((_, i) => i);
    // What the series draw, replaced in place when a live update keeps the same shape.
    const model = { plotted, raw: null };
    const setValues = (next) => {
      model.plotted = next;
      model.raw = order.map((i) => next[i].values.map((v) => (v === null ? null : Number(v))));
    };
    setValues(plotted);
    const shown = order.map(() => true);
    const stack = () => {
      const raw = model.raw;
      if (!stacked) return raw;
      const out = raw.map((vals) => vals.slice());
      for (let w = 0; w < windows.length; w++) {
        let acc = 0;
        for (let k = raw.length - 1; k >= 0; k--) {
          if (shown[k]) acc += raw[k][w] ?? 0;
          out[k][w] = shown[k] ? acc : null;
        }
      }
      return out;
    };
    const signature = JSON.stringify([kind, windowName, tz, height, windows, plotted.map((p) => p.label)]);
    if (main && chart && chart.explorerSignature === signature) {
      chart.explorerUpdate(plotted);
      return chart;
    }
    const step = windows.length > 1 ? windows[1] - windows[0] : WINDOW_MS[windowName];
    const lastEnd = windows.length ? windows[windows.length - 1] + step : 0;
    const bars = uPlot.paths.bars({ size: [0.78, 80], align: 1, gap: 1 });
    const opts = {
      width: Math.max(320, container.clientWidth || 800),
      height,
      ms: 1,
      tzDate: (ts) => uPlot.tzDate(new Date(ts), tz),
      cursor: { points: { show: !stacked }, focus: { prox: 16 } },
      legend: { show: main, live: true },
      focus: { alpha: 0.35 },
      scales: {
        x: { time: true, range: (u, min, max) => (stacked && windows.length ? [windows[0], lastEnd] : [min, max]) },
        y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.05 : 1] },
      },
      axes: [
        calendarAxis(windows, windowName, tz, main),
        { stroke: "#616e7c", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e4e7eb" },
          size: 64, values: (u, ticks) => ticks.map(formatCompact) },
      ],
      series: [
        { label: windowName[0].toUpperCase() + windowName.slice(1), value: (u, ts) => (ts == null ? "–" : formatWindow(ts, windowName, tz)) },
        ...order.map((i, k) => ({
          label: plotted[i].label,
          stroke: plotted[i].colour,
          fill: stacked ? plotted[i].colour : undefined,
          width: stacked ? 0 : 2,
          paths: stacked ? bars : undefined,
          points: { show: !stacked && windows.length <= 60, size: 5 },
          spanGaps: false,
          value: (u, v, si, idx) => (idx == null ? "–" : formatExact(model.plotted[i].values[idx] ?? "0")),
        })),
      ],
      hooks: {
        setSeries: [(u, si, opts2) => {
          if (!stacked || si === null || si === undefined || !opts2 || !("show" in opts2)) return;
          shown[si - 1] = u.series[si].show;
          u.setData([windows, ...stack()], false);
          u.redraw();
        }],
      },
    };
    if (!stacked) {
      for (const serie of opts.series.slice(1)) serie.paths = undefined;
    }
    const data = [windows, ...stack()];
    if (main) destroyChart();
    container.replaceChildren();

    const instance = new uPlot(opts, data, container);
    instance.explorerSignature = signature;
    instance.ctx.canvas.setAttribute("role", "img");
    instance.ctx.canvas.setAttribute("aria-label", `Chart of ${plotted.length} series over ${windows.length} ` +
      "windows; the legend and the table hold the values.");
    instance.explorerUpdate = (next) => { setValues(next); instance.setData([windows, ...stack()]); };
    container.dataset.series = String(plotted.length);
    container.dataset.points = String(plotted.length * windows.length);
    if (main) {
      chart = instance;
      window.explorer.chart = instance;
      if (stacked) {
        // The legend reads busiest first, whatever order the stack is drawn in.
        const rows = [...container.querySelectorAll(".u-legend .u-series")];
        const parent = rows[0]?.parentNode;
        for (const row of rows.slice(1).reverse()) parent.append(row);
      }
      makeLegendKeyboardFriendly(container);
    }
    return instance;
  }

  // Days, weeks and months: one tick per window (thinned to fit), labelled as a date.
  function calendarAxis(windows, windowName, tz, main) {
    const axis = { stroke: "#616e7c", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e4e7eb" } };
    if (windowName === "minute" || windowName === "hour") return axis;
    const most = main ? 14 : 5;
    const stride = Math.max(1, Math.ceil(windows.length / most));
    const format = new Intl.DateTimeFormat("en-US", windowName === "month"
      ? { timeZone: tz, month: "short", year: "numeric" } : { timeZone: tz, month: "short", day: "numeric" });
    return { ...axis, splits: () => windows.filter((_, i) => i % stride === 0),
      values: (u, ticks) => ticks.map((t) => format.format(new Date(t))) };
  }

  // uPlot's legend toggles a series on click; make each entry a focusable button too.
  function makeLegendKeyboardFriendly(container) {
    for (const row of container.querySelectorAll(".u-legend .u-series")) {
      if (row.querySelector(".u-marker") === null || row.rowIndex === 0) continue;
      row.tabIndex = 0;
      row.setAttribute("role", "button");
      row.setAttribute("aria-pressed", String(!row.classList.contains("u-off")));
      row.addEventListener("keydown", (event) => {
        if (event.key !== "Enter" && event.key !== " ") return;
        event.preventDefault();
        row.querySelector(".u-label")?.dispatchEvent(new MouseEvent("click", { bubbles: true }));
        row.setAttribute("aria-pressed", String(!row.classList.contains("u-off")));
      });
      row.addEventListener("click", () => row.setAttribute("aria-pressed", String(!row.classList.contains("u-off"))));
    }
  }

  addEventListener("resize", () => {
    if (chart) chart.setSize({ width: Math.max(320, $("chart").clientWidth), height: 320 });
  });

  // ---- downloads ---------------------------------------------------------------------

  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const link = el("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 0);
  }
  function csvCell(text) {
    const s = String(text ?? "");
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }
  function viewCsv(view) {
    const keys = view.groupBy;
    const lines = [["window_start", "window_start_ms", ...(keys.length ? keys : []), "value"].map(csvCell).join(",")];
    view.windows.forEach((t, w) => {
      for (const serie of view.series) {
        const value = serie.values[w];
        if (value === null || value === undefined) continue;
        const group = keys.map((k) => (serie.other ? "(other)" : serie.group ? serie.group[k] ?? "" : ""));
        lines.push([localText(t, view.timezone), t, ...group, value].map(csvCell).join(","));
      }
    });
    return lines.join("\r\n") + "\r\n";
  }
  function viewJson(view) {
    // Exact values stay digit for digit: they are the API's own text, spliced in.
    const series = view.series.map((s) => `{"label":${JSON.stringify(s.label)},"group":${JSON.stringify(s.group)},` +
      `"other":${s.other},"values":[${s.values.map((v) => (v === null ? "null" : v)).join(",")}]}`);
    const totals = view.totals.map((r) => `{"group":${JSON.stringify(r.group)},"value":${r.value}}`);
    return `{"meterApiName":${JSON.stringify(view.meter)},"aggregation":${JSON.stringify(view.aggregation)},` +
      `"startMs":${view.startMs},"endMs":${view.endMs},"window":${JSON.stringify(view.window)},` +
      `"timezone":${JSON.stringify(view.timezone)},"groupBy":${JSON.stringify(view.groupBy)},` +
      `"filter":${JSON.stringify(view.filter)},"total":${view.grandTotal},` +
      `"windows":[${view.windows.join(",")}],"series":[${series.join(",")}],"totals":[${totals.join(",")}]}\n`;
  }
  function viewFileName(view, ext) {
    const day = (ms) => localText(ms, view.timezone).slice(0, 10);
    return `${view.meter}_${day(view.startMs)}_${day(view.endMs)}_${view.window}.${ext}`;
  }

  // ---- the customer page -------------------------------------------------------------

  async function renderCustomer(current) {
    $("usage-view").hidden = true;
    const all = await meters();
    if (!current()) return;
    fillMeterSelect(all);
    const s = state;
    const customer = s.customer || boundCustomer || "";
    $("customer-view").hidden = false;
    if (!customer) {
      await fillCustomerList(all, current);
      showStatus("empty", "Pick a customer", "Type a customer id above (the list offers the busiest ones), " +
        "or open one from the Usage table.");
      $("customer-meters").replaceChildren();
      $("customer-limits").replaceChildren();
      $("customer-alerts").replaceChildren();
      $("customer-corrections").replaceChildren();
      $("customer-traits").replaceChildren();
      $("customer-title").textContent = "Customer";
      finished("empty");
      return;
    }
    const [startMs, endMs] = resolveRange(s, Date.now());
    const windows = windowStarts(startMs, endMs, s.window, s.tz);
    if (windows.length > MAX_POINTS) {
      showStatus("refused", "Too many points for one view", `Each meter's chart would draw ${estimatedWindows(startMs, endMs, s.window).toLocaleString("en-US")} points, ` +
        `over the ${MAX_POINTS.toLocaleString("en-US")}-point limit. Pick a coarser window or a shorter range.`);
      finished("refused");
      return;
    }
    $("customer-title").textContent = `Customer ${customer}`;
    $("customer-note").textContent = `${formatRange(startMs, endMs, s.tz)} · by ${s.window} · ${s.tz}`;
    const filter = { customer_id: [customer] };
    const [usages, limits, alerts, record, corrections] = await Promise.all([
      Promise.all(all.map(async (m) => {
        const body = { meterApiName: m.name, startMs, endMs, timezone: s.tz, groupBy: [], filter };
        const [series, whole] = await Promise.all([query({ ...body, window: s.window }), query({ ...body, window: null })]);
        return { meter: m, rows: series.data.rows, total: whole.data.rows[0]?.value ?? null };
      })),
      api("GET", `/api/customers/${encodeURIComponent(customer)}/limits`).then((a) => a.data),
      customerAlerts(customer),
      // The registry record (Amberflo's shape; {} when only usage knows the customer).
      api("GET", `/customers/${encodeURIComponent(customer)}`).then((a) => a.data, () => null),
      // Its corrections (and those of every customer), oldest first; null if unreadable.
      api("GET", `/api/corrections?customerId=${encodeURIComponent(customer)}`)
        .then((a) => a.data.corrections, () => null),
    ]);
    if (!current()) return;
    clearStatus();
    const cards = [];
    const used = usages.filter((u) => u.rows.length);
    for (const usage of used) {
      const total = usage.total;
      const holder = el("div", { class: "mini-chart" });
      const card = el("div", { class: "meter-card", "data-meter": usage.meter.name, "data-total": total ?? "" },
        el("div", { class: "card-head" }, el("h2", { text: usage.meter.name }),
          el("span", { class: "muted", text: `${usage.meter.aggregation} over the range` }), el("span", { class: "spacer" }),
          boundCustomer ? null : el("a", { href: "/" + stateQuery({ ...s, view: "usage", meter: usage.meter.name, filters: [["customer_id", customer]] }), text: "explore →" })),
        el("div", { class: "total", text: total === null ? "" : formatExact(total) }), holder);
      cards.push([card, holder, usage]);
    }
    $("customer-meters").replaceChildren(...cards.map(([card]) => card));
    if (!cards.length) {
      $("customer-meters").replaceChildren(el("p", { class: "muted", text: `No usage by ${customer} in this range.` }));
    }
    for (const [, holder, usage] of cards) {
      const index = new Map(windows.map((t, i) => [t, i]));
      const values = windows.map(() => null);
      for (const row of usage.rows) if (index.has(row.windowStartMs)) values[index.get(row.windowStartMs)] = row.value;
      const kind = ADDITIVE.has(usage.meter.aggregation) ? "bars" : "lines";
      makeChart(holder, windows, [{ label: usage.meter.name, values, colour: PALETTE[0] }], kind, s.window, s.tz, 140, false);
    }
    renderTraits(record);
    renderLimits(limits);
    renderCustomerAlerts(alerts);
    renderCorrections(corrections);
    window.explorer.customer = { customer, usages: usages.map((u) => ({ meter: u.meter.name, rows: u.rows, total: u.total })), limits, alerts, corrections };
    document.dispatchEvent(new CustomEvent("explorer:customer", { detail: { customer } }));  // explorer-pricing.js
    finished(cards.length ? "ready" : "empty");
  }

  function renderLimits(answer) {
    const box = $("customer-limits");
    if (!answer.limits.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No limit applies to this customer." }));
      return;
    }
    box.replaceChildren(...answer.limits.map((status) => {
      const thresholds = status.thresholds;
      const top = Math.max(Number(thresholds[thresholds.length - 1] || 0), Number(status.usage)) || 1;
      const reached = new Set(status.reached);
      const over = status.reached.length > 0;
      const percent = (v) => Math.min(100, (Number(v) / top) * 100);
      // The engine's Limit leaves its defaults out: period "day", time zone UTC.
      const periodName = status.limit.period || "day";
      const period = periodName === "total" ? "all time"
        : `${periodName}: ${formatRange(status.periodStartMs, status.periodEndMs, status.limit.timezone || "UTC")}`;
      return el("div", { class: "limit" + (over ? " over" : ""), "data-limit": status.limit.id, "data-usage": status.usage },
        el("div", {}, el("strong", { text: status.limit.id }), el("div", { class: "muted", text: `${status.limit.meterApiName ?? "invoice total"} · ${period}` })),
        el("div", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(top), "aria-valuenow": String(Number(status.usage)),
          "aria-label": `${status.limit.id}: ${status.usage} used` },
          el("div", { class: "fill", style: `width:${percent(status.usage)}%` }),
          ...thresholds.map((t) => el("div", { class: "mark" + (reached.has(t) ? " reached" : ""), style: `left:calc(${percent(t)}% - 1px)`, title: `threshold ${t}` }))),
        el("div", { class: "num" }, el("strong", { text: formatExact(status.usage) }),
          el("span", { class: "muted", text: ` of ${formatExact(thresholds[thresholds.length - 1])}` })),
        el("div", { class: "marks-legend", text: "thresholds: " + thresholds.map((t) => (reached.has(t) ? "✔ " : "") + formatExact(t)).join(" · ") }));
    }));
  }

  // The customer's name and traits, which queries group and filter by as customer.NAME.
  function renderTraits(record) {
    const box = $("customer-traits");
    const traits = Object.entries((record && record.traits) || {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    const parts = [];
    if (record && record.customerName) parts.push(el("strong", { class: "customer-name", text: record.customerName }));
    for (const [key, value] of traits) {
      parts.push(el("span", { class: "trait", "data-trait": key, "data-value": value, title: `customer.${key}`, text: `${key}: ${value}` }));
    }
    if (!traits.length) parts.push(el("span", { class: "muted", text: "No traits." }));
    box.replaceChildren(...parts);
  }

  // The alerts this customer received: /alerts pages from seq 0 (a customer-bound key
  // gets only its own). Bounded: at most ALERT_PAGES pages are read, newest shown first.
  const ALERT_PAGES = 10;
  async function customerAlerts(customer) {
    const found = [];
    let fromSeq = 0;
    for (let page = 0; page < ALERT_PAGES; page++) {
      const answer = (await api("GET", `/alerts?fromSeq=${fromSeq}&limit=1000`)).data;
      found.push(...answer.alerts.filter((a) => a.customerId === customer));
      if (answer.nextSeq === fromSeq) break;
      fromSeq = answer.nextSeq;
      if (!answer.alerts.length && page > 0) break;
    }
    return found.reverse();
  }
  function alertItem(alert) {
    return el("li", { "data-seq": String(alert.seq) },
      el("span", { class: "when", text: formatInstant(alert.crossedAtMs, state.tz) }),
      el("strong", { text: alert.customerId }), ` crossed ${formatExact(alert.threshold)} on `,
      el("strong", { text: alert.meterApiName ?? "invoice total" }), ` (limit ${alert.limitId}, value ${formatExact(alert.value)})`);
  }
  function renderCustomerAlerts(alerts) {
    const box = $("customer-alerts");
    if (!alerts.length) { box.replaceChildren(el("p", { class: "muted", text: "No alert so far." })); return; }
    box.replaceChildren(el("ol", { class: "alerts" }, ...alerts.slice(0, 50).map(alertItem)));
  }

  // The corrections made for this customer (GET /api/corrections), newest first: who, when,
  // what. The record names its target in one line (``description``: "start_ms=… end_ms=…
  // region in ['eu']"); the times in it are shown as dates in the page's zone, and the
  // line itself is the row's tooltip.
  const CORRECTION_PAGE = 50;
  function correctionTarget(correction) {
    const text = correction.description || "";
    const number = (name) => { const m = new RegExp(`(?:^| )${name}=(\\d+)`).exec(text); return m ? +m[1] : null; };
    const parts = [];
    const start = number("start_ms"), end = number("end_ms");
    if (start !== null && end !== null) parts.push(formatRange(start, end, state.tz));
    const receivedStart = number("received_start_ms"), receivedEnd = number("received_end_ms");
    if (receivedStart !== null || receivedEnd !== null) {
      parts.push("received " + (receivedStart === null ? "…" : formatInstant(receivedStart, state.tz)) +
        " – " + (receivedEnd === null ? "…" : formatInstant(receivedEnd, state.tz)));
    }
    for (const m of text.matchAll(/(\S+) in \[([^\]]*)\]/g)) parts.push(`${m[1]}: ${m[2].replace(/'/g, "")}`);
    const ids = /(?:^| )unique_ids=(\S+)/.exec(text);
    if (ids) parts.push(ids[1].split(",").length === 1 ? `id ${ids[1]}` : `ids ${ids[1].split(",").join(", ")}`);
    return parts.length ? parts.join(" · ") : text;
  }
  function correctionWhat(correction) {
    const events = (n) => `${formatExact(String(n))} event${n === 1 ? "" : "s"}`;
    if (correction.kind === "amend" && correction.amended) {
      const a = correction.amended;
      return `amended ${events(correction.cancelled)}: now ${formatExact(a.meterValue)} at ${formatInstant(a.meterTimeInMillis, state.tz)}`;
    }
    return `cancelled ${events(correction.cancelled)}`;
  }
  function renderCorrections(corrections) {
    const box = $("customer-corrections");
    if (corrections === null) { box.replaceChildren(el("p", { class: "muted", text: "The corrections could not be read." })); return; }
    if (!corrections.length) { box.replaceChildren(el("p", { class: "muted", text: "No correction so far." })); return; }
    const newest = corrections.slice().reverse().slice(0, CORRECTION_PAGE);
    const head = el("tr", {}, ...["When", "Who", "What", "Meter", "Which events"].map((t) => el("th", { text: t })));
    const rows = newest.map((c) => el("tr", { "data-lsn": String(c.lsn), "data-kind": c.kind, title: c.description },
      el("td", { class: "when", text: formatInstant(c.receivedMs, state.tz) }),
      el("td", { text: c.by || "–" }),
      el("td", { class: "what", text: correctionWhat(c) + (c.customerId === null ? " (all customers)" : "") }),
      el("td", { text: c.meterApiName }),
      el("td", { class: "target", text: correctionTarget(c) })));
    const parts = [el("div", { class: "table-wrap" }, el("table", { class: "data corrections" }, el("thead", {}, head), el("tbody", {}, ...rows)))];
    if (corrections.length > CORRECTION_PAGE) {
      parts.push(el("p", { class: "muted", text: `The ${CORRECTION_PAGE} newest of ${corrections.length} corrections.` }));
    }
    box.replaceChildren(...parts);
  }

  async function fillCustomerList(all, current) {
    if (!all.length) return;
    const meter = all.find((m) => m.name === state.meter) || all[0];
    const [startMs, endMs] = resolveRange({ ...state, range: "30d" }, Date.now());
    const answer = await query({ meterApiName: meter.name, startMs, endMs, window: null, timezone: state.tz,
      groupBy: ["customer_id"], take: { limit: 50 } });
    if (!current()) return;
    $("customer-list").replaceChildren(...answer.data.rows.map((r) => el("option", { value: r.group.customer_id })));
  }

  // ---- live: the ingest rate and the latest alerts, pushed by the server --------------

  let boundCustomer = null;
  let streams = [];
  let lastAccepted = null;
  let liveRefreshPending = false;

  async function streamToken() {
    const answer = (await api("POST", "/api/stream-token")).data;
    try {
      // The claims are [scopes, customerId, expiresMs] (engine/http/tokens.py).
      const claims = JSON.parse(atob(answer.token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/")));
      return { token: answer.token, scopes: claims[0], customer: claims[1] };
    } catch {
      return { token: answer.token, scopes: [], customer: null };
    }
  }
  function restartStreams() {
    for (const stream of streams) stream.close();
    streams = [];
    startStreams();
  }
  async function startStreams(attempt = 0) {
    let token;
    try { token = await streamToken(); } catch { return retryStreams(attempt); }
    if (token.customer && boundCustomer !== token.customer) {
      boundCustomer = token.customer;
      document.documentElement.dataset.customer = boundCustomer;
      $("tab-usage").hidden = true;
      $("customer-field").hidden = true;
      if (state.view !== "customer" || state.customer !== boundCustomer) {
        navigate({ view: "customer", customer: boundCustomer }, { push: false });
      }
    }
    const open = (path, handlers) => {
      const source = new EventSource(`${path}?token=${encodeURIComponent(token.token)}`);
      for (const [name, handler] of Object.entries(handlers)) source.addEventListener(name, handler);
      source.onerror = () => {
        // A token opens a stream once; on any error close both and come back with a new one.
        for (const other of streams) other.close();
        streams = [];
        liveOff();
        retryStreams(attempt + 1);
      };
      streams.push(source);
    };
    if (token.scopes.includes("admin")) {
      open("/api/stats/stream", { stats: onStats, open: () => $("live").classList.add("on") });
    } else {
      $("rate").textContent = "live rate needs an admin key";
    }
    open("/alerts/stream", { alert: onAlert });
  }
  function retryStreams(attempt) {
    const waitMs = Math.min(30000, 1000 * 2 ** Math.min(attempt, 5));
    setTimeout(() => { if (!streams.length) startStreams(attempt); }, waitMs);
  }
  function liveOff() {
    $("live").classList.remove("on");
    $("rate").textContent = "reconnecting…";
  }
  function onStats(event) {
    const stats = JSON.parse(event.data);
    $("live").classList.add("on");
    $("rate").textContent = `${formatCompact(stats.eventsPerSecond)} events/s`;
    $("live").dataset.accepted = String(stats.eventsAccepted);
    if (lastAccepted !== null && stats.eventsAccepted !== lastAccepted) liveRefresh();
    lastAccepted = stats.eventsAccepted;
  }
  // New events: redraw the view if it shows the current period (it ends after now).
  function liveRefresh() {
    const [, endMs] = resolveRange(state, Date.now());
    if (endMs <= Date.now() - WINDOW_MS[state.window] || liveRefreshPending) return;
    if (document.documentElement.dataset.busy === "1") return;
    liveRefreshPending = true;
    metersCache = null; // a meter defined since: the picker shows it
    queryCache.clear();
    dimensionsCache.clear();
    render().finally(() => { liveRefreshPending = false; });
  }
  function onAlert(event) {
    const alert = parseExactArrays(event.data);
    const list = $("live-alerts");
    list.querySelector(".empty")?.remove();
    list.prepend(alertItem(alert));
    while (list.children.length > 20) list.lastElementChild.remove();
    if (state.view === "customer" && (state.customer || boundCustomer) === alert.customerId) liveRefresh();
  }

  // ---- controls ------------------------------------------------------------------------

  function fillMeterSelect(all) {
    const select = $("meter");
    const names = all.map((m) => m.name);
    if (select.dataset.names !== names.join("\n")) {
      select.replaceChildren(...all.map((m) => el("option", { value: m.name, text: m.name })));
      select.dataset.names = names.join("\n");
    }
    select.value = state.meter && names.includes(state.meter) ? state.meter : names[0] || "";
  }

  function fillGroupAndFilterControls(meter, dims) {
    const keys = ["customer_id", ...Object.keys(dims).filter((k) => k !== "customer_id").sort()];
    for (const k of state.group) if (!keys.includes(k)) keys.push(k);
    const box = $("group-by");
    const legend = box.querySelector("legend");
    box.replaceChildren(legend, ...keys.map((k) => el("label", {},
      el("input", { type: "checkbox", value: k, checked: state.group.includes(k), "data-group-key": k,
        onchange: () => {
          const group = [...box.querySelectorAll("input:checked")].map((i) => i.value);
          navigate({ group });
        } }), keyTitle(k))));
    const filterKey = $("filter-key");
    const chosen = filterKey.value;
    filterKey.replaceChildren(...keys.map((k) => el("option", { value: k, text: keyTitle(k) })));
    filterKey.value = keys.includes(chosen) ? chosen : keys[0];
    filterKey.dataset.values = JSON.stringify(dims);
    fillFilterValues();
    $("filter-chips").replaceChildren(...state.filters.map(([k, v], i) => el("span", { class: "chip", "data-filter": `${k}:${v}` },
      `${keyTitle(k)} = ${v}`,
      el("button", { type: "button", "aria-label": `Remove filter ${keyTitle(k)} = ${v}`, text: "×",
        onclick: () => navigate({ filters: state.filters.filter((_, j) => j !== i) }) }))));
  }
  function fillFilterValues() {
    const dims = JSON.parse($("filter-key").dataset.values || "{}");
    const values = dims[$("filter-key").value] || [];
    $("filter-values").replaceChildren(...values.map((v) => el("option", { value: v })));
  }

  function syncControls() {
    const s = state;
    $("range").value = s.range;
    $("custom-range").hidden = s.range !== "custom";
    if (s.range === "custom") {
      const [a, b] = resolveRange(s, Date.now());
      $("from").value = s.from || localText(a, s.tz);
      $("to").value = s.to || localText(b, s.tz);
    }
    $("window").value = s.window;
    $("tz").value = s.tz;
    $("top").value = String(s.top);
    if (s.chart) $("chart-kind").value = s.chart;
    $("customer").value = s.customer;
    $("customer-field").hidden = s.view !== "customer" || !!boundCustomer;
    $("usage-controls").hidden = s.view !== "usage";
    $("meter-field").hidden = s.view !== "usage"; // the customer page shows every meter
    $("tab-usage").setAttribute("aria-current", s.view === "usage" ? "page" : "false");
    $("tab-customer").setAttribute("aria-current", s.view === "customer" ? "page" : "false");
    $("tab-usage").href = "/" + stateQuery({ ...s, view: "usage" });
    $("tab-customer").href = "/" + stateQuery({ ...s, view: "customer" });
    $("key-button").hidden = !apiKey;
  }

  function wireControls() {
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    $("meter").addEventListener("change", (e) => navigate({ meter: e.target.value, filters: [] }));
    $("range").addEventListener("change", (e) => {
      const range = e.target.value;
      const change = { range, window: RANGE_WINDOW[range] };
      if (range === "custom") {
        const [a, b] = resolveRange(state, Date.now());
        Object.assign(change, { from: localText(a, state.tz), to: localText(b, state.tz), window: state.window });
      }
      navigate(change);
    });
    const customChanged = () => {
      if ($("from").value && $("to").value) navigate({ from: $("from").value.slice(0, 16), to: $("to").value.slice(0, 16) });
    };
    $("from").addEventListener("change", customChanged);
    $("to").addEventListener("change", customChanged);
    $("window").addEventListener("change", (e) => navigate({ window: e.target.value }));
    $("tz").addEventListener("change", (e) => {
      const tz = e.target.value.trim();
      if (validZone(tz)) navigate({ tz });
      else { e.target.setCustomValidity("Not a time zone"); e.target.reportValidity(); e.target.value = state.tz; }
    });
    $("tz").addEventListener("input", (e) => e.target.setCustomValidity(""));
    $("top").addEventListener("change", (e) => {
      const top = Math.min(50, Math.max(1, parseInt(e.target.value, 10) || 10));
      navigate({ top });
    });
    $("chart-kind").addEventListener("change", (e) => navigate({ chart: e.target.value }));
    $("filter-key").addEventListener("change", fillFilterValues);
    const addFilter = () => {
      const key = $("filter-key").value;
      const value = $("filter-value").value.trim();
      if (!key || !value) return;
      $("filter-value").value = "";
      if (!state.filters.some(([k, v]) => k === key && v === value)) navigate({ filters: [...state.filters, [key, value]] });
    };
    $("filter-add").addEventListener("click", addFilter);
    $("filter-value").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addFilter(); } });
    $("customer").addEventListener("change", (e) => navigate({ customer: e.target.value.trim() }));
    $("page-prev").addEventListener("click", () => navigate({ page: Math.max(0, state.page - 1) }));
    $("page-next").addEventListener("click", () => navigate({ page: state.page + 1 }));
    for (const [id, kind] of [["tab-usage", "usage"], ["tab-customer", "customer"]]) {
      $(id).addEventListener("click", (e) => { e.preventDefault(); navigate({ view: kind }); });
    }
    $("brand").addEventListener("click", (e) => { e.preventDefault(); history.pushState(null, "", "/"); state = readState(); render(); });
    $("download-csv").addEventListener("click", () => lastView && download(viewFileName(lastView, "csv"), "text/csv", viewCsv(lastView)));
    $("download-json").addEventListener("click", () => lastView && download(viewFileName(lastView, "json"), "application/json", viewJson(lastView)));
    $("key-button").addEventListener("click", () => askForKey("").then(() => { restartStreams(); render(); }));
    addEventListener("popstate", () => { state = readState(); render(); });
    const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
    $("tz-list").replaceChildren(...["UTC", ...zones].map((z) => el("option", { value: z })));
  }

  window.explorer = { get state() { return state; }, chart: null, view: null, customer: null, api,
    csv: () => (lastView ? viewCsv(lastView) : ""), json: () => (lastView ? viewJson(lastView) : "") };
  wireControls();
  if (!validZone(state.tz)) state.tz = "UTC";
  render();
  startStreams();
})();
