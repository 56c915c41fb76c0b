// The presence dashboard: one event stream from the hub, rendered in place.
//
// The hub sends "hello" (its health and recent events), every user in "users" pages, "ready",
// then one "user" event per changed user (its state payload, as on P/users/{user}/state),
// "event" per status change and "health" every few seconds. Nothing is polled and the page
// never reloads; a lost stream reconnects by itself and starts from a fresh snapshot.
//
// Everything a user or device chose (names, custom status) is put in the page as text, never
// as markup.
"use strict";

(() => {
  const STATUS_ORDER = ["online", "dnd", "away", "offline"];
  const EVENTS_SHOWN = 50;
  const token = new URLSearchParams(location.search).get("token");
  // beside the page, without the user:password@ a page opened that way has in its URL (the
  // browser refuses requests to such URLs, and sends the credentials it keeps by itself)
  const base = location.origin + location.pathname.replace(/[^/]*$/, "");
  const withToken = (path) => base + (token ? `${path}?token=${encodeURIComponent(token)}` : path);

  const $ = (id) => document.getElementById(id);
  const list = $("users");
  const eventList = $("events");
  /** user id -> {state, el} */
  const users = new Map();
  /** user ids in page order */
  let order = [];
  /** user ids seen in the snapshot under way (those missing at "ready" are gone) */
  let snapshot = null;
  /** users by status, kept as they change (never recounted per event) */
  const counts = Object.fromEntries(STATUS_ORDER.map((s) => [s, 0]));

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function ago(ms) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 10) return "just now";
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function until(ms) {
    const s = Math.max(0, Math.round((ms - Date.now()) / 1000));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    return `${Math.floor(s / 3600)} h`;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  /** a text that follows the clock: refreshed every few seconds from its data-ts */
  function timeText(cls, ts, render) {
    const node = el("span", cls, render(ts));
    node.dataset.ts = String(ts || 0);
    node.dataset.kind = render === until ? "until" : "ago";
    return node;
  }

  function deviceNode(d) {
    const li = el("li", "device");
    li.dataset.device = d.id;
    li.dataset.status = d.status;
    if (d.isActive) li.classList.add("active");
    li.append(el("span", "dot"), el("span", "dname", d.name || d.id));
    if (d.name && d.name !== d.id) li.append(el("span", "did", d.id));
    if (d.sleeping) {
      li.append(el("span", "seen", "sleeping, wakes in "));
      li.lastChild.append(timeText("", d.wakeAt, until));
    } else if (d.status !== "offline") {
      li.append(el("span", "seen", d.status));  // lastSeen moves with every heartbeat
    } else {
      li.append(el("span", "seen", "offline, last seen "));
      li.lastChild.append(timeText("", d.lastSeen, ago));
    }
    if (d.isActive) li.append(el("span", "badge", "primary"));
    return li;
  }

  function render(state) {
    const li = el("li", "user");
    li.dataset.user = state.userId;
    li.dataset.status = state.status;
    li.dataset.version = String(state.version);
    const head = el("div", "head");
    head.append(el("span", "dot"));
    const who = el("div", "who");
    who.append(el("span", "name", state.name || state.userId));
    if (state.name && state.name !== state.userId) who.append(el("span", "uid", state.userId));
    head.append(who, el("span", "status", state.status));
    li.append(head);
    const details = el("div", "details");
    details.append(el("span", "custom", state.customStatus || ""));
    const primary = el("span", "primary", state.activeDevice || "");
    primary.title = "primary device";
    if (state.status === "offline") primary.classList.add("last");
    details.append(primary);
    if (state.status === "offline" && state.lastSeen) {
      const seen = el("span", "lastseen", "last seen ");
      seen.append(timeText("", state.lastSeen, ago));
      details.append(seen);
    }
    li.append(details);
    const devices = el("ul", "devices");
    for (const d of state.devices || []) devices.append(deviceNode(d));
    li.append(devices);
    li.hidden = !matches(state);
    return li;
  }

  function place(id) {
    // binary search in the sorted ids: insert without sorting every user again
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (order[mid] < id) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  function upsert(state, fromSnapshot) {
    const known = users.get(state.userId);
    if (snapshot) snapshot.add(state.userId);
    // a change queued while the snapshot was read may arrive after a newer snapshot
    if (known && !fromSnapshot && state.version <= known.state.version) return;
    const node = render(state);
    if (known) {
      known.el.replaceWith(node);
    } else {
      const at = place(state.userId);
      const before = order[at] === undefined ? null : users.get(order[at]).el;
      order.splice(at, 0, state.userId);
      list.insertBefore(node, before);
    }
    if (known) counts[known.state.status] -= 1;
    counts[state.status] = (counts[state.status] || 0) + 1;
    users.set(state.userId, { state, el: node });
    if (!fromSnapshot) {
      node.classList.add("changed");
      setTimeout(() => node.classList.remove("changed"), 1500);
      tally();
    }
  }

  function forget(id) {
    const known = users.get(id);
    if (!known) return;
    known.el.remove();
    counts[known.state.status] -= 1;
    users.delete(id);
    order.splice(place(id), 1);
  }

  function tally() {
    const box = $("counts");
    box.replaceChildren();
    for (const s of STATUS_ORDER) {
      const item = el("span", "count");
      item.dataset.status = s;
      item.append(el("span", "dot"), el("span", "", `${counts[s]} ${s}`));
      box.append(item);
    }
    $("empty").hidden = users.size > 0;
  }

  function filterText() {
    return $("filter").value.trim().toLowerCase();
  }

  function matches(state) {
    const f = filterText();
    if (!f) return true;
    return [state.userId, state.name, state.status, state.customStatus, state.activeDevice]
      .some((v) => v && String(v).toLowerCase().includes(f));
  }

  function eventNode(e) {
    const li = el("li", "event");
    li.dataset.kind = e.kind;
    li.append(el("time", "", clock(e.ts)));
    if (e.kind === "statusChange") {
      li.dataset.status = e.new;
      li.append(el("span", "dot"), el("span", "who", e.userId), el("span", "", ` ${e.old} → ${e.new}`));
    } else {
      const what = e.kind === "timeout" ? "timed out" : "removed";
      const who = e.deviceId ? `${e.userId}/${e.deviceId}` : e.userId;
      li.append(el("span", "who", who), el("span", "", ` ${what}`));
    }
    return li;
  }

  function addEvent(e) {
    eventList.prepend(eventNode(e));
    while (eventList.children.length > EVENTS_SHOWN) eventList.lastChild.remove();
  }

  function uptime(s) {
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function health(h) {
    const link = $("link");
    link.dataset.up = h.broker.up ? "up" : "down";
    const clients = h.broker.clients === null || h.broker.clients === undefined
      ? "" : `, ${h.broker.clients} client${h.broker.clients === 1 ? "" : "s"}`;
    const kind = h.broker.kind === "none" ? "no broker" : `${h.broker.kind} broker`;
    $("link-text").textContent = `${kind} ${h.broker.up ? "up" : "DOWN"}${clients}`;
    $("role").textContent = `${h.role} hub`;
    $("uptime").textContent = `up ${uptime(h.uptimeS)}`;
    if (h.devices) {
      const devices = Object.values(h.devices).reduce((a, b) => a + b, 0);
      const online = h.devices.online || 0;
      $("totals").textContent = `${online}/${devices} devices online` +
        (h.dropped ? `, ${h.dropped} messages dropped` : "");
    }
  }

  function setStream(state, text) {
    document.body.dataset.stream = state;
    $("stream-text").textContent = text || state;
  }

  function problem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.hidden = !text;
  }

  function refreshTimes() {
    for (const node of document.querySelectorAll("[data-ts]")) {
      const ts = Number(node.dataset.ts);
      node.textContent = node.dataset.kind === "until" ? until(ts) : ago(ts);
    }
  }

  function connect() {
    const source = new EventSource(withToken("api/events"));
    source.addEventListener("hello", (e) => {
      const hello = JSON.parse(e.data);
      snapshot = new Set();
      health(hello.health);
      eventList.replaceChildren();
      for (const ev of hello.events) addEvent(ev);
      setStream("loading", "loading users");
      problem("");
    });
    source.addEventListener("users", (e) => {
      for (const state of JSON.parse(e.data)) upsert(state, true);
    });
    source.addEventListener("ready", () => {
      if (snapshot) for (const id of [...users.keys()]) if (!snapshot.has(id)) forget(id);
      snapshot = null;
      tally();
      setStream("live");
    });
    source.addEventListener("user", (e) => upsert(JSON.parse(e.data), false));
    source.addEventListener("gone", (e) => { forget(JSON.parse(e.data).userId); tally(); });
    source.addEventListener("event", (e) => addEvent(JSON.parse(e.data)));
    source.addEventListener("health", (e) => health(JSON.parse(e.data)));
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) {
        setStream("reconnecting");  // the browser retries by itself
        return;
      }
      // refused outright: find out why, then try again in a while
      setStream("offline", "disconnected");
      fetch(withToken("api/users?limit=1"), { cache: "no-store" }).then((r) => {
        if (r.status === 401) {
          problem("This hub needs its token: open the page as /?token=TOKEN, or log in with " +
            "any user name and the token as password.");
        } else if (r.status === 503) {
          problem("Too many dashboards are open on this hub.");
        }
      }).catch(() => problem("The hub cannot be reached."));
      setTimeout(connect, 5000);
    };
  }

  $("filter").addEventListener("input", () => {
    for (const { state, el: node } of users.values()) node.hidden = !matches(state);
  });
  setInterval(refreshTimes, 10000);
  tally();
  connect();
})();
