// CascadeFlow dashboard: draws the server-built Plotly figures and keeps the
// overview live over a WebSocket (/ws/dashboard/). The server batches ledger
// events per second; each batch moves the counters, the gauges and the volume
// charts in place, and derived figures (pooled rates, forecasts) are refreshed
// from the server shortly after.
//
// Every visual decision is the server's (dashboard/charts.py): a figure may
// carry a `narrow` layout, merged in when its chart is narrower than
// `narrow.below` pixels, and a gauge carries its `states` (the lower edge of
// each budget state, in dollars, with its colour).
(function () {
  "use strict";

  const config = { displaylogo: false, displayModeBar: false, responsive: true };
  const RESYNC_AFTER_MS = 20000; // derived figures follow live events within this delay

  function usd(nanos) {
    const v = nanos / 1e9;
    if (v === 0) return "$0.00";
    if (Math.abs(v) < 0.01) return (v < 0 ? "-$" : "$") + Math.abs(v).toFixed(6);
    return (v < 0 ? "-$" : "$") + Math.abs(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  function count(n) { return Math.round(n).toLocaleString("en-US"); }

  function isObject(v) { return v && typeof v === "object" && !Array.isArray(v); }

  function merge(base, patch) {
    const out = Object.assign({}, base);
    Object.keys(patch || {}).forEach(function (k) {
      out[k] = isObject(base[k]) && isObject(patch[k]) ? merge(base[k], patch[k]) : patch[k];
    });
    return out;
  }

  function isNarrow(el) {
    const n = el._cf && el._cf.narrow;
    return !!(n && n.below && el.clientWidth < n.below);
  }

  function layoutFor(el, layout) {
    const n = el._cf && el._cf.narrow;
    const narrow = isNarrow(el);
    el.dataset.narrow = narrow ? "1" : "0";
    return narrow ? merge(layout, n.layout) : layout;
  }

  function draw(figures) {
    document.querySelectorAll("[data-figure]").forEach(function (el) {
      const fig = figures[el.dataset.figure];
      if (!fig) { el.classList.remove("loading"); el.textContent = "No data."; return; }
      el._cf = fig;
      Plotly.react(el, fig.data, layoutFor(el, fig.layout), config);
      el.classList.remove("loading");
      el.dataset.rendered = "1";
    });
  }

  // A chart that crosses its narrow width is drawn again with the other layout.
  function relayoutOnResize() {
    let pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () {
        document.querySelectorAll("[data-figure][data-rendered]").forEach(function (el) {
          if (!el._cf || (el.dataset.narrow === "1") === isNarrow(el)) return;
          const layout = merge(el._cf.layout, { datarevision: (el.layout.datarevision || 0) + 1 });
          Plotly.react(el, el.data, layoutFor(el, layout), config);
        });
      }, 150);
    });
  }

  function trace(el, name) {
    return el && el.data ? el.data.find(function (t) { return t.name === name; }) : undefined;
  }

  // Add `amount` to the point at x, appending the point if x is new (keeping `keep` points).
  function bump(t, x, amount, keep) {
    if (!t) return;
    const xs = Array.from(t.x || []), ys = Array.from(t.y || []);
    const last = xs.length - 1;
    if (last >= 0 && xs[last] === x) ys[last] = (ys[last] || 0) + amount;
    else { xs.push(x); ys.push(amount); }
    while (keep && xs.length > keep) { xs.shift(); ys.shift(); }
    t.x = xs; t.y = ys;
  }

  function redraw(el) {
    if (!el || !el.data) return;
    el.layout.datarevision = (el.layout.datarevision || 0) + 1;
    Plotly.react(el, el.data, el.layout, config);
    el.dataset.updates = String((+el.dataset.updates || 0) + 1);
  }

  function chart(name) { return document.querySelector('[data-figure="' + name + '"]'); }

  // A gauge's value moves with the spend; its colour and state follow the bands.
  function moveGauge(el, addUsd) {
    if (!el || !el.data || !el._cf || !el._cf.states) return;
    const t = el.data[0];
    t.value = (t.value || 0) + addUsd;
    let state = el._cf.states[0];
    el._cf.states.forEach(function (s) { if (t.value >= s.from) state = s; });
    t.gauge = merge(t.gauge, { bar: { color: state.colour } });
    const range = t.gauge.axis && t.gauge.axis.range;
    if (range && t.value > range[1]) t.gauge = merge(t.gauge, { axis: { range: [0, t.value] } });
    el.dataset.state = state.state;
    redraw(el);
    const card = el.closest("[data-gauge]");
    if (!card) return;
    const spent = t.value * 1e9, limit = +card.dataset.limit;
    const sub = card.querySelector("[data-gauge-use]");
    if (sub) sub.textContent = usd(spent) + " of " + usd(limit) + (limit > 0 ? " (" + Math.round((100 * spent) / limit) + "%)" : "");
    const badge = card.querySelector("[data-gauge-state]");
    if (badge) { badge.textContent = state.state; badge.className = "badge state-" + state.state; }
  }

  function apply(state, batch) {
    const spendH = chart("spend_hourly"), spendD = chart("spend_daily"), rpm = chart("rpm");
    const esc = chart("escalation"), fc = chart("forecast");
    let cost = 0;
    batch.events.forEach(function (e) {
      state.requests += 1;
      state.cost += e.cost;
      state.baseline += e.baseline;
      cost += e.cost;
      if (e.ok) state.answered += 1; else state.errors += 1;
      if (e.escalated) state.escalated += 1;
      bump(trace(rpm, "Requests"), e.minute, 1, 60);
      bump(trace(spendH, "Paid"), e.hour, e.cost / 1e9, 48);
      bump(trace(spendH, "All on the strongest model"), e.hour, e.baseline / 1e9, 48);
      bump(trace(spendD, "Paid"), e.day, e.cost / 1e9, 0);
      bump(trace(spendD, "All on the strongest model"), e.day, e.baseline / 1e9, 0);
      bump(trace(esc, "Requests"), e.hour, 1, 48);
      const spent = trace(fc, "Spent");
      if (spent) {
        const xs = Array.from(spent.x || []), ys = Array.from(spent.y || []);
        const last = xs.length - 1;
        if (last >= 0 && xs[last] === e.day) ys[last] += e.cost / 1e9;
        else { xs.push(e.day); ys.push((last >= 0 ? ys[last] : 0) + e.cost / 1e9); }
        spent.x = xs; spent.y = ys;
      }
    });
    [spendH, spendD, rpm, esc, fc].forEach(redraw);
    if (cost) document.querySelectorAll("[data-gauge] [data-figure]").forEach(function (el) { moveGauge(el, cost / 1e9); });
    const empty = document.querySelector("[data-testid=empty-state]");
    if (empty && batch.events.length) empty.remove();
    render(state);
  }

  function render(state) {
    const set = function (id, text) { const el = document.getElementById(id); if (el) el.textContent = text; };
    set("stat-requests", count(state.requests));
    set("stat-errors", count(state.errors));
    set("stat-spend", usd(state.cost));
    set("stat-savings", usd(state.baseline - state.cost));
    if (state.baseline > 0) set("stat-savings-pct", ((100 * (state.baseline - state.cost)) / state.baseline).toFixed(1) + "% of " + usd(state.baseline));
    if (state.answered > 0) set("stat-escalation", ((100 * state.escalated) / state.answered).toFixed(1) + "%");
  }

  function live(root) {
    const state = {
      requests: +root.dataset.requests, cost: +root.dataset.cost, baseline: +root.dataset.baseline,
      escalated: +root.dataset.escalated, answered: +root.dataset.answered, errors: +root.dataset.errors,
    };
    const status = document.getElementById("live-status");
    let delay = 1000, connectedOnce = false, lastResync = 0, resyncTimer = null;

    function resync() {
      clearTimeout(resyncTimer); resyncTimer = null; lastResync = Date.now();
      return fetch(root.dataset.resync, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (d) {
          state.requests = d.requests; state.cost = d.cost_nanos; state.baseline = d.baseline_cost_nanos;
          state.escalated = d.escalated; state.answered = d.answered; state.errors = d.errors;
          draw(JSON.parse(d.figures));
          (d.gauges || []).forEach(function (g, i) {
            const card = document.querySelector('[data-gauge="' + i + '"]');
            if (card) card.dataset.limit = g.limit_nanos;
          });
          render(state);
        })
        .catch(function () {});
    }

    function resyncSoon() { if (!resyncTimer) resyncTimer = setTimeout(resync, RESYNC_AFTER_MS); }

    function connect() {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      const ws = new WebSocket(scheme + location.host + root.dataset.ws);
      ws.onopen = function () {
        status.textContent = "live"; status.classList.add("on"); delay = 1000;
        if (connectedOnce) resync();  // catch up on what happened while disconnected
        connectedOnce = true;
      };
      ws.onmessage = function (msg) {
        const batch = JSON.parse(msg.data);
        if (batch.type !== "usage") return;
        apply(state, batch);
        // Too many events to send one by one: the totals come from the server.
        if (batch.dropped > 0 && Date.now() - lastResync > 5000) resync();
        else resyncSoon();
      };
      ws.onclose = function (ev) {
        status.classList.remove("on");
        if (ev.code === 4403 || ev.code === 4401) { status.textContent = "not authorised for live updates"; return; }
        status.textContent = "reconnecting…";
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 30000);
      };
    }
    connect();
  }

  document.addEventListener("DOMContentLoaded", function () {
    const data = document.getElementById("figures");
    if (data && window.Plotly) { draw(JSON.parse(data.textContent)); relayoutOnResize(); }
    const root = document.getElementById("overview");
    if (root && root.dataset.ws && window.WebSocket) live(root);
  });
})();
