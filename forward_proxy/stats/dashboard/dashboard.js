// The cache dashboard: polls the admin listener's /stats and /stats/history and draws them.
// Self-contained on purpose (no libraries, no external URL): the charts are hand-made SVG.
"use strict";

const POLL_MILLISECONDS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
// [field, label, colour, value]: a PARTIAL answer also counts in `misses`, so the miss bar leaves it
// out and the bars add up to the requests (as the decisions of /metrics do).
const DECISIONS = [
  ["hits", "hit", "--hit", (r) => r.hits],
  ["misses", "miss", "--miss", (r) => r.misses - r.partials],
  ["partials", "partial", "--partial", (r) => r.partials],
  ["bypasses", "bypass", "--bypass", (r) => r.bypasses],
  ["refreshes", "refresh", "--refresh", (r) => r.refreshes],
  ["coalesced", "coalesced", "--coalesced", (r) => r.coalesced],
  ["stale", "stale", "--stale", (r) => r.stale],
];
const TOP_ROUTES = 12;

// ---- formatting -------------------------------------------------------------------------------

function formatCount(n) {
  return Number(n).toLocaleString("en-US");
}

function formatPercent(ratio) {
  return (ratio * 100).toFixed(1) + "%";
}

function formatSeconds(s) {
  if (s === 0) return "0 s";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function formatBytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return value.toFixed(1) + " " + units[unit];
}

function formatDuration(seconds) {
  let rest = Math.floor(seconds);
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    const amount = Math.floor(rest / size);
    rest -= amount * size;
    if (amount || (unit === "s" && parts.length === 0)) parts.push(amount + unit);
  }
  return parts.slice(0, 2).join(" ");
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function formatClock(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
}

function formatDate(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + formatClock(epochSeconds);
}

// A round top for an axis with four grid steps: four times a 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 step.
function niceCeiling(value) {
  const step = value / 4;
  const power = Math.pow(10, Math.floor(Math.log10(step)));
  for (const factor of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
    if (factor * power >= step) return 4 * factor * power;
  }
  return 40 * power;
}

// ---- tiny DOM and SVG helpers -----------------------------------------------------------------

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function svgElement(name, attributes, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function cssColor(variable) {
  return getComputedStyle(document.documentElement).getPropertyValue(variable).trim();
}

function viewBox(svg) {
  const [, , width, height] = svg.getAttribute("viewBox").split(" ").map(Number);
  return { width, height };
}

function placeholder(svg, message) {
  const { width, height } = viewBox(svg);
  svg.appendChild(
    svgElement("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "placeholder" }, message),
  );
}

// ---- the cards, the events and the routes -----------------------------------------------------

function renderSummary(report) {
  setText("since", "counting since " + formatDate(report.started_at) +
    " (" + formatDuration(report.elapsed_seconds) + ")");

  setText("kpi-requests", formatCount(report.requests));
  // With batches answered row by row, the partials (among the misses) say more than the bypasses.
  const second = report.partials ? plural(report.partials, "partial", "partial") : plural(report.bypasses, "bypass", "bypasses");
  setText("kpi-requests-detail", plural(report.misses, "miss", "misses") + " · " + second);

  setText("kpi-hit-ratio", formatPercent(report.hit_ratio));
  setText("kpi-hits-detail", plural(report.hits, "hit", "hits") + " of " + formatCount(report.requests));

  setText("kpi-saved", formatSeconds(report.upstream_seconds_saved));
  setText("kpi-saved-detail", formatSeconds(report.upstream_seconds) + " spent upstream");
  // Only once a completion was answered from the cache: a cache of embeddings alone never shows it.
  setText("kpi-tokens-saved", report.completion_tokens_saved
    ? plural(report.completion_tokens_saved, "token", "tokens") + " not generated again"
    : "\u00a0");

  setText("kpi-bytes", formatBytes(report.bytes_served_from_cache));
  setText("kpi-bytes-detail", plural(report.hits + report.stale, "answer", "answers") + " from the store");

  if (report.rows === 0) {
    setText("kpi-rows", "–");
    setText("kpi-rows-detail", "no batch answered row by row yet");
  } else {
    setText("kpi-rows", formatPercent(report.row_hit_ratio));
    setText("kpi-rows-detail", formatCount(report.rows_from_cache) + " of " + plural(report.rows, "batch row", "batch rows"));
  }

  setText("kpi-fill", formatBytes(report.size_bytes));
  const bar = document.getElementById("fill-bar");
  if (report.limit_bytes === null) {
    bar.style.width = "0";
    setText("kpi-fill-detail", plural(report.entries, "entry", "entries") + " · no size limit");
  } else {
    bar.style.width = Math.min(100, report.fill_ratio * 100).toFixed(1) + "%";
    bar.classList.toggle("full", report.fill_ratio > 0.9);
    setText("kpi-fill-detail", plural(report.entries, "entry", "entries") + " · " + formatPercent(report.fill_ratio) +
      " of " + formatBytes(report.limit_bytes));
  }

  setText("event-stores", formatCount(report.stores));
  setText("event-store-errors", formatCount(report.store_errors));
  setText("event-evictions", formatCount(report.evictions));
  setText("event-upstream-errors", formatCount(report.upstream_errors));
  setText("event-upstream-seconds", formatSeconds(report.upstream_seconds));
  for (const id of ["event-store-errors", "event-upstream-errors"]) {
    const cell = document.getElementById(id);
    cell.classList.toggle("bad", cell.textContent !== "0");
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function renderRoutes(report) {
  const body = document.getElementById("routes-body");
  clear(body);
  const routes = report.routes.filter((r) => r.origin || r.route).slice(0, TOP_ROUTES);
  if (routes.length === 0) {
    const row = body.insertRow();
    cell(row, "no request has matched a cache rule yet", "empty").colSpan = 11;
    return;
  }
  for (const route of routes) {
    const row = body.insertRow();
    row.dataset.route = route.route;
    cell(row, route.origin, "text");
    cell(row, route.route, "text route");
    cell(row, route.model || "–", "text");
    cell(row, formatCount(route.requests), "requests");
    cell(row, formatCount(route.hits), "hits");
    cell(row, formatCount(route.misses), "misses");
    cell(row, formatCount(route.requests - route.hits - route.misses), "other");
    const ratio = cell(row, "", "text");
    ratio.innerHTML =
      '<div class="ratio"><div class="ratio-track"><div class="ratio-fill"></div></div><span class="ratio-text"></span></div>';
    ratio.querySelector(".ratio-fill").style.width = (route.hit_ratio * 100).toFixed(1) + "%";
    ratio.querySelector(".ratio-text").textContent = formatPercent(route.hit_ratio);
    cell(row, formatSeconds(route.upstream_seconds_saved), "saved");
    cell(row, route.rows ? formatCount(route.rows_from_cache) + "/" + formatCount(route.rows) : "–", "rows");
    cell(row, route.completion_tokens_saved ? formatCount(route.completion_tokens_saved) : "–", "tokens");
  }
}

function plural(count, singular, pluralForm) {
  return formatCount(count) + " " + (count === 1 ? singular : pluralForm);
}

// ---- charts -----------------------------------------------------------------------------------

function renderDecisions(report) {
  const svg = document.getElementById("chart-decisions");
  clear(svg);
  const { width } = viewBox(svg);
  const values = DECISIONS.map(([, , , value]) => value(report));
  const largest = Math.max(1, ...values);
  const left = 86;
  const right = 54;
  DECISIONS.forEach(([field, label, color], index) => {
    const y = 6 + index * 25;
    const length = ((width - left - right) * values[index]) / largest;
    svg.appendChild(svgElement("text", { x: left - 10, y: y + 13, "text-anchor": "end", class: "bar-label" }, label));
    svg.appendChild(svgElement("rect", { x: left, y, width: width - left - right, height: 18, rx: 3, fill: cssColor("--line") }));
    svg.appendChild(svgElement("rect", { x: left, y, width: Math.max(length, 0), height: 18, rx: 3, fill: cssColor(color) }));
    svg.appendChild(
      svgElement("text", { x: width - right + 8, y: y + 13, class: "bar-value", id: "decision-" + field, "data-decision": field }, formatCount(values[index])),
    );
  });
}

// A time axis and a value axis inside the SVG's viewBox; returns the scale functions.
function axes(svg, samples, maximum, formatValue) {
  const { width, height } = viewBox(svg);
  const margin = { left: 52, right: 14, top: 12, bottom: 26 };
  const t0 = samples[0].time;
  const t1 = Math.max(samples[samples.length - 1].time, t0 + 1);
  const x = (t) => margin.left + ((t - t0) / (t1 - t0)) * (width - margin.left - margin.right);
  const y = (v) => height - margin.bottom - (v / maximum) * (height - margin.top - margin.bottom);
  for (let step = 0; step <= 4; step += 1) {
    const value = (maximum * step) / 4;
    svg.appendChild(svgElement("line", { x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value), class: "grid" }));
    svg.appendChild(svgElement("text", { x: margin.left - 8, y: y(value) + 4, "text-anchor": "end" }, formatValue(value)));
  }
  for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
    svg.appendChild(svgElement("text", { x: x(t), y: height - 8, "text-anchor": anchor }, formatClock(t)));
  }
  return { x, y };
}

// Points to an SVG path, with a gap wherever a value is null.
function pathOf(points) {
  let d = "";
  let drawing = false;
  for (const [px, py] of points) {
    if (py === null) {
      drawing = false;
      continue;
    }
    d += (drawing ? "L" : "M") + px.toFixed(1) + "," + py.toFixed(1);
    drawing = true;
  }
  return d;
}

// A dot on every point that has no drawn neighbour (a line needs two), so a lone value still shows.
function dotsOf(svg, points, className) {
  points.forEach(([px, py], i) => {
    const before = i > 0 && points[i - 1][1] !== null;
    const after = i < points.length - 1 && points[i + 1][1] !== null;
    if (py !== null && !before && !after) {
      svg.appendChild(svgElement("circle", { cx: px.toFixed(1), cy: py.toFixed(1), r: 3.5, class: className }));
    }
  });
}

function renderRatioChart(samples) {
  const svg = document.getElementById("chart-ratio");
  clear(svg);
  if (samples.length < 2) {
    placeholder(svg, "collecting samples…");
    return;
  }
  const { x, y } = axes(svg, samples, 1, (v) => Math.round(v * 100) + "%");
  const total = samples.map((s) => [x(s.time), s.requests > 0 ? y(s.hits / s.requests) : null]);
  const windowed = samples.map((s, i) => {
    if (i === 0) return [x(s.time), null];
    const requests = s.requests - samples[i - 1].requests;
    const hits = s.hits - samples[i - 1].hits;
    return [x(s.time), requests > 0 && hits >= 0 ? y(hits / requests) : null];
  });
  svg.appendChild(svgElement("path", { d: pathOf(windowed), class: "line-window" }));
  svg.appendChild(svgElement("path", { d: pathOf(total), class: "line-total" }));
  dotsOf(svg, windowed, "dot-window");
  dotsOf(svg, total, "dot-total");
}

function renderSavedChart(samples) {
  const svg = document.getElementById("chart-saved");
  clear(svg);
  if (samples.length < 2) {
    placeholder(svg, "collecting samples…");
    return;
  }
  const largest = Math.max(...samples.map((s) => s.upstream_seconds_saved));
  const { x, y } = axes(svg, samples, largest > 0 ? niceCeiling(largest) : 1, (v) => +v.toPrecision(3) + " s");
  const line = samples.map((s) => [x(s.time), y(s.upstream_seconds_saved)]);
  const first = line[0];
  const last = line[line.length - 1];
  const area = pathOf(line) + "L" + last[0].toFixed(1) + "," + y(0).toFixed(1) + "L" + first[0].toFixed(1) + "," + y(0).toFixed(1) + "Z";
  svg.appendChild(svgElement("path", { d: area, class: "area-saved" }));
}

// ---- polling ----------------------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response.json();
}

function setConnection(state, text) {
  const pill = document.getElementById("connection");
  pill.className = "pill pill-" + state;
  pill.textContent = text;
}

async function refresh() {
  try {
    const [report, history] = await Promise.all([getJson("stats"), getJson("stats/history")]);
    renderSummary(report);
    renderDecisions(report);
    renderRoutes(report);
    renderRatioChart(history.samples);
    renderSavedChart(history.samples);
    setConnection("live", "live · " + formatClock(report.generated_at));
  } catch (error) {
    setConnection("down", "no answer from the proxy");
    console.error(error);
  } finally {
    setTimeout(refresh, POLL_MILLISECONDS);
  }
}

refresh();
