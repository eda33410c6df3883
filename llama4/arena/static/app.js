// llama4 arena page: battles (blind A/B, streamed answers, one vote) and the leaderboard.
// Model output and prompts are only ever put into the page as text (textContent), never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let battle = null;     // {id, done: {a, b}, voted}
let streaming = false;

function setState(s) { document.body.dataset.state = s; }
function status(msg) { $("status").textContent = msg || ""; }

function showView() {
  const board = location.pathname === "/leaderboard";
  $("battle-view").hidden = board;
  $("board-view").hidden = !board;
  $("nav-battle").setAttribute("aria-current", board ? "false" : "page");
  $("nav-board").setAttribute("aria-current", board ? "page" : "false");
  if (board) loadBoard(); else $("prompt").focus();
}

function voteButtons(enabled) {
  for (const b of document.querySelectorAll(".votes button")) b.disabled = !enabled;
}

function resetBattle() {
  battle = null;
  for (const s of ["a", "b"]) {
    $("log-" + s).replaceChildren();
    $("label-" + s).textContent = "Model " + s.toUpperCase();
    $("side-" + s).dataset.done = "false";
    $("side-" + s).classList.remove("winner");
  }
  $("result").textContent = "";
  voteButtons(false);
  setState("idle");
}

function bubble(side, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log-" + side).appendChild(div);
  return div;
}

async function errorText(res) {
  try { const j = await res.json(); return j.error || res.statusText; } catch (e) { return res.statusText; }
}

// Reads a server-sent-event stream of JSON objects from a fetch response.
async function* events(res) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      if (chunk.startsWith("data: ")) yield JSON.parse(chunk.slice(6));
    }
  }
}

async function send(ev) {
  if (ev) ev.preventDefault();
  if (streaming) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) { status("Type a message first."); return; }
  if (battle && battle.voted) resetBattle();
  const url = battle ? `/api/battles/${encodeURIComponent(battle.id)}/turns` : "/api/battles";
  streaming = true;
  $("send").disabled = true;
  voteButtons(false);
  setState("streaming");
  status("The models are answering…");
  const answer = {};
  for (const s of ["a", "b"]) {
    bubble(s, "user", prompt);
    answer[s] = bubble(s, "assistant", "");
    answer[s].classList.add("pending");
    $("side-" + s).dataset.done = "false";
  }
  let failed = null;
  try {
    const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify({ prompt }) });
    if (!res.ok) {
      failed = await errorText(res);
    } else {
      $("prompt").value = "";
      for await (const e of events(res)) {
        if (e.type === "battle") battle = { id: e.id, voted: false };
        else if (e.type === "delta") answer[e.side].textContent += e.text;
        else if (e.type === "end") {
          answer[e.side].classList.remove("pending");
          $("side-" + e.side).dataset.done = "true";
        } else if (e.type === "error") failed = e.message;
      }
    }
  } catch (e) {
    failed = "the connection failed (" + e.message + ")";
  }
  streaming = false;
  $("send").disabled = false;
  const bothDone = $("side-a").dataset.done === "true" && $("side-b").dataset.done === "true";
  if (failed || !bothDone) {
    status("Error: " + (failed || "an answer did not finish") + ".");
    for (const s of ["a", "b"]) answer[s].classList.remove("pending");
    if (!battle || !bothDone) { battle = null; setState("idle"); }
    else { setState("ready"); voteButtons(true); }
    return;
  }
  status("Both answers are in. Vote (keys 1-4), or send a follow-up to both.");
  setState("ready");
  voteButtons(true);
  $("vote-a").focus();  // the next thing to do: vote from the keyboard, or Tab on to the message box
}

async function vote(winner) {
  if (!battle || battle.voted || streaming) return;
  voteButtons(false);
  try {
    const res = await fetch(`/api/battles/${encodeURIComponent(battle.id)}/vote`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ winner }) });
    if (!res.ok) { status("Error: " + await errorText(res) + "."); voteButtons(true); return; }
    const r = await res.json();
    battle.voted = true;
    $("label-a").textContent = "Model A: " + r.model_a;
    $("label-b").textContent = "Model B: " + r.model_b;
    if (r.winner === "model_a") $("side-a").classList.add("winner");
    if (r.winner === "model_b") $("side-b").classList.add("winner");
    const said = { model_a: "A is better", model_b: "B is better", tie: "Tie", "tie (bothbad)": "Both are bad" }[r.winner];
    $("result").textContent = `Your vote (${said}) is saved. A was ${r.model_a}, B was ${r.model_b}. ` +
      "Send a new message to start the next battle.";
    status("");
    setState("voted");
  } catch (e) {
    status("Error: the vote was not sent (" + e.message + ").");
    voteButtons(true);
  }
}

function fmt(x) { return Math.round(x).toString(); }

async function loadBoard() {
  $("board-note").textContent = "Loading…";
  let b;
  try {
    const res = await fetch("/api/leaderboard");
    if (!res.ok) { $("board-note").textContent = "Error: " + await errorText(res); return; }
    b = await res.json();
  } catch (e) { $("board-note").textContent = "Error: " + e.message; return; }
  const body = $("board").tBodies[0];
  body.replaceChildren();
  for (const r of b.rows) {
    const tr = body.insertRow();
    for (const v of [r.rank, r.model, fmt(r.rating), `${fmt(r.ci_low)} – ${fmt(r.ci_high)}`, r.battles,
                     `${r.wins} / ${r.ties} / ${r.losses}`]) tr.insertCell().textContent = v;
  }
  for (const m of b.unrated || []) {
    const tr = body.insertRow();
    for (const v of ["–", m, "–", "no decided battles yet", 0, "0 / 0 / 0"]) tr.insertCell().textContent = v;
  }
  let note = `${b.battles} battles; intervals from ${b.rounds} bootstrap rounds.`;
  if (b.provisional && b.battles) note += " Provisional: some model has not yet both won and lost, so the " +
    "ratings are pulled toward 1000 by a weak prior.";
  $("board-note").textContent = note;
  const hm = $("heatmap");
  hm.replaceChildren();
  if (!b.models.length) return;
  const head = hm.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  for (const m of b.models) { const th = document.createElement("th"); th.scope = "col"; th.textContent = m; head.appendChild(th); }
  const hb = hm.createTBody();
  b.models.forEach((m, i) => {
    const tr = hb.insertRow();
    const th = document.createElement("th"); th.scope = "row"; th.textContent = m; tr.appendChild(th);
    b.models.forEach((_, j) => {
      const td = tr.insertCell();
      const f = b.win_fraction[i][j];
      if (f === null) { td.textContent = "–"; td.className = "none"; return; }
      td.textContent = Math.round(100 * f) + "%";
      td.title = `${m} won ${Math.round(100 * f)}% of the decided battles against ${b.models[j]} (${b.games[i][j]} battles in all)`;
      // white at 0.5, blue when the row wins more, red when it wins less
      const d = Math.abs(f - 0.5) * 2;
      td.style.backgroundColor = f >= 0.5 ? `rgba(37, 99, 235, ${0.1 + 0.6 * d})` : `rgba(220, 38, 38, ${0.1 + 0.6 * d})`;
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
  });
  $("new-battle").addEventListener("click", () => { if (!streaming) { resetBattle(); status(""); $("prompt").focus(); } });
  for (const b of document.querySelectorAll(".votes button")) b.addEventListener("click", () => vote(b.dataset.winner));
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
    const w = { "1": "model_a", "2": "model_b", "3": "tie", "4": "tie (bothbad)" }[e.key];
    if (w && battle && !battle.voted && !$("vote-a").disabled) vote(w);
  });
  $("refresh").addEventListener("click", loadBoard);
  for (const a of [$("nav-battle"), $("nav-board")]) a.addEventListener("click", (e) => {
    e.preventDefault();
    if (location.pathname !== a.getAttribute("href")) history.pushState(null, "", a.getAttribute("href"));
    showView();
  });
  window.addEventListener("popstate", showView);
  showView();
});
