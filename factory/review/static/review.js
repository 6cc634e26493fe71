// factory review: keyboard shortcuts, the judge-message loader and the banner refresh.
// Served as a file (the Content-Security-Policy forbids inline scripts); every text from the
// server is inserted with textContent, never as HTML.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;

  function typing(e) {
    const t = e.target;
    return t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.tagName === "SELECT" || t.isContentEditable);
  }
  function go(url) { if (url) window.location.href = url; }

  // -- queue: a selected row moved with j/k, opened with Enter. Nothing is selected at first: the first
  // j selects the first row, and Enter before any j opens the first row.
  const rows = Array.from(document.querySelectorAll("#queue tbody tr"));
  let sel = rows.findIndex(r => r.classList.contains("selected"));
  function select(i) {
    if (!rows.length) return;
    sel = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach((r, k) => r.classList.toggle("selected", k === sel));
    rows[sel].scrollIntoView({block: "nearest"});
  }
  rows.forEach((r, k) => r.addEventListener("click", e => {
    if (e.target.tagName !== "A") { select(k); go(r.dataset.href); }
  }));

  function verdictButton(key) {
    return document.querySelector(`#verdict-form button[data-key="${key}"]`);
  }

  document.addEventListener("keydown", e => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (typing(e)) {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    const k = e.key;
    if (page === "queue") {
      if (k === "j" || k === "ArrowDown" || k === "ArrowRight") { select(sel + 1); e.preventDefault(); }
      else if (k === "k" || k === "ArrowUp" || k === "ArrowLeft") { select(sel - 1); e.preventDefault(); }
      else if ((k === "Enter" || k === "o") && rows.length) { go(rows[Math.max(sel, 0)].dataset.href); }
      return;
    }
    if (page !== "pair") return;
    if (k === "j" || k === "ArrowRight") { go(body.dataset.next); }
    else if (k === "k" || k === "ArrowLeft") { go(body.dataset.prev); }
    else if (["1", "2", "3", "4"].includes(k)) {
      const b = verdictButton(k);
      if (b) { e.preventDefault(); b.form.requestSubmit(b); }
    }
    else if (k === "u") {
      const f = document.getElementById("undo-form");
      if (f) { e.preventDefault(); f.requestSubmit(); }
    }
    else if (k === "n") {
      const n = document.getElementById("note");
      if (n) { e.preventDefault(); n.focus(); }
    }
  });

  // -- the exact messages a judge received, fetched on demand
  document.querySelectorAll("button.messages").forEach(btn => btn.addEventListener("click", async () => {
    const id = btn.dataset.judgement;
    const out = document.getElementById("messages-" + id);
    const row = out.closest("tr");
    if (!row.hidden) { row.hidden = true; btn.textContent = "show messages"; return; }
    row.hidden = false;
    btn.textContent = "hide messages";
    out.textContent = "loading…";
    try {
      const r = await fetch(`/judgement/${encodeURIComponent(id)}/messages`, {credentials: "same-origin"});
      const data = await r.json();
      out.textContent = "";
      if (!r.ok) { out.textContent = data.error || `error ${r.status}`; return; }
      for (const m of data.messages) {
        const div = document.createElement("div");
        div.className = "msg";
        const role = document.createElement("div");
        role.className = "role";
        role.textContent = m.role;
        const text = document.createElement("div");
        text.className = "text";
        text.textContent = m.content;
        div.append(role, text);
        out.append(div);
      }
    } catch (err) {
      out.textContent = "could not load the messages: " + err;
    }
  }));

  // -- the banner follows the background copy (queued → saved) without a reload
  const banner = document.getElementById("banner");
  async function refreshBanner() {
    try {
      const r = await fetch("/status", {credentials: "same-origin"});
      if (!r.ok) return;
      const s = await r.json();
      banner.textContent = "";
      for (const [level, text] of s.banner) {
        const p = document.createElement("p");
        p.className = "banner " + level;
        p.textContent = text;
        banner.append(p);
      }
      banner.dataset.pending = s.pending;
    } catch (err) { /* the app stopped: keep the last banner */ }
  }
  if (banner) setInterval(refreshBanner, 3000);
})();
