// The autoresearch dashboard: polls the JSON endpoints of the local server every 2 s and draws the
// trial table, the progress plot, the current trial's loss curve and, where the run has several trial
// slots, what each slot runs. Plain JS and SVG: no library,
// no CDN, nothing leaves 127.0.0.1.
"use strict";

const POLL_MS = 2000;
const BAND_SIGMAS = 2;
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = { baseline: "#1f77b4", keep: "#2ca02c", discard: "#9e9e9e", crash: "#d62728", rerun: "#7f7f7f",
                 drift: "#9467bd", confirm: "#9467bd", ablation: "#8c564b", running: "#ff9800" };
// Runs that decide nothing by themselves (reruns, the best or the baseline again, ablations): hollow markers.
const HOLLOW = new Set(["rerun", "drift", "confirm", "ablation"]);

const state = { trialsStamp: null, trials: [], summary: null, current: null, slots: null, seen: new Set(),
                first: true, detailId: null };

// --- small helpers -------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
function el(tag, attrs, parent, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function h(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}
// MFU as people read it: a CPU has no peak to measure against, and 0 is what a trainer prints when it
// does not know its device's peak; neither is a utilisation.
const mfuText = (v, onCpu) => (onCpu || typeof v !== "number" || !isFinite(v) || v <= 0 ? "n/a" : v.toFixed(1) + "%");
// Statuses that ended without a decision: their row shows why.
const EXPLAINED = new Set(["crash", "stopped", "lost", "empty", "superseded"]);
const isRunning = (t) => t.status === "running" && !t.stale;  // a row a dead lab left is not running
const fmt = (v, d = 6) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
const signed = (v, d = 6) => (v === null || v === undefined ? "" : (v >= 0 ? "+" : "") + Number(v).toFixed(d));
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(12));
  return ticks;
}
// Ticks for an axis of whole numbers (steps, trial numbers): a whole stride of at least 1, so that no
// two ticks round to the same label.
function integerTicks(lo, hi, count) {
  lo = Math.ceil(lo); hi = Math.floor(hi);
  if (!(hi > lo)) return [lo];
  const raw = Math.max(1, (hi - lo) / Math.max(1, count));
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const stride = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / stride) * stride; t <= hi; t += stride) ticks.push(t);
  return ticks;
}
function decimalsFor(ticks) {
  if (ticks.length < 2) return 3;
  const step = Math.abs(ticks[1] - ticks[0]);
  return Math.min(6, Math.max(0, -Math.floor(Math.log10(step)) + 1));
}
function sizeOf(svg) {
  const r = svg.getBoundingClientRect();
  const w = Math.max(300, Math.round(r.width)), hgt = Math.max(150, Math.round(r.height));
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  return [w, hgt];
}
function emptyChart(svg, w, hgt, message) {
  el("text", { x: w / 2, y: hgt / 2, "text-anchor": "middle", class: "empty" }, svg, message);
}

// --- fetching --------------------------------------------------------------------------------------
async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response.json();
}

async function poll() {
  try {
    const [trials, current, slots] = await Promise.all([getJSON("/api/trials"), getJSON("/api/current"),
                                                        getJSON("/api/slots")]);
    if (trials.error) throw new Error(trials.error);
    state.now = trials.now;
    if (trials.stamp !== state.trialsStamp) {
      state.trialsStamp = trials.stamp;
      state.trials = trials.trials;
      state.summary = trials.summary;
      state.workspace = trials.workspace;
      renderHeader();
      renderCards();
      renderTable();
      renderProgress();
    } else if (state.trials.some(isRunning)) {
      renderTable();  // the running trial's clock
    }
    if (trials.stale) throw new Error(trials.stale);
    state.current = current;
    state.slots = slots;
    renderCurrent();
    renderSlots();
    setLive(...liveness(current, slots));
  } catch (e) {
    setLive("error", "cannot read the run: " + e.message + " (retrying)");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// The header's light: live only while a trial runs. Between trials, or with no loop at all, the run is
// idle; a row that a dead lab left running is named, as the lab will record it when it resumes.
function liveness(c, slots) {
  const at = " · updated " + new Date().toLocaleTimeString();
  const busy = slots.slots.filter((s) => s.state === "running");
  if (busy.length > 1) {
    return ["running", `live · trials ${busy.map((s) => s.trial.id).join(", ")} running in ${busy.length} of ` +
      `${slots.slots.length} slots` + at];
  }
  if (c.running) return ["running", `live · trial ${c.trial.id} running` + at];
  if (c.stale.length) return ["stopped", `no trial running: the lab stopped during trial ${c.stale[c.stale.length - 1]}` + at];
  return ["idle", "idle · no trial running" + at];
}

function setLive(kind, text) {
  $("live").dataset.state = kind;
  $("live-text").textContent = text;
}

// --- header and cards ------------------------------------------------------------------------------
function renderHeader() {
  const w = state.workspace;
  document.title = "autoresearch · " + w.tag;
  $("title").textContent = "autoresearch · " + w.tag;
  $("subtitle").textContent = `${w.root} · branch ${w.branch} · profile ${w.profile}` +
    (w.budget ? ` · budget ${w.budget}s` : "") + (state.summary.hardware ? " · " + state.summary.hardware : "");
  $("ledger-path").textContent = w.ledger;
}

const UNSANDBOXED_NOTE = "unsandboxed: its train.py could read the answers and the lab's files";

function renderCards() {
  const s = state.summary;
  const cards = [];
  const warning = $("unsandboxed");
  warning.hidden = !s.unsandboxed;
  warning.textContent = s.unsandboxed ? "Warning: " + s.unsandboxed : "";
  cards.push(["baseline", fmt(s.baseline_mean), s.baseline_n ? `${s.baseline_n} run(s)` : "not finished yet"]);
  cards.push(["best", fmt(s.best_mean), s.best_commit ? `${s.best_commit.slice(0, 7)} · ${s.best_n} run(s)` : ""]);
  if (s.improvement !== null && s.best_is_baseline === false) {
    cards.push(["improvement", signed(s.improvement), s.improvement_se ?
      `± ${fmt(s.improvement_se)} (${(s.improvement / s.improvement_se).toFixed(1)} SE)` +
      (s.improvement_low !== null ? ` · 95% interval ${signed(s.improvement_low)} to ${signed(s.improvement_high)}` : "")
      : "no noise estimate"]);
  }
  // "noise", not "noise σ": the labels are upper-cased, and an upper-case σ is a sum.
  cards.push(["noise", s.sigma === null ? "σ unknown" : "σ " + fmt(s.sigma), noiseText(s)]);
  cards.push(["trials", String(s.total), s.tally.map(([status, n]) => `${n} ${status}`).join(" · ")]);
  cards.push(["keep rate", s.keep_rate === null ? "-" : Math.round(100 * s.keep_rate) + "%",
              `${s.kept_candidates} of ${s.counted_candidates} candidates`]);
  cards.push(["pace", s.trials_per_hour === null ? "-" : s.trials_per_hour.toFixed(1) + "/h",
              `${s.compute_hours.toFixed(2)} ${s.accelerator}-hours`]);
  const box = $("cards");
  box.replaceChildren(...cards.map(([label, value, sub]) => {
    const card = h("div", { class: "card", "data-card": label });
    card.append(h("div", { class: "label" }, label), h("div", { class: "value" }, value), h("div", { class: "sub" }, sub));
    return card;
  }));
}

// sigma's degrees of freedom, and the smallest gain the rule can see at that noise (as the report says it).
function noiseText(s) {
  const since = s.noise_since ? ` since trial ${s.noise_since}` : "";
  if (s.sigma === null) return `no commit has two runs${since || " yet"}`;
  const base = `${s.sigma_df} df, pooled over every commit run more than once${since}`;
  if (s.detectable_gain === null) return base;
  if (s.detectable_gain === 0) return base + " · the rule keeps any gain that measures lower, lucky seeds included";
  return base + ` · gains under ${Number(s.detectable_gain.toPrecision(4))} are invisible here (kept less than half ` +
    `the time against a best of ${s.detect_against} runs): lengthen the budget or allow more runs`;
}

// --- the trial table -------------------------------------------------------------------------------
function renderTable() {
  const body = $("trials").tBodies[0];
  const rows = [];
  for (const t of [...state.trials].reverse()) {
    const tr = h("tr", { "data-trial-id": t.id, "data-status": t.status });
    if (!state.first && !state.seen.has(t.id)) tr.classList.add("new");
    const delta = h("td", { class: "num delta" + (t.delta > 0 ? " pos" : t.delta < 0 ? " neg" : "") }, signed(t.delta));
    const desc = h("td", {}, t.description);
    const note = t.stale ? "left running by a lab that stopped during it; `autoresearch run` resumes and records it" :
      EXPLAINED.has(t.status) ? (t.failure ? `[${t.failure}] ` : "") + t.reason : (t.why && t.why !== t.kind ? t.why : "");
    const seconds = isRunning(t) && state.now ? state.now - t.started_at : t.stale ? null : t.seconds;
    if (note) desc.append(h("div", { class: "reason" }, note));
    if (t.sandboxed === false) desc.append(h("div", { class: "reason unsandboxed" }, UNSANDBOXED_NOTE));
    const commit = h("td");
    commit.append(h("code", {}, t.commit));
    tr.append(h("td", { class: "num" }, String(t.id)), h("td", {}, t.kind), commit,
              h("td", { class: "status " + t.status }, t.status), h("td", { class: "num" }, fmt(t.val_bpb)), delta,
              h("td", { class: "num" }, duration(seconds)), desc);
    tr.addEventListener("click", () => showDetail(t.id));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  for (const t of state.trials) state.seen.add(t.id);
  state.first = false;
}

async function showDetail(id) {
  state.detailId = id;
  const panel = $("detail");
  panel.hidden = false;
  $("detail-title").textContent = "Trial " + id;
  const body = $("detail-body");
  body.replaceChildren(h("div", { class: "muted" }, "loading…"));
  try {
    const t = await getJSON("/api/trial/" + id);
    const parts = [];
    const facts = [`${t.kind} · ${t.status} · commit ${t.commit || "-"} · proposer ${t.proposer}`,
                   `val_bpb ${fmt(t.val_bpb)}` + (t.seed !== null ? ` · seed ${t.seed}` : "") +
                   (t.num_steps ? ` · ${t.num_steps} steps` : "") + (t.total_tokens_m ? ` · ${t.total_tokens_m}M tokens` : "") +
                   (t.num_steps ? ` · MFU ${mfuText(t.mfu_percent, t.on_cpu)}` : "") +
                   (t.peak_vram_mb ? ` · ${(t.peak_vram_mb / 1024).toFixed(1)} GB peak` : "")];
    parts.push(h("p", {}, t.description));
    for (const f of facts) parts.push(h("div", { class: "muted" }, f));
    if (t.reason) parts.push(h("p", { class: "reason" }, "reason: " + (t.failure ? `[${t.failure}] ` : "") + t.reason));
    if (t.decision && t.decision.why) parts.push(h("p", { class: "reason" }, "decision: " + t.decision.why));
    if (t.diff) parts.push(diffBlock(t.diff));
    if (t.log_tail) {
      parts.push(h("div", { class: "muted" }, "end of train.log"));
      parts.push(h("pre", { class: "log" }, t.log_tail));
    }
    body.replaceChildren(...parts);
    panel.scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (e) {
    body.replaceChildren(h("div", { class: "reason" }, "cannot load trial " + id + ": " + e.message));
  }
}

// One line of text per diff line, as `git diff` prints it: the lines are joined by newlines in the text
// and coloured ones are inline spans (see style.css), so the block reads and copies exactly as the diff.
function diffBlock(diff) {
  const pre = h("pre", { class: "diff" });
  diff.replace(/\n$/, "").split("\n").forEach((line, i) => {
    if (i) pre.append(document.createTextNode("\n"));
    let cls = "";
    if (line.startsWith("+") && !line.startsWith("+++")) cls = "add";
    else if (line.startsWith("-") && !line.startsWith("---")) cls = "del";
    else if (line.startsWith("@@")) cls = "hunk";
    pre.append(cls ? h("span", { class: cls }, line) : document.createTextNode(line));
  });
  return pre;
}

// --- the progress plot -----------------------------------------------------------------------------
function renderProgress() {
  const svg = $("progress-chart");
  const [W, H] = sizeOf(svg);
  const s = state.summary, trials = state.trials;
  const measured = trials.filter((t) => t.val_bpb !== null);
  if (!measured.length) return emptyChart(svg, W, H, trials.length ? "no measured trial yet" : "no trials yet");
  const m = { l: 64, r: 16, t: 12, b: 34 };
  const interesting = measured.filter((t) => t.kind === "baseline" || t.status === "keep").map((t) => t.val_bpb)
    .concat(trials.map((t) => t.running_best).filter((v) => v !== null));
  if (s.sigma && s.baseline_mean !== null) interesting.push(s.baseline_mean - BAND_SIGMAS * s.sigma, s.baseline_mean + BAND_SIGMAS * s.sigma);
  const values = measured.map((t) => t.val_bpb);
  let lo = Math.min(...interesting, ...values), hi = Math.max(...(interesting.length ? interesting : values));
  const span = Math.max(hi - lo, 1e-4, Math.abs(hi) * 1e-4);
  const top = Math.max(hi + 0.15 * span, Math.min(Math.max(...values), hi + 0.6 * span)) + 0.08 * span;
  const bottom = lo - 0.18 * span;
  const maxId = Math.max(...trials.map((t) => t.id));
  const x = (i) => m.l + ((i - 0.5) / (maxId + 0.5)) * (W - m.l - m.r);
  const y = (v) => m.t + (1 - (v - bottom) / (top - bottom)) * (H - m.t - m.b);
  const clipY = (v) => Math.max(y(v), m.t + 4);

  const yTicks = niceTicks(bottom, top, 6), dec = decimalsFor(yTicks);
  for (const t of yTicks) {
    el("line", { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: "grid" }, svg);
    el("text", { x: m.l - 6, y: y(t) + 4, "text-anchor": "end" }, svg, t.toFixed(dec));
  }
  for (const t of integerTicks(1, maxId, Math.min(maxId, 12))) {
    el("text", { x: x(t), y: H - m.b + 16, "text-anchor": "middle", class: "x-tick" }, svg, String(t));
  }
  el("text", { x: W / 2, y: H - 3, "text-anchor": "middle" }, svg, "trial");
  el("text", { x: 12, y: H / 2, transform: `rotate(-90 12 ${H / 2})`, "text-anchor": "middle" }, svg, "val_bpb");
  el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }, svg);
  el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }, svg);

  if (s.baseline_mean !== null) {
    if (s.sigma) {
      const yt = y(s.baseline_mean + BAND_SIGMAS * s.sigma), yb = y(s.baseline_mean - BAND_SIGMAS * s.sigma);
      el("rect", { x: m.l, y: yt, width: W - m.l - m.r, height: Math.max(1, yb - yt), fill: COLORS.baseline, "fill-opacity": 0.1 }, svg);
    }
    el("line", { x1: m.l, x2: W - m.r, y1: y(s.baseline_mean), y2: y(s.baseline_mean), stroke: COLORS.baseline,
                 "stroke-dasharray": "5 4", "stroke-opacity": 0.7 }, svg);
  }
  // running best, a step line
  let d = "", prev = null;
  for (const t of trials) {
    if (t.running_best === null) continue;
    if (prev === null) d += `M${x(t.id)},${y(t.running_best)}`;
    else d += `H${x(t.id)}V${y(t.running_best)}`;
    prev = t.running_best;
  }
  if (d) el("path", { d: d + `H${x(maxId + 0.5)}`, fill: "none", stroke: COLORS.keep, "stroke-width": 2.2, id: "best-line" }, svg);

  for (const t of trials.filter(isRunning)) {
    el("line", { x1: x(t.id), x2: x(t.id), y1: m.t, y2: H - m.b, stroke: COLORS.running, "stroke-dasharray": "3 3",
                 class: "in-flight" }, svg);
  }
  const crashY = bottom + 0.04 * (top - bottom);
  const crashes = trials.filter((t) => t.status === "crash");
  if (crashes.length) {
    el("line", { x1: m.l, x2: W - m.r, y1: y(crashY), y2: y(crashY), stroke: COLORS.crash, "stroke-opacity": 0.25 }, svg);
    el("text", { x: m.l + 4, y: y(crashY) - 4, class: "crash-label" }, svg, "crashes");
  }
  for (const t of crashes) {
    const g = el("g", { class: "point crash", "data-trial-id": t.id }, svg);
    const cx = x(t.id), cy = y(crashY);
    el("path", { d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`,
                 stroke: COLORS.crash, "stroke-width": 2 }, g);
    el("title", {}, g, `#${t.id} crash: ${t.description}\n${t.reason}`);
  }
  let labelled = 0;
  for (const t of measured) {
    const off = y(t.val_bpb) < m.t + 4;
    const cx = x(t.id), cy = clipY(t.val_bpb);
    const g = el("g", { class: "point " + t.status, "data-trial-id": t.id }, svg);
    g.addEventListener("click", () => showDetail(t.id));
    let shape;
    if (t.kind === "baseline") shape = { r: 4.5, fill: COLORS.baseline, stroke: "#fff" };
    else if (HOLLOW.has(t.kind)) shape = { r: 4, fill: "none", "stroke-width": 1.6,
      stroke: t.kind !== "rerun" ? COLORS[t.kind] : (t.status === "keep" ? COLORS.keep : COLORS.rerun) };
    else if (t.status === "keep") shape = { r: 6.5, fill: COLORS.keep, stroke: "#000", "stroke-width": 0.8 };
    else shape = { r: 3.5, fill: COLORS.discard };
    if (off) el("path", { d: `M${cx},${cy - 5}L${cx + 5},${cy + 4}L${cx - 5},${cy + 4}Z`, fill: shape.fill === "none" ? COLORS.discard : shape.fill }, g);
    else el("circle", { cx, cy, ...shape }, g);
    el("title", {}, g, `#${t.id} ${t.kind} ${t.status}: ${fmt(t.val_bpb)}${off ? " (off scale)" : ""}\n${t.description}`);
    if (t.kind === "candidate" && t.status === "keep") {
      const label = t.description.length > 40 ? t.description.slice(0, 39) + "…" : t.description;
      const dy = labelled++ % 2 === 0 ? -10 : 18;
      el("text", { x: cx + 8, y: cy + dy, class: "kept-label" }, svg, label);
    }
  }
}

// --- the current trial -----------------------------------------------------------------------------
function renderCurrent() {
  const c = state.current;
  const panel = $("current");
  panel.dataset.running = c.running ? "true" : "false";
  const t = c.trial;
  const last = c.last || {};
  if (c.running) {
    $("current-title").textContent = "Running: trial " + t.id;
    $("current-meta").textContent = `${t.kind} · ${t.description} · running for ${duration(c.now - t.started_at)}`;
  } else if (t) {
    $("current-title").textContent = "Last result: trial " + t.id;
    $("current-meta").textContent = `${t.kind} · ${t.description} · ${t.status} ${fmt(t.val_bpb)}, took ${duration(t.seconds)}`;
  } else {
    $("current-title").textContent = "Current trial";
    $("current-meta").textContent = c.latest ? "no trial has a result yet" : "no trial yet";
  }
  const note = $("current-note");
  note.hidden = !c.latest;
  note.textContent = c.latest ? `The latest trial, ${c.latest.id} (${c.latest.description}), ${endedWithout(c.latest)}` : "";
  $("current-step").textContent = last.step ?? "-";
  $("current-progress").textContent = last.progress_pct !== undefined && last.progress_pct !== null ? last.progress_pct.toFixed(1) + "%" : "-";
  $("current-loss").textContent = last.loss !== undefined && last.loss !== null ? last.loss.toFixed(4) : "-";
  $("current-tps").textContent = last.tok_per_s ? Math.round(last.tok_per_s).toLocaleString("en-US") : "-";
  $("current-mfu").textContent = c.last ? mfuText(last.mfu_pct, c.on_cpu) : "-";
  $("current-left").textContent = c.running && last.remaining_s !== undefined ? duration(last.remaining_s) : "-";
  renderLoss();
}

// --- the slots ------------------------------------------------------------------------------------
// Shown where the run has several slots (or its one was lost): a line each, what it runs and how far.
const percent = (v) => (v === null || v === undefined ? "-" : Math.round(100 * v) + "%");

function slotNow(s) {
  if (s.state === "lost") return "lost: " + (s.lost_reason || "its machine went away");
  if (s.state !== "running") return "idle";
  const t = s.trial, p = s.progress;
  const progress = !p ? "starting (no progress line yet)" :
    `step ${p.step}` + (p.progress_pct !== undefined && p.progress_pct !== null ? ` (${Math.round(p.progress_pct)}%)` : "");
  return `running trial ${t.id}: ${t.description}, ${duration(state.slots.now - t.started_at)}, ${progress}`;
}

function renderSlots() {
  const data = state.slots;
  const panel = $("slots");
  panel.hidden = !data.shown;
  if (!data.shown) return;
  const hours = `${data.device_hours.toFixed(2)} ${data.accelerator}-hours`;
  $("slots-meta").textContent = `${data.slots.length} slots · busy ${percent(data.busy_fraction)} of the run's ` +
    `${duration(data.span_seconds)} · ${hours}`;
  $("slot-list").replaceChildren(...data.slots.map((s) => {
    const row = h("div", { class: "slot", "data-slot": s.slot, "data-state": s.state });
    const bar = h("progress", { max: "100", "aria-label": `progress of slot ${s.slot}` });
    const pct = s.progress && s.progress.progress_pct;
    if (typeof pct === "number") bar.value = pct;
    else if (s.state !== "running") bar.value = 0;
    const now = h("div", { class: "slot-now" }, slotNow(s));
    if (s.trial) now.addEventListener("click", () => showDetail(s.trial.id));
    row.append(h("div", { class: "slot-name" }, "slot " + s.slot), h("div", { class: "slot-where" }, s.where), now, bar,
               h("div", { class: "slot-use muted" }, `busy ${percent(s.busy_fraction)} · ${s.finished} finished · ` +
                 `${s.device_hours.toFixed(2)} ${data.accelerator}-h`));
    return row;
  }));
}

// How a trial ended without a result, in words.
function endedWithout(t) {
  if (t.status === "running") {
    return "is recorded as running long past any time limit: the lab stopped during it; `autoresearch run` " +
      "resumes and records it.";
  }
  const how = { crash: `crashed (${t.failure})`, stopped: "was stopped; it runs again when the loop resumes",
                lost: "was lost with its machine; it runs again elsewhere", empty: "changed nothing",
                superseded: "was superseded: another change was kept while it ran, so its edit was measured again " +
                            "on top of that one" }[t.status] || t.status;
  return how + (t.reason ? ": " + t.reason : ".");
}

function renderLoss() {
  const svg = $("loss-chart");
  const [W, H] = sizeOf(svg);
  const c = state.current;
  const points = ((c && c.points) || []).filter((p) => p.loss !== null && p.loss !== undefined && isFinite(p.loss));
  if (points.length < 1) {
    const why = !c ? "loading…" : c.trial ? "no progress lines in train.log yet" : c.latest ? "no trial has a result yet" : "no trial yet";
    return emptyChart(svg, W, H, why);
  }
  const m = { l: 54, r: 12, t: 10, b: 30 };
  const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
  const x0 = Math.min(...steps), x1 = Math.max(Math.max(...steps), x0 + 1);
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = 0.05 * (hi - lo);
  lo -= pad; hi += pad;
  const x = (s) => m.l + ((s - x0) / (x1 - x0)) * (W - m.l - m.r);
  const y = (v) => m.t + (1 - (v - lo) / (hi - lo)) * (H - m.t - m.b);
  const yt = niceTicks(lo, hi, 4), dec = decimalsFor(yt);
  for (const t of yt) {
    el("line", { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: "grid" }, svg);
    el("text", { x: m.l - 6, y: y(t) + 4, "text-anchor": "end" }, svg, t.toFixed(dec));
  }
  for (const t of integerTicks(x0, x1, 6)) el("text", { x: x(t), y: H - m.b + 15, "text-anchor": "middle", class: "x-tick" }, svg, String(t));
  el("text", { x: W / 2, y: H - 2, "text-anchor": "middle" }, svg, "step");
  el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }, svg);
  el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }, svg);
  const d = points.map((p, i) => (i ? "L" : "M") + x(p.step).toFixed(1) + "," + y(p.loss).toFixed(1)).join("");
  el("path", { d, fill: "none", stroke: c.running ? COLORS.running : COLORS.baseline, "stroke-width": 2, id: "loss-line",
               "data-points": points.length }, svg);
  const lastP = points[points.length - 1];
  el("circle", { cx: x(lastP.step), cy: y(lastP.loss), r: 3.5, fill: c.running ? COLORS.running : COLORS.baseline }, svg);
}

// --- start -------------------------------------------------------------------------------------------
$("detail-close").addEventListener("click", () => { $("detail").hidden = true; state.detailId = null; });
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (state.summary) { renderProgress(); renderLoss(); } }, 150);
});
poll();
