// The GM console: a page over the admin API. The key lives in this tab's
// session storage only; every API call carries it, the page itself needs
// none. Graphs poll /metrics (no key) every 2 s and are drawn on canvas.
"use strict";

const KEY = "guildchat.admin.key";
const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem(KEY) || "";

// JSON numbers lose precision above 2^53, and user ids are u64: the
// console keeps every id as the digit string the API wrote.
const idIn = (text, field) => {
  const m = text.match(new RegExp('"' + field + '":(\\d+)'));
  return m ? m[1] : "";
};

// `body`: an object to send as JSON, or a JSON string sent as it is.
async function apiText(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + key() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  if (!res.ok) {
    let err = { code: String(res.status), message: text };
    try {
      err = JSON.parse(text).error || err;
    } catch (_) {}
    throw new Error(err.code + ": " + err.message);
  }
  return text;
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + key() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  const json = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const err = json && json.error ? json.error : { code: String(res.status), message: text };
    throw new Error(err.code + ": " + err.message);
  }
  return json;
}

// ---------------------------------------------------------------- login

async function login(candidate) {
  sessionStorage.setItem(KEY, candidate);
  try {
    await api("GET", "/v1/stats");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    throw e;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  startGraphs();
  loadWords();
  loadAudit(true);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    await login($("key").value.trim());
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  location.reload();
});

// ---------------------------------------------------------------- metrics

// Parses Prometheus text into [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const pair of m[3].match(/\w+="(?:[^"\\]|\\.)*"/g) || []) {
        const i = pair.indexOf("=");
        labels[pair.slice(0, i)] = pair.slice(i + 2, -1);
      }
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

const sum = (samples, name, pred) =>
  samples.filter((s) => s.name === name && (!pred || pred(s.labels))).reduce((a, s) => a + s.value, 0);

// The p99 of what a histogram recorded between two scrapes, from its
// cumulative buckets; 0 when nothing was recorded.
function windowP99(prev, cur, name) {
  const buckets = (samples) =>
    samples
      .filter((s) => s.name === name + "_bucket")
      .map((s) => [s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value])
      .sort((a, b) => a[0] - b[0]);
  const a = buckets(prev);
  const b = buckets(cur);
  if (!b.length) return 0;
  const delta = b.map(([le, v], i) => [le, v - (a[i] ? a[i][1] : 0)]);
  const total = delta[delta.length - 1][1];
  if (total <= 0) return 0;
  const want = total * 0.99;
  for (const [le, v] of delta) {
    if (v >= want) return Number.isFinite(le) ? le * 1000 : delta[delta.length - 2][0] * 1000;
  }
  return 0;
}

const CHANNELS = ["CHAT_NORMAL", "CHAT_GUILD", "CHAT_WORLD", "CHAT_PRIVATE", "CHAT_TEAM"];
const COLORS = ["#2f6fdf", "#1f9d55", "#d97706", "#b832a8", "#0891b2"];
const POINTS = 60;
// Exposed for tests and curious operators: every series drawn, newest last.
window.consoleData = { online: [], chats: {}, deliveries: [], sheds: [], fanout: [], commit: [] };
for (const c of CHANNELS) window.consoleData.chats[c] = [];

function push(series, v) {
  series.push(v);
  if (series.length > POINTS) series.shift();
}

function draw(canvasId, seriesList) {
  const canvas = $(canvasId);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const max = Math.max(1, ...seriesList.flatMap((s) => s.values));
  seriesList.forEach(({ values, color }) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / (POINTS - 1)) * canvas.width;
      const y = canvas.height - 4 - (v / max) * (canvas.height - 8);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#888";
  ctx.fillText(String(Math.round(max * 100) / 100), 4, 12);
}

let previous = null;
async function scrape() {
  const res = await fetch("/metrics");
  const cur = parseMetrics(await res.text());
  const now = performance.now();
  const d = window.consoleData;
  push(d.online, sum(cur, "guildchat_players_online"));
  if (previous) {
    const dt = Math.max(0.001, (now - previous.at) / 1000);
    const rate = (name, pred) => Math.max(0, (sum(cur, name, pred) - sum(previous.samples, name, pred)) / dt);
    for (const c of CHANNELS) {
      push(d.chats[c], rate("guildchat_chats_total", (l) => l.channel === c && l.result === "RES_OK"));
    }
    push(d.deliveries, rate("guildchat_deliveries_total"));
    push(d.sheds, rate("guildchat_shed_total") +
      rate("guildchat_disconnects_total", (l) => l.reason === "SLOW_CONSUMER_CUT"));
    push(d.fanout, windowP99(previous.samples, cur, "guildchat_fanout_seconds"));
    push(d.commit, windowP99(previous.samples, cur, "guildchat_history_commit_seconds"));
  }
  previous = { at: now, samples: cur };
  const last = (s) => (s.length ? Math.round(s[s.length - 1] * 100) / 100 : 0);
  draw("g-online", [{ values: d.online, color: COLORS[0] }]);
  draw("g-chats", CHANNELS.map((c, i) => ({ values: d.chats[c], color: COLORS[i] })));
  draw("g-deliveries", [{ values: d.deliveries, color: COLORS[1] }]);
  draw("g-sheds", [{ values: d.sheds, color: COLORS[2] }]);
  draw("g-fanout", [{ values: d.fanout, color: COLORS[3] }]);
  draw("g-commit", [{ values: d.commit, color: COLORS[4] }]);
  $("n-online").textContent = last(d.online);
  $("n-chats").textContent = CHANNELS.reduce((a, c) => a + last(d.chats[c]), 0).toFixed(1);
  $("n-deliveries").textContent = last(d.deliveries).toFixed(1);
  $("n-sheds").textContent = last(d.sheds).toFixed(1);
  $("n-fanout").textContent = last(d.fanout);
  $("n-commit").textContent = last(d.commit);
}

let timer = null;
function startGraphs() {
  if (timer) return;
  const tick = () => scrape().catch(() => {});
  tick();
  timer = setInterval(tick, 2000);
}

// ---------------------------------------------------------------- players

let current = null;

function row(table, cells, header) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement(header ? "th" : "td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c;
    tr.appendChild(td);
  }
  table.appendChild(tr);
}

const when = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "-");

async function showPlayer(id) {
  const text = await apiText("GET", "/v1/players/" + id);
  const p = JSON.parse(text);
  current = idIn(text, "id");
  const t = $("player-table");
  t.replaceChildren();
  row(t, ["id", current]);
  row(t, ["name", p.name]);
  row(t, ["state", p.state]);
  for (const k of ["guild", "team", "scene", "mask"]) row(t, [k, idIn(text, k)]);
  row(t, ["muted until", when(p.muted_until_ms)]);
  row(t, ["banned until", when(p.banned_until_ms)]);
  $("player").hidden = false;
  // Needs a gm key; a read key still sees the player.
  try {
    await showMessages();
  } catch (e) {
    $("messages").replaceChildren();
    row($("messages"), [e.message]);
  }
}

async function showMessages() {
  const m = await api("GET", "/v1/players/" + current + "/messages?limit=20");
  const t = $("messages");
  t.replaceChildren();
  row(t, ["time", "channel", "text", ""], true);
  for (const msg of m.messages) {
    const recall = document.createElement("button");
    recall.textContent = "Recall";
    recall.addEventListener("click", async () => {
      try {
        await api("DELETE", "/v1/messages/" + msg.msg_id, { reason: $("reason").value });
        $("act-result").textContent = "recalled " + msg.msg_id;
        await showMessages();
      } catch (e) {
        $("act-result").textContent = e.message;
      }
    });
    row(t, [when(msg.time_ms), msg.channel, msg.text, recall]);
  }
}

$("find-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("find-error").textContent = "";
  const q = $("find").value.trim();
  try {
    if (/^\d+$/.test(q)) {
      await showPlayer(q);
    } else {
      const text = await apiText("GET", "/v1/players?name=" + encodeURIComponent(q));
      await showPlayer(idIn(text, "id"));
    }
  } catch (e) {
    $("player").hidden = true;
    $("find-error").textContent = e.message;
  }
});

for (const b of document.querySelectorAll("[data-act]")) {
  b.addEventListener("click", async () => {
    const act = b.dataset.act;
    const reason = $("reason").value;
    const seconds = Number($("seconds").value);
    const base = "/v1/players/" + current;
    try {
      if (act === "kick") await api("POST", base + "/kick", { reason });
      if (act === "mute") await api("PUT", base + "/mute", { seconds, reason });
      if (act === "unmute") await api("DELETE", base + "/mute", { reason });
      if (act === "ban") await api("PUT", base + "/ban", { seconds, reason });
      if (act === "unban") await api("DELETE", base + "/ban", { reason });
      $("act-result").textContent = act + ": done";
      await showPlayer(current);
      loadAudit(true);
    } catch (e) {
      $("act-result").textContent = act + ": " + e.message;
    }
  });
}

// ---------------------------------------------------------------- announce

$("announce-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { text: $("announce-text").value };
  const guild = $("announce-guild").value.trim();
  // Sent as the digits typed, so a guild id above 2^53 stays exact.
  const json = guild ? JSON.stringify(body).slice(0, -1) + ',"guild":' + guild.replace(/\D/g, "") + "}" : JSON.stringify(body);
  try {
    const text = await apiText("POST", "/v1/announce", json);
    $("announce-result").textContent = "sent, msg_id " + idIn(text, "msg_id");
  } catch (e) {
    $("announce-result").textContent = e.message;
  }
});

// ---------------------------------------------------------------- words

async function loadWords() {
  try {
    const r = await api("GET", "/v1/filter/words");
    $("word-list").value = r.words.join("\n");
  } catch (e) {
    $("words-result").textContent = e.message;
  }
}

$("save-words").addEventListener("click", async () => {
  const words = $("word-list").value.split("\n").map((w) => w.trim()).filter((w) => w);
  try {
    const r = await api("PUT", "/v1/filter/words", { words });
    $("words-result").textContent = "saved, " + r.words.length + " words";
  } catch (e) {
    $("words-result").textContent = e.message;
  }
});

$("test-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const r = await api("POST", "/v1/filter/test", { text: $("test-text").value });
    $("words-result").textContent = r.filtered + "  (matches: " + (r.matches.join(", ") || "none") + ")";
  } catch (e) {
    $("words-result").textContent = e.message;
  }
});

// ---------------------------------------------------------------- audit

let oldest = 0;
async function loadAudit(fresh) {
  const t = $("audit-table");
  if (fresh) {
    oldest = 0;
    t.replaceChildren();
    row(t, ["time", "key", "action", "target", "reason", "result"], true);
  }
  try {
    const r = await api("GET", "/v1/audit?limit=20" + (oldest ? "&before=" + oldest : ""));
    for (const e of r.entries) {
      row(t, [when(e.time_ms), e.key_id, e.action, e.target, e.reason, e.result]);
      oldest = e.id;
    }
  } catch (e) {
    row(t, [e.message]);
  }
}

$("audit-refresh").addEventListener("click", () => loadAudit(true));
$("audit-more").addEventListener("click", () => loadAudit(false));

// ---------------------------------------------------------------- start

if (key()) login(key()).catch(() => {});
