// The code search page. Text from the index only ever goes into the page through textContent.
"use strict";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, {headers: {accept: "application/json"}});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function loadStatus() {
  const status = document.getElementById("status");
  try {
    const data = await getJSON("/api/status");
    const languages = new Set();
    const repoSelect = document.getElementById("repo");
    for (const repo of data.repos) {
      repoSelect.append(new Option(repo.repo, repo.repo));
      Object.keys(repo.languages).forEach((l) => languages.add(l));
    }
    const languageSelect = document.getElementById("language");
    [...languages].sort().forEach((l) => languageSelect.append(new Option(l, l)));
    document.getElementById("rerank-label").hidden = !data.rerank;
    const files = data.repos.reduce((n, r) => n + r.files, 0);
    const chunks = data.repos.reduce((n, r) => n + r.chunks, 0);
    status.textContent = data.repos.length
      ? `${data.repos.length} ${data.repos.length === 1 ? "repository" : "repositories"}, ${files} files, ` +
        `${chunks} chunks (` +
        data.repos.map((r) => `${r.repo}: ${r.files} files`).join(", ") + ")"
      : "the index is empty: run `embedfleet codesearch index PATH`";
  } catch (error) {
    status.textContent = `cannot read the index status: ${error.message}`;
  }
}

function renderHit(hit) {
  const item = el("li", "hit");
  const head = el("div", "hit-head");
  const link = el("a", "location", `${hit.path}:${hit.start_line}`);
  const params = new URLSearchParams({repo: hit.repo, path: hit.path, line: String(hit.start_line)});
  link.href = `/view?${params}#L-${hit.start_line}`;  // pygments names line N "L-N"
  head.append(link, el("span", "symbol", hit.symbol || ""), el("span", "meta", `${hit.repo} · ${hit.language}`),
              el("span", "score", hit.score.toFixed(3)));
  const pre = el("pre", "code");
  const gutter = el("span", "gutter");
  const lines = hit.text.split("\n").length;
  gutter.textContent = Array.from({length: lines}, (_, i) => String(hit.start_line + i)).join("\n");
  const code = el("code");
  for (const [cls, text] of hit.tokens) code.append(cls ? el("span", cls, text) : document.createTextNode(text));
  pre.append(gutter, code);
  item.append(head, pre);
  return item;
}

async function runSearch(event) {
  event.preventDefault();
  const message = document.getElementById("message");
  const results = document.getElementById("results");
  const params = new URLSearchParams({q: document.getElementById("q").value});
  for (const name of ["repo", "language"]) {
    const value = document.getElementById(name).value;
    if (value) params.set(name, value);
  }
  if (document.getElementById("rerank").checked) params.set("rerank", "true");
  message.textContent = "searching…";
  results.replaceChildren();
  try {
    const data = await getJSON(`/api/search?${params}`);
    results.replaceChildren(...data.hits.map(renderHit));
    message.textContent = data.hits.length ? `${data.hits.length} results` : "no results";
  } catch (error) {
    message.textContent = `search failed: ${error.message}`;
  }
}

document.getElementById("search").addEventListener("submit", runSearch);
loadStatus();
