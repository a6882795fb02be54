// The demo client: a browser player speaking the JSON codec
// (subprotocol guildchat.json) over the game port, with a development
// token from this listener. Shows cooldowns, whispers, resume after a
// dropped connection, and history paging.
"use strict";

const $ = (id) => document.getElementById(id);
const MSG = { LOGIN_REQ: 1, LOGIN_REP: 2, CHAT_REQ: 3, CHAT_REP: 4, NOTIFY: 5, KICK: 6, ERROR: 7,
  HEARTBEAT_REQ: 8, HISTORY_REQ: 15, HISTORY_REP: 16, RECALL: 17 };
let ws = null;
let seq = 0;
let lastMsgId = "0";
let oldest = "0";
let token = "";
let url = "";
// Exposed for tests: every line shown and every chat result.
window.demo = { lines: [], results: [], kicked: null, loggedIn: false };

const head = (msgid) => ({ msgid, seq: ++seq });
const send = (m) => ws && ws.readyState === 1 && ws.send(JSON.stringify(m));
// Canonical JSON leaves out default values: an absent res is RES_OK.
const res = (m) => m.res || "RES_OK";

function show(n, prefix) {
  const li = document.createElement("li");
  li.id = "m" + n.msgId;
  const to = n.targetname ? " -> " + n.targetname : "";
  li.textContent = (prefix || "") + "[" + (n.chattype || "?") + "] " + (n.sendername || "system") + to + ": " + n.strcontext;
  $("lines").appendChild(li);
  window.demo.lines.push({ id: n.msgId, channel: n.chattype, from: n.sendername || "", text: n.strcontext });
}

function connect(resume) {
  if (ws) ws.close();
  ws = new WebSocket(url, "guildchat.json");
  ws.onopen = () => {
    send({ msghead: head(MSG.LOGIN_REQ), tokenstr: token, lastMsgId: resume ? lastMsgId : "0" });
  };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    const t = m.msghead ? m.msghead.msgid : 0;
    if (t === MSG.LOGIN_REP) {
      window.demo.loggedIn = res(m) === "RES_OK";
      // Below everything that follows: the cursor to resume from if the
      // connection drops before any notification arrives.
      if (window.demo.loggedIn && (!resume || lastMsgId === "0")) lastMsgId = m.lastMsgId || lastMsgId;
      $("status").textContent = window.demo.loggedIn
        ? "online as " + m.username + (m.resumed ? " (resumed, " + (m.replayed || 0) + " replayed)" : "")
        : "login refused: " + res(m);
    } else if (t === MSG.NOTIFY) {
      lastMsgId = m.msgId;
      show(m);
    } else if (t === MSG.CHAT_REP) {
      window.demo.results.push(res(m));
      const wait = res(m) === "RES_MUTED" ? " (muted " + Math.ceil((m.mutedMs || 0) / 1000) + " s)" : "";
      $("last-result").textContent = res(m) + wait;
      const cd = m.cooldownMs || 0;
      $("cooldown").textContent = cd ? "cooldown " + (cd / 1000).toFixed(1) + " s" : "";
    } else if (t === MSG.HISTORY_REP) {
      for (const n of m.msgs || []) {
        show(n, "(history) ");
        oldest = n.msgId;
      }
    } else if (t === MSG.RECALL) {
      const li = $("m" + m.msgId);
      if (li) li.textContent = "(removed by a game master)";
    } else if (t === MSG.KICK) {
      window.demo.kicked = m.reason || "KICK_NONE";
      $("status").textContent = "kicked: " + window.demo.kicked;
    } else if (t === MSG.ERROR) {
      $("last-result").textContent = "error " + res(m) + " " + (m.detail || "");
    }
  };
  ws.onclose = () => {
    if (!window.demo.kicked) $("status").textContent = "offline (use Resume)";
  };
}

$("who-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const num = (id) => Number($(id).value || 0);
  const body = { user: num("user"), name: $("name").value, guild: num("guild"), team: num("team"), scene: num("scene") };
  const cfg = await (await fetch("/demo/config")).json();
  url = cfg.url;
  const r = await fetch("/demo/token", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  token = (await r.json()).token;
  connect(false);
});

$("drop").addEventListener("click", () => ws && ws.close());
$("resume").addEventListener("click", () => connect(true));

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const m = { msghead: head(MSG.CHAT_REQ), chattype: $("channel").value, context: $("text").value };
  if (m.chattype === "CHAT_PRIVATE") m.targetid = String($("target").value || 0);
  send(m);
  $("text").value = "";
});

// Paging starts again from the newest when the channel or peer changes.
let pagedFor = "";
$("older").addEventListener("click", () => {
  const channel = $("channel").value;
  const peer = channel === "CHAT_PRIVATE" ? String($("target").value || 0) : "0";
  if (pagedFor !== channel + "/" + peer) {
    oldest = "0";
    pagedFor = channel + "/" + peer;
  }
  send({ msghead: head(MSG.HISTORY_REQ), chattype: channel, peerid: peer, beforeMsgId: oldest, limit: 20 });
});

// Keeps the connection alive while the page is open.
setInterval(() => send({ msghead: head(MSG.HEARTBEAT_REQ), clientTimeMs: String(Date.now()) }), 10000);
