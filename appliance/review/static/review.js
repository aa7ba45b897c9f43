// The review page: a grid of samples with filters and paging, a detail view with a zoomable,
// pannable side-by-side viewer and a mask overlay, and decisions sent to the server.
// Every text from the dataset (names come from factory folders) goes into the page through
// textContent, never as HTML.
"use strict";

const boot = JSON.parse(document.getElementById("boot").textContent);
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);

const state = {
  items: [], total: 0, page: 1, perPage: 48, selected: new Set(), focus: -1,
  open: null, detail: null, zoom: null, pan: [0, 0],
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function toast(message, bad = false) {
  const box = $("toast");
  box.textContent = message;
  box.className = bad ? "toast show bad" : "toast show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = "toast"; }, bad ? 6000 : 2500);
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
  };
  const response = await fetch(path, {credentials: "same-origin", ...options});
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleString();
}

function score(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value * 10) / 10}/10`;
}

// Filters and grid ---------------------------------------------------------------------------

function queryString() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData($("filters"))) {
    if (value !== "") params.set(key, value);
  }
  params.set("page", state.page);
  params.set("per_page", state.perPage);
  return params.toString();
}

function fillSelect(select, values, label = (v) => v, value = (v) => v) {
  const current = select.value;
  select.replaceChildren(el("option", {value: "", text: "all"}));
  for (const v of values) select.append(el("option", {value: value(v), text: label(v)}));
  select.value = [...select.options].some((o) => o.value === current) ? current : "";
}

function showCounts(counts) {
  $("counts").textContent =
    `${counts.approved} approved · ${counts.rejected} rejected · ${counts.unreviewed} to review`;
}

async function load() {
  // Filters change faster than answers come: only the newest request's answer is shown, and
  // the grid is aria-busy until it is.
  const ticket = (load.ticket = (load.ticket || 0) + 1);
  $("grid").setAttribute("aria-busy", "true");
  let data;
  try {
    data = await api(`/api/items?${queryString()}`);
  } catch (error) {
    if (ticket === load.ticket) {
      $("grid").setAttribute("aria-busy", "false");
      toast(`could not load the samples: ${error.message}`, true);
    }
    return;
  }
  if (ticket !== load.ticket) return;
  const pages = Math.max(1, Math.ceil(data.total / state.perPage));
  if (state.page > pages) { state.page = pages; return load(); }  // the last page emptied
  state.items = data.items;
  state.total = data.total;
  const form = $("filters");
  fillSelect(form.elements.category, data.facets.categories);
  fillSelect(form.elements.defect, data.facets.defects);
  fillSelect(form.elements.batch, data.facets.batches,
             (b) => `${b.id} (${b.command})`, (b) => b.id);
  showCounts(data.counts);
  renderGrid();
  $("grid").setAttribute("aria-busy", "false");
}

function reviewLabel(item) {
  if (item.kind !== "sample") return item.verdict === "failed" ? "failed" : "judge rejected";
  return item.review_state === "unreviewed" ? "to review" : item.review_state;
}

function renderGrid() {
  const grid = $("grid");
  grid.replaceChildren();
  state.items.forEach((item, index) => {
    const selectable = item.kind === "sample";
    const box = el("input", {type: "checkbox", class: "pick", "aria-label": "select",
                             disabled: !selectable});
    box.checked = state.selected.has(item.id);
    box.addEventListener("click", (event) => { event.stopPropagation(); toggle(item.id); });
    const picture = item.kind === "sample"
      ? el("img", {src: `/file/${item.id}/image?thumb=1`, alt: item.name, loading: "lazy"})
      : el("img", {src: `/file/${item.id}/normal?thumb=1`, alt: "normal photo", loading: "lazy",
                   class: "dim"});
    const card = el("div", {
      class: `card ${item.kind} state-${item.review_state || item.verdict}`
        + (index === state.focus ? " focus" : "") + (state.selected.has(item.id) ? " picked" : ""),
      role: "listitem", tabindex: "0", "data-id": item.id,
      onclick: () => openItem(index),
    },
      box, picture,
      el("div", {class: "card-line"},
         el("span", {class: "name", text: `${item.category} / ${item.defect}`}),
         el("span", {class: "score", text: score(item.score)})),
      el("div", {class: "card-line small"},
         el("span", {class: "badge", text: reviewLabel(item)}),
         el("span", {text: item.area !== null ? `${(item.area * 100).toFixed(2)} % area` : ""})),
      item.reason ? el("div", {class: "reason-line small", text: item.reason}) : null,
    );
    grid.append(card);
  });
  if (!state.items.length) grid.append(el("p", {class: "empty", text: "No samples match."}));
  const pages = Math.max(1, Math.ceil(state.total / state.perPage));
  $("page-info").textContent = `page ${state.page} of ${pages} · ${state.total} items`;
  $("prev").disabled = state.page <= 1;
  $("next").disabled = state.page >= pages;
  $("selected-count").textContent = `${state.selected.size} selected`;
}

function toggle(id) {
  if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
  renderGrid();
}

function currentReason(selectId, textId) {
  const text = textId ? $(textId).value.trim() : "";
  return text || $(selectId).value;
}

async function decide(ids, decision, reason) {
  if (!ids.length) { toast("nothing selected"); return false; }
  const reviewer = $("reviewer").value.trim();
  try {
    const data = await api("/api/reviews", {ids, decision, reason, reviewer});
    showCounts(data.counts);
    toast(`${decision} ${data.recorded} sample${data.recorded === 1 ? "" : "s"}`);
    return true;
  } catch (error) {
    toast(`not recorded: ${error.message}`, true);
    return false;
  }
}

// Detail view --------------------------------------------------------------------------------

async function openItem(index) {
  if (index < 0 || index >= state.items.length) return;
  state.focus = index;
  const item = state.items[index];
  let data;
  try {
    data = await api(`/api/items/${encodeURIComponent(item.id)}`);
  } catch (error) {
    toast(`could not open ${item.id}: ${error.message}`, true);
    return;
  }
  state.open = index;
  state.detail = data;
  $("detail").hidden = false;
  document.body.classList.add("detail-open");
  renderDetail(data);
}

function closeDetail() {
  $("detail").hidden = true;
  document.body.classList.remove("detail-open");
  state.open = null;
  renderGrid();
}

function row(table, key, value) {
  if (value === null || value === undefined || value === "") return;
  const text = typeof value === "object" ? JSON.stringify(value) : String(value);
  table.append(el("tr", {}, el("th", {text: key}), el("td", {text})));
}

function renderDetail(data) {
  const record = data.record || {};
  $("detail-title").textContent = `${data.category} / ${data.defect} · ${data.id}`;
  $("detail-verdict").textContent = data.kind === "sample" ? "accepted by the judge"
    : `${data.verdict}: ${record.reason || ""}`;
  $("detail-verdict").className = `verdict ${data.verdict}`;
  $("decide").hidden = data.kind !== "sample";
  $("reason-text").value = "";
  const last = data.history.length ? data.history[data.history.length - 1] : null;
  $("decision").textContent = last
    ? `${last.decision} by ${last.reviewer}, ${when(last.decided_at)}${last.reason ? ` — ${last.reason}` : ""}`
    : "not reviewed yet";
  $("decision").className = `decision ${last ? last.decision : ""}`;
  $("prompt").textContent = record.prompt || "(no instruction: the episode wrote nothing)";

  const judge = $("judge");
  judge.replaceChildren();
  if (data.kind === "sample") {
    judge.append(el("p", {text: `score ${score(record.score)} · location ${record.location_score}/5 · `
      + `quality ${record.quality_score}/5 · defect covers ${(record.mask_area_ratio * 100).toFixed(2)} %`}));
    judge.append(el("p", {class: "muted", text: record.review || ""}));
  } else {
    judge.append(el("p", {text: `scores of its attempts: ${(record.scores || []).join(", ") || "none"}`}));
    for (const error of record.errors || []) judge.append(el("p", {class: "muted", text: error}));
  }

  const attempts = $("attempts");
  attempts.replaceChildren();
  for (const attempt of data.attempts) {
    const report = attempt.report || {};
    attempts.append(el("li", {text: `${attempt.passed ? "passed" : "failed"} · score ${score(report.score)}`
      + ` · “${attempt.prompt}”`}));
  }
  if (!data.attempts.length) attempts.append(el("li", {class: "muted", text: "none recorded"}));

  const history = $("history");
  history.replaceChildren();
  for (const h of data.history) {
    history.append(el("li", {text: `${when(h.decided_at)} · ${h.reviewer} · ${h.decision}`
      + (h.reason ? ` — ${h.reason}` : "")}));
  }
  if (!data.history.length) history.append(el("li", {class: "muted", text: "no decision yet"}));

  const provenance = $("provenance");
  provenance.replaceChildren();
  for (const [key, value] of Object.entries(data.provenance)) row(provenance, key, value);

  const steps = $("steps");
  steps.replaceChildren();
  for (const step of data.steps) {
    const item = el("li", {class: `step ${step.role}`}, el("div", {class: "role", text: step.role}));
    if (step.reasoning) item.append(el("details", {}, el("summary", {text: "reasoning"}),
                                         el("pre", {text: step.reasoning})));
    if (step.text) item.append(el("pre", {text: step.text}));
    for (const src of step.images) item.append(el("img", {src: `${src}?thumb=1`, alt: "step image",
                                                          loading: "lazy"}));
    steps.append(item);
  }
  if (!data.steps.length) steps.append(el("li", {class: "muted", text: "no trajectory kept"}));

  const normal = $("img-normal"), defect = $("img-defect");
  normal.src = data.files.normal || "";
  normal.hidden = !data.files.normal;
  defect.src = data.files.image || "";
  defect.hidden = !data.files.image;
  const layer = $("mask-layer");
  if (data.files.mask) {
    layer.style.setProperty("--mask", `url("${data.files.mask}")`);
    layer.hidden = !$("mask-toggle").checked;
  } else {
    layer.hidden = true;
  }
  applyOpacity();
  // Fit once the picture's size is known: now if it is already decoded, else when it loads.
  state.zoom = null;
  state.pan = [0, 0];
  const shown = data.files.image ? defect : normal;
  const fit = () => zoomTo("fit");
  if (shown.complete && shown.naturalWidth) fit();
  else shown.addEventListener("load", fit, {once: true});
}

function applyOpacity() {
  $("mask-layer").style.opacity = String($("mask-opacity").value / 100);
}

function naturalSize() {
  const image = $("img-defect").hidden ? $("img-normal") : $("img-defect");
  return [image.naturalWidth || 1, image.naturalHeight || 1];
}

function zoomTo(level) {
  // Both viewers share one zoom and pan; zooming keeps the point at the viewer's centre still.
  const viewer = $("viewer-defect");
  const [width, height] = naturalSize();
  const [cx, cy] = [viewer.clientWidth / 2, viewer.clientHeight / 2];
  const fit = Math.min(viewer.clientWidth / width, viewer.clientHeight / height) || 1;
  if (level === "fit") {
    state.zoom = fit;
    state.pan = [cx - (width * fit) / 2, cy - (height * fit) / 2];
  } else {
    const before = state.zoom || fit;
    state.zoom = Math.min(Math.max(level, fit * 0.5), 32);
    const ratio = state.zoom / before;
    state.pan = [cx - (cx - state.pan[0]) * ratio, cy - (cy - state.pan[1]) * ratio];
  }
  applyTransform();
}

function applyTransform() {
  const [width, height] = naturalSize();
  for (const stage of document.querySelectorAll(".stage")) {
    stage.style.width = `${width}px`;
    stage.style.height = `${height}px`;
    stage.style.transform =
      `translate(${state.pan[0]}px, ${state.pan[1]}px) scale(${state.zoom || 1})`;
  }
  $("zoom-level").textContent = `${Math.round((state.zoom || 1) * 100)} %`;
}

function enablePanZoom(viewer) {
  let drag = null;
  viewer.addEventListener("wheel", (event) => {
    event.preventDefault();
    zoomTo((state.zoom || 1) * (event.deltaY < 0 ? 1.25 : 0.8));
  }, {passive: false});
  viewer.addEventListener("pointerdown", (event) => {
    drag = [event.clientX - state.pan[0], event.clientY - state.pan[1]];
    viewer.setPointerCapture(event.pointerId);
  });
  viewer.addEventListener("pointermove", (event) => {
    if (!drag) return;
    state.pan = [event.clientX - drag[0], event.clientY - drag[1]];
    applyTransform();
  });
  viewer.addEventListener("pointerup", () => { drag = null; });
}

async function decideOpen(decision) {
  if (!state.detail || state.detail.kind !== "sample") return;
  const reason = decision === "rejected" ? currentReason("reason", "reason-text") : null;
  const decided = state.detail.id;
  if (await decide([decided], decision, reason)) {
    const index = state.open;
    await load();
    if (index === null || !state.items.length) { closeDetail(); return; }
    // Under a "not reviewed" filter the decided sample has left the list: the next one now
    // sits at its old place.
    const stayed = state.items[index] && state.items[index].id === decided;
    openItem(Math.min(stayed ? index + 1 : index, state.items.length - 1));
  }
}

// Wiring -------------------------------------------------------------------------------------

function wire() {
  const saved = localStorage.getItem("reviewer");
  $("reviewer").value = saved || boot.reviewer;
  $("reviewer").addEventListener("change", () => localStorage.setItem("reviewer", $("reviewer").value.trim()));
  for (const id of ["reason", "bulk-reason"]) {
    for (const reason of boot.reasons) $(id).append(el("option", {value: reason, text: reason}));
  }
  $("filters").addEventListener("change", () => { state.page = 1; state.selected.clear(); load(); });
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("prev").addEventListener("click", () => { state.page -= 1; state.focus = -1; load(); });
  $("next").addEventListener("click", () => { state.page += 1; state.focus = -1; load(); });
  $("select-page").addEventListener("click", () => {
    for (const item of state.items) if (item.kind === "sample") state.selected.add(item.id);
    renderGrid();
  });
  $("select-none").addEventListener("click", () => { state.selected.clear(); renderGrid(); });
  $("bulk-approve").addEventListener("click", async () => {
    if (await decide([...state.selected], "approved", null)) { state.selected.clear(); load(); }
  });
  $("bulk-reject").addEventListener("click", async () => {
    if (await decide([...state.selected], "rejected", $("bulk-reason").value)) {
      state.selected.clear(); load();
    }
  });
  $("approve").addEventListener("click", () => decideOpen("approved"));
  $("reject").addEventListener("click", () => decideOpen("rejected"));
  $("close").addEventListener("click", closeDetail);
  $("detail-prev").addEventListener("click", () => openItem(state.open - 1));
  $("detail-next").addEventListener("click", () => openItem(state.open + 1));
  $("mask-toggle").addEventListener("change", () => {
    $("mask-layer").hidden = !$("mask-toggle").checked || !(state.detail && state.detail.files.mask);
  });
  $("mask-opacity").addEventListener("input", applyOpacity);
  $("zoom-in").addEventListener("click", () => zoomTo((state.zoom || 1) * 1.5));
  $("zoom-out").addEventListener("click", () => zoomTo((state.zoom || 1) / 1.5));
  $("zoom-fit").addEventListener("click", () => zoomTo("fit"));
  $("zoom-full").addEventListener("click", () => zoomTo(1));
  for (const viewer of document.querySelectorAll(".viewer")) enablePanZoom(viewer);
  $("help-button").addEventListener("click", () => $("help").showModal());
  $("help-close").addEventListener("click", () => $("help").close());
  if (boot.can_export) {
    $("export").hidden = false;
    $("export").addEventListener("click", async () => {
      try {
        const data = await api("/api/export", {approved_only: true});
        toast(`exported ${data.samples} approved samples to ${data.out}`);
      } catch (error) {
        toast(`export failed: ${error.message}`, true);
      }
    });
  }
  document.addEventListener("keydown", onKey);
}

function onKey(event) {
  const target = event.target;
  if (target.matches("input, select, textarea") && event.key !== "Escape") return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const open = state.open !== null;
  const keys = {
    Escape: () => (open ? closeDetail() : $("help").close()),
    "?": () => $("help").showModal(),
    ArrowRight: () => open && openItem(state.open + 1),
    ArrowLeft: () => open && openItem(state.open - 1),
    j: () => { if (!open) { state.focus = Math.min(state.focus + 1, state.items.length - 1); renderGrid(); } },
    k: () => { if (!open) { state.focus = Math.max(state.focus - 1, 0); renderGrid(); } },
    Enter: () => !open && state.focus >= 0 && openItem(state.focus),
    x: () => { const item = state.items[state.focus]; if (!open && item && item.kind === "sample") toggle(item.id); },
    a: () => (open ? decideOpen("approved") : $("bulk-approve").click()),
    r: () => (open ? decideOpen("rejected") : $("bulk-reject").click()),
    m: () => { if (open) { $("mask-toggle").click(); } },
    "+": () => open && zoomTo((state.zoom || 1) * 1.5),
    "=": () => open && zoomTo((state.zoom || 1) * 1.5),
    "-": () => open && zoomTo((state.zoom || 1) / 1.5),
    0: () => open && zoomTo("fit"),
    1: () => open && zoomTo(1),
  };
  const action = keys[event.key];
  if (action) { event.preventDefault(); action(); }
}

wire();
load();
