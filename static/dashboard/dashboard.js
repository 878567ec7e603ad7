// CascadeFlow dashboard: draws the server-built Plotly figures and keeps the
// overview live over a WebSocket (/ws/dashboard/). The server batches ledger
// events per second; each batch extends the charts in place.
(function () {
  "use strict";

  const config = { displaylogo: false, responsive: true };

  function usd(nanos) {
    const v = nanos / 1e9;
    if (v === 0) return "$0.00";
    if (Math.abs(v) < 0.01) return (v < 0 ? "-$" : "$") + Math.abs(v).toFixed(6);
    return (v < 0 ? "-$" : "$") + Math.abs(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }

  function draw(figures) {
    document.querySelectorAll("[data-figure]").forEach(function (el) {
      const fig = figures[el.dataset.figure];
      if (!fig) { el.classList.remove("loading"); el.textContent = "No data."; return; }
      Plotly.react(el, fig.data, fig.layout, config);
      el.classList.remove("loading");
      el.dataset.rendered = "1";
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

  function apply(state, batch) {
    const spendH = chart("spend_hourly"), spendD = chart("spend_daily"), rpm = chart("rpm");
    const esc = chart("escalation"), fc = chart("forecast");
    batch.events.forEach(function (e) {
      state.requests += 1;
      state.cost += e.cost;
      state.baseline += e.baseline;
      if (e.ok) state.answered += 1;
      if (e.escalated) state.escalated += 1;
      bump(trace(rpm, "Requests"), e.minute, 1, 60);
      bump(trace(spendH, "Paid"), e.hour, e.cost / 1e9, 48);
      bump(trace(spendH, "All on the strongest model"), e.hour, e.baseline / 1e9, 48);
      bump(trace(spendD, "Paid"), e.day, e.cost / 1e9, 0);
      bump(trace(spendD, "All on the strongest model"), e.day, e.baseline / 1e9, 0);
      const vol = trace(esc, "Requests"), rate = trace(esc, "Escalated");
      if (vol && rate) {
        const key = e.hour + "";
        const i = (vol.x || []).length - 1;
        let n = 0, k = 0;
        if (i >= 0 && vol.x[i] === key) { n = vol.y[i] || 0; k = Math.round(((rate.y[i] || 0) * n) / 100); }
        n += 1; k += e.escalated ? 1 : 0;
        bump(vol, key, 1, 48);
        const rx = Array.from(rate.x || []), ry = Array.from(rate.y || []);
        if (rx.length && rx[rx.length - 1] === key) ry[ry.length - 1] = (100 * k) / n;
        else { rx.push(key); ry.push((100 * k) / n); }
        rate.x = rx; rate.y = ry;
      }
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
    const empty = document.querySelector("[data-testid=empty-state]");
    if (empty && batch.events.length) empty.remove();
    render(state);
  }

  function render(state) {
    const set = function (id, text) { const el = document.getElementById(id); if (el) el.textContent = text; };
    set("stat-requests", state.requests.toLocaleString("en-US"));
    set("stat-spend", usd(state.cost));
    set("stat-savings", usd(state.baseline - state.cost));
    if (state.baseline > 0) set("stat-savings-pct", ((100 * (state.baseline - state.cost)) / state.baseline).toFixed(1) + "% of " + usd(state.baseline));
    if (state.answered > 0) set("stat-escalation", ((100 * state.escalated) / state.answered).toFixed(1) + "%");
  }

  function live(root) {
    const state = {
      requests: +root.dataset.requests, cost: +root.dataset.cost, baseline: +root.dataset.baseline,
      escalated: +root.dataset.escalated, answered: +root.dataset.answered,
    };
    const status = document.getElementById("live-status");
    let delay = 1000, connectedOnce = false, lastResync = 0;

    function resync() {
      return fetch(root.dataset.resync, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (d) {
          state.requests = d.requests; state.cost = d.cost_nanos; state.baseline = d.baseline_cost_nanos;
          state.escalated = d.escalated;
          draw(JSON.parse(d.figures));
          render(state);
        })
        .catch(function () {});
    }

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
        if (batch.dropped > 0 && Date.now() - lastResync > 5000) { lastResync = Date.now(); resync(); }
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
    if (data && window.Plotly) draw(JSON.parse(data.textContent));
    const root = document.getElementById("overview");
    if (root && root.dataset.ws && window.WebSocket) live(root);
  });
})();
