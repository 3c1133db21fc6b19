// sketchgan studio: the page. Plain script, no build step; talks to the JSON API of pipeline/studio/app.py.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);

  // Small element builder: keeps the rendering code readable without a framework.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // Only touch the DOM when a value really changes: polling would otherwise cause needless repaints.
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // -- messages --------------------------------------------------------------------------------------------
  const messageBox = $("#message");
  let messageTimer = null;

  function showMessage(text, kind) {
    clearTimeout(messageTimer);
    messageBox.textContent = text;
    messageBox.dataset.kind = kind;
    // successes are confirmations and fade; errors stay until the next message so they can be read
    if (kind === "success") messageTimer = setTimeout(() => { messageBox.textContent = ""; }, 8000);
  }
  const showError = (text) => showMessage(text, "error");
  function clearMessage() {
    clearTimeout(messageTimer);
    messageBox.textContent = "";
  }
  const showSuccess = (text) => showMessage(text, "success");

  // -- requests ----------------------------------------------------------------------------------------------
  // FastAPI errors carry {"detail": str} or, for validation errors, {"detail": [{msg, loc, ...}]}.
  function detailText(data) {
    if (!data || data.detail === undefined || data.detail === null) return "";
    const detail = data.detail;
    if (Array.isArray(detail)) return detail.map((d) => (d && d.msg ? d.msg : String(d))).join("; ");
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  }

  async function api(path, body) {
    const options = { method: body === undefined ? "GET" : "POST", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error(`the studio server cannot be reached (${err.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null; // a proxy's HTML error page, say: fall back to the status line
    }
    if (!response.ok) throw new Error(detailText(data) || `${response.status} ${response.statusText}`.trim());
    return data;
  }

  // An <img> that failed tells us nothing; asking again with fetch recovers the server's detail.
  async function explainImageError(url) {
    try {
      const response = await fetch(url);
      if (response.ok) return "the picture could not be shown";
      const data = await response.json().catch(() => null);
      return detailText(data) || `${response.status} ${response.statusText}`;
    } catch (err) {
      return `the studio server cannot be reached (${err.message})`;
    }
  }

  // Disables the button and says "working…" while a request is in flight; errors go to #message.
  async function busy(button, work) {
    if (button.disabled) return undefined;
    const label = button.textContent;
    clearMessage(); // an old error would otherwise seem to describe this new request
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = "working…";
    try {
      return await work();
    } catch (err) {
      showError(err.message);
      return undefined;
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      button.textContent = label;
    }
  }

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`${file.name}: cannot be read`));
      reader.readAsDataURL(file);
    });
  }

  function intOrNull(input) {
    const value = input.value.trim();
    return value === "" ? null : Number.parseInt(value, 10);
  }

  function numberOrNull(input) {
    const value = input.value.trim();
    return value === "" ? null : Number(value);
  }

  // The models make 32 px tiles: scale them up by a whole factor so pixels stay square and crisp.
  const MAX_PICTURE_WIDTH = 768;
  function fitPixelated(img) {
    const natural = img.naturalWidth;
    if (!natural) return;
    const room = Math.min(MAX_PICTURE_WIDTH, (img.parentElement && img.parentElement.clientWidth) || natural);
    const factor = Math.max(1, Math.floor(room / natural));
    img.style.width = `${natural * factor}px`;
  }

  function showPicture(img, src) {
    img.hidden = false;
    img.src = src;
  }

  for (const img of document.querySelectorAll("img.pixelated")) {
    img.addEventListener("load", () => fitPixelated(img));
  }

  // Fill a <select> with options, keeping the user's choice when it is still offered.
  function fillSelect(select, items, preferred) {
    const keep = preferred !== undefined ? preferred : select.value;
    const signature = JSON.stringify(items);
    if (select.dataset.items !== signature) {
      select.dataset.items = signature;
      select.replaceChildren(...items.map((item) => el("option", { value: item.value, text: item.label })));
    }
    if (items.some((item) => item.value === keep)) select.value = keep;
    return select.value;
  }

  // -- tabs ----------------------------------------------------------------------------------------------------
  const VIEWS = ["draw", "runs", "compare", "models", "use"];
  let currentView = "draw";

  function showView(name) {
    if (!VIEWS.includes(name)) return;
    currentView = name;
    for (const view of VIEWS) {
      const tab = $(`#tab-${view}`);
      const selected = view === name;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`#view-${view}`).hidden = !selected;
    }
    // the address remembers the view, so a reload stays where the user was
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    onViewShown(name);
  }

  function onViewShown(name) {
    if (name === "runs") {
      loadSketchSets();
      pollRuns();
    } else if (name === "compare") {
      pollRuns();
      loadBenchmarks();
    } else if (name === "models") {
      loadModels();
    } else if (name === "use") {
      loadTargets();
    }
  }

  const tablist = $(".tabs");
  tablist.addEventListener("click", (event) => {
    const tab = event.target.closest("[role=tab]");
    if (tab) showView(tab.id.replace("tab-", ""));
  });
  // arrow keys move between tabs, as in a native tab list
  tablist.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = VIEWS[(VIEWS.indexOf(currentView) + step + VIEWS.length) % VIEWS.length];
    showView(next);
    $(`#tab-${next}`).focus();
    event.preventDefault();
  });

  // -- draw: the canvas ------------------------------------------------------------------------------------
  const canvas = $("#canvas");
  const ctx = canvas.getContext("2d");
  const penButton = $("#tool-pen");
  const eraserButton = $("#tool-eraser");
  const widthInput = $("#stroke-width");
  const MAX_UNDO = 40; // each snapshot is 1 MB at 512x512

  let tool = "pen";
  let undoStack = [];
  let stroke = null; // {pointerId, x, y} while drawing
  let blank = true; // an empty canvas is not worth a request

  function paintWhite() {
    ctx.save();
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.restore();
  }

  function snapshot() {
    undoStack.push({ image: ctx.getImageData(0, 0, canvas.width, canvas.height), blank });
    if (undoStack.length > MAX_UNDO) undoStack.shift();
  }

  function setTool(name) {
    tool = name;
    penButton.setAttribute("aria-pressed", String(name === "pen"));
    eraserButton.setAttribute("aria-pressed", String(name === "eraser"));
    canvas.dataset.tool = name;
  }

  // The canvas is drawn at 512x512 but shown smaller: map CSS pixels to canvas pixels.
  function canvasPoint(event) {
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
    };
  }

  function strokeStyle() {
    ctx.strokeStyle = ctx.fillStyle = tool === "eraser" ? "#fff" : "#000";
    ctx.lineWidth = Number(widthInput.value);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (stroke || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    try {
      canvas.setPointerCapture(event.pointerId); // strokes may leave the canvas and come back
    } catch {
      // a synthetic or already-gone pointer cannot be captured; drawing still works without it
    }
    snapshot();
    const point = canvasPoint(event);
    stroke = { pointerId: event.pointerId, ...point };
    strokeStyle();
    // a tap leaves a dot
    ctx.beginPath();
    ctx.arc(point.x, point.y, ctx.lineWidth / 2, 0, Math.PI * 2);
    ctx.fill();
    if (tool === "pen") blank = false;
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    // coalesced events keep fast strokes smooth
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    ctx.beginPath();
    ctx.moveTo(stroke.x, stroke.y);
    for (const e of events.length ? events : [event]) {
      const point = canvasPoint(e);
      ctx.lineTo(point.x, point.y);
      stroke.x = point.x;
      stroke.y = point.y;
    }
    ctx.stroke();
  });

  function endStroke(event) {
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    stroke = null;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("lostpointercapture", endStroke);

  penButton.addEventListener("click", () => setTool("pen"));
  eraserButton.addEventListener("click", () => setTool("eraser"));
  widthInput.addEventListener("input", () => setText($("#stroke-width-value"), widthInput.value));

  $("#undo").addEventListener("click", () => {
    const last = undoStack.pop();
    if (!last) return;
    ctx.putImageData(last.image, 0, 0);
    blank = last.blank;
  });

  // Ctrl/Cmd+Z undoes a stroke, unless the user is typing in a field
  document.addEventListener("keydown", (event) => {
    if (currentView !== "draw" || !(event.ctrlKey || event.metaKey) || event.key.toLowerCase() !== "z") return;
    if (event.target.closest("input, select, textarea")) return;
    event.preventDefault();
    $("#undo").click();
  });

  $("#clear").addEventListener("click", () => {
    if (blank) return;
    snapshot();
    paintWhite();
    blank = true;
  });

  function resetCanvas() {
    paintWhite();
    undoStack = [];
    blank = true;
  }

  // -- draw: the sketch list -----------------------------------------------------------------------------------
  let sketches = []; // {original: data URL as drawn/uploaded (what is saved), preview: data URL as trained}

  function renderSketches() {
    const list = $("#sketch-list");
    list.replaceChildren(...sketches.map((sketch, index) =>
      el("figure", { className: "sketch-item" },
        el("img", { className: "sketch-thumb", src: sketch.preview, alt: `sketch ${index + 1}`,
                    width: 96, height: 96 }),
        el("button", { type: "button", className: "sketch-remove", "aria-label": `remove sketch ${index + 1}`,
                       title: "remove", text: "×",
                       onclick: () => { sketches.splice(index, 1); renderSketches(); } }))));
    $("#sketch-empty").hidden = sketches.length > 0;
    $("#sketch-count").textContent = `${sketches.length} ${sketches.length === 1 ? "sketch" : "sketches"}`;
  }

  async function addSketch(original) {
    const result = await api("/api/sketches/preview", { image: original });
    sketches.push({ original, preview: result.preview });
    renderSketches();
  }

  const addButton = $("#add-sketch");
  addButton.addEventListener("click", () => busy(addButton, async () => {
    if (blank) {
      showError("draw something first");
      return;
    }
    await addSketch(canvas.toDataURL("image/png"));
    resetCanvas();
  }));

  const uploadInput = $("#upload");
  uploadInput.addEventListener("change", async () => {
    const files = Array.from(uploadInput.files || []);
    clearMessage();
    const label = uploadInput.closest("label");
    label.classList.add("working");
    const errors = [];
    let added = 0;
    // one at a time: the server is small and the order of the list follows the files'
    for (const file of files) {
      try {
        await addSketch(await readFile(file));
        added += 1;
      } catch (err) {
        errors.push(files.length > 1 ? `${file.name}: ${err.message}` : err.message);
      }
    }
    label.classList.remove("working");
    uploadInput.value = ""; // the same file can be chosen again
    if (errors.length) showError(errors.join("\n"));
    else if (added) showSuccess(`added ${added} ${added === 1 ? "sketch" : "sketches"}`);
  });

  // -- draw: the base model's samples --------------------------------------------------------------------------
  const baseSamples = $("#base-samples");
  let baseSeed = 0;

  function showBaseSamples() {
    baseSamples.classList.remove("broken");
    baseSamples.src = `/api/base/samples.png?n=4&seed=${baseSeed}`;
  }
  baseSamples.addEventListener("error", async () => {
    if (!baseSamples.getAttribute("src")) return;
    baseSamples.classList.add("broken");
    showError(`base samples: ${await explainImageError(baseSamples.src)}`);
  });
  $("#base-resample").addEventListener("click", () => {
    baseSeed = Math.floor(Math.random() * 100000);
    showBaseSamples();
  });

  // -- draw: save --------------------------------------------------------------------------------------------------
  const saveButton = $("#save-set");
  saveButton.addEventListener("click", () => busy(saveButton, async () => {
    const name = $("#set-name").value.trim();
    const body = { name, sketches: sketches.map((s) => s.original), replace: $("#set-replace").checked };
    const saved = await api("/api/sketchsets", body);
    showSuccess(`saved sketch set ${saved.name} (${saved.count} sketches)`);
    await loadSketchSets(saved.name);
  }));

  // -- runs: the form ----------------------------------------------------------------------------------------------
  let info = null;

  async function loadInfo() {
    try {
      info = await api("/api/info");
    } catch (err) {
      showError(err.message);
      return;
    }
    fillSelect($("#run-base"), (info.bases || []).map((b) => ({ value: b.id, label: b.label })));
    const defaults = info.defaults || {};
    const augments = info.augment_choices || [];
    fillSelect($("#run-augment"), augments.map((a) => ({ value: a, label: a === "" ? "none" : a })),
               defaults.augment ?? "");
    if (defaults.iterations != null) $("#run-iterations").value = defaults.iterations;
    if (defaults.lambda_image != null) $("#run-lambda-image").value = defaults.lambda_image;
  }

  async function loadSketchSets(preferred) {
    let data;
    try {
      data = await api("/api/sketchsets");
    } catch (err) {
      showError(err.message);
      return;
    }
    const items = (data.sketchsets || []).map((s) => ({
      value: s.name,
      label: `${s.name} (${s.count ?? "?"} sketches)`,
    }));
    const select = $("#run-set");
    fillSelect(select, items, preferred);
    select.disabled = items.length === 0;
    if (!items.length) {
      select.replaceChildren(el("option", { value: "", text: "no sketch sets yet: save one in draw" }));
      delete select.dataset.items;
    }
  }

  const launchButton = $("#launch");
  $("#run-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(launchButton, async () => {
      const body = {
        sketch_set: $("#run-set").value,
        base: $("#run-base").value || "base",
        iterations: intOrNull($("#run-iterations")),
        lambda_image: numberOrNull($("#run-lambda-image")),
        augment: $("#run-augment").value,
      };
      const run = await api("/api/runs", body);
      showSuccess(`launched run ${run.id}`);
      pollRuns();
    });
  });

  // -- runs: the list, polled ----------------------------------------------------------------------------------
  const POLL_MS = 1500;
  const POLL_AFTER_ERROR_MS = 5000;
  const ACTIVE = new Set(["PENDING", "RUNNING"]);
  let runs = [];
  let pollTimer = null;
  let polling = false;
  const knownStatus = new Map(); // run id -> last status seen, to notice runs that finish

  function formatEta(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `ETA ${s} s`;
    if (s < 3600) return `ETA ${Math.floor(s / 60)} min ${s % 60} s`;
    return `ETA ${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function formatLoss(value) {
    return typeof value === "number" && Number.isFinite(value) ? Number(value.toPrecision(3)).toString() : String(value);
  }

  function formatCreated(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso || "") : date.toLocaleString();
  }

  function createRunArticle(run) {
    const article = el("article", { className: "run card", "data-run-id": run.id },
      el("header", { className: "run-head" },
        el("h3", { className: "run-title" },
          el("span", { className: "run-set", text: run.sketch_set }), " ",
          el("code", { className: "run-id", text: run.id })),
        el("span", { className: "run-status" })),
      el("p", { className: "run-meta hint" }),
      el("progress", { className: "run-progress", max: 1, value: 0 }),
      el("p", { className: "run-numbers" },
        el("span", { className: "run-iteration" }), " ",
        el("span", { className: "run-eta" })),
      el("p", { className: "run-losses" }),
      el("figure", { className: "run-figure", hidden: true },
        el("img", { className: "run-sample pixelated", alt: `latest samples of run ${run.id}` }),
        el("figcaption", { className: "run-sample-caption hint" })),
      el("pre", { className: "run-error", hidden: true }),
      el("div", { className: "run-actions" },
        el("button", { type: "button", className: "run-cancel", hidden: true, text: "cancel" }),
        el("button", { type: "button", className: "run-compare primary", hidden: true, text: "compare" })));

    const sample = $(".run-sample", article);
    sample.addEventListener("load", () => fitPixelated(sample));
    const cancelButton = $(".run-cancel", article);
    cancelButton.addEventListener("click", () => busy(cancelButton, async () => {
      await api(`/api/runs/${encodeURIComponent(run.id)}/cancel`, {});
      showSuccess(`stopping run ${run.id}`);
      pollRuns();
    }));
    $(".run-compare", article).addEventListener("click", () => openCompare(run.id));
    return article;
  }

  function updateRunArticle(article, run) {
    if (article.dataset.status !== run.status) article.dataset.status = run.status;
    const status = $(".run-status", article);
    setText(status, run.status);
    status.dataset.status = run.status;

    const settings = run.settings || {};
    const meta = [`base: ${run.base}`, formatCreated(run.created)];
    if (settings.lambda_image != null) meta.push(`λ image ${settings.lambda_image}`);
    if (settings.augment != null) meta.push(`augment ${settings.augment || "none"}`);
    setText($(".run-meta", article), meta.join(" · "));

    const progress = $(".run-progress", article);
    const total = Math.max(1, run.iterations || 0);
    if (Number(progress.max) !== total) progress.max = total;
    if (Number(progress.value) !== (run.iteration || 0)) progress.value = run.iteration || 0;
    setText($(".run-iteration", article), `iteration ${run.iteration ?? 0} / ${run.iterations ?? "?"}`);
    setText($(".run-eta", article), formatEta(run.eta_seconds));

    const losses = Object.entries(run.losses || {}).map(([name, value]) => `${name}=${formatLoss(value)}`);
    setText($(".run-losses", article), losses.join("  "));

    const figure = $(".run-figure", article);
    if (run.sample_iteration !== null && run.sample_iteration !== undefined) {
      const sample = $(".run-sample", article);
      // a new src only for a new sample: the same src would reload and flicker
      if (sample.dataset.iteration !== String(run.sample_iteration)) {
        sample.dataset.iteration = String(run.sample_iteration);
        sample.src = `/api/runs/${encodeURIComponent(run.id)}/sample.png?it=${run.sample_iteration}`;
      }
      setText($(".run-sample-caption", article), `samples at iteration ${run.sample_iteration} (fixed latents)`);
      figure.hidden = false;
    } else {
      figure.hidden = true;
    }

    const error = $(".run-error", article);
    const failed = run.status === "FAILED";
    setText(error, failed ? run.error || "the run failed without a message" : "");
    error.hidden = !failed;

    $(".run-cancel", article).hidden = !ACTIVE.has(run.status);
    $(".run-compare", article).hidden = run.status !== "SUCCEEDED";
  }

  function renderRuns() {
    const container = $("#runs");
    const existing = new Map(Array.from(container.querySelectorAll("article.run"), (a) => [a.dataset.runId, a]));
    let previous = null;
    for (const run of runs) {
      let article = existing.get(run.id);
      if (article) existing.delete(run.id);
      else article = createRunArticle(run);
      updateRunArticle(article, run);
      // keep the server's order (newest first) while moving as few nodes as possible
      const wanted = previous ? previous.nextElementSibling : container.firstElementChild;
      if (wanted !== article) container.insertBefore(article, wanted);
      previous = article;
    }
    for (const stale of existing.values()) stale.remove();
    $("#runs-empty").hidden = runs.length > 0;
  }

  async function pollRuns() {
    clearTimeout(pollTimer);
    pollTimer = null;
    if (polling) return; // the request in flight reschedules itself
    polling = true;
    let delay = POLL_MS;
    try {
      // a hidden browser tab does not need fresh numbers
      if (!document.hidden) {
        const data = await api("/api/runs");
        runs = data.runs || [];
        renderRuns();
        updateCompareRuns();
        noticeFinishedRuns();
      }
    } catch (err) {
      showError(err.message);
      delay = POLL_AFTER_ERROR_MS;
    } finally {
      polling = false;
    }
    const active = runs.some((run) => ACTIVE.has(run.status));
    if (currentView === "runs" || active) pollTimer = setTimeout(pollRuns, delay);
  }

  // A finished run is a new target (use view) and maybe a new registered model.
  function noticeFinishedRuns() {
    let changed = false;
    for (const run of runs) {
      const before = knownStatus.get(run.id);
      if (before !== undefined && before !== run.status && run.status === "SUCCEEDED") changed = true;
      knownStatus.set(run.id, run.status);
    }
    if (changed) loadTargets();
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && pollTimer) pollRuns();
  });

  // -- compare ---------------------------------------------------------------------------------------------------------
  const compareSelect = $("#compare-run");
  const compareImage = $("#compare-image");
  const compareButton = $("#compare-show");

  function updateCompareRuns(preferred) {
    const done = runs.filter((run) => run.status === "SUCCEEDED")
      .map((run) => ({ value: run.id, label: `${run.sketch_set} · ${run.id}` }));
    fillSelect(compareSelect, done, preferred);
    compareSelect.disabled = done.length === 0;
    if (!done.length) {
      compareSelect.replaceChildren(el("option", { value: "", text: "no finished runs yet" }));
      delete compareSelect.dataset.items;
    }
  }

  // The picture takes seconds to render: the button stays busy until the image loads or fails.
  let compareShown = { id: "", seed: 0 };

  function showCompare() {
    const id = compareSelect.value;
    if (!id) {
      showError("no finished run to compare yet");
      return;
    }
    const seed = intOrNull($("#compare-seed")) ?? 0;
    const url = `/api/runs/${encodeURIComponent(id)}/compare.png?n=8&seed=${seed}`;
    const loaded = compareImage.complete && compareImage.naturalWidth > 0 && !compareImage.hidden;
    if (compareImage.getAttribute("src") === url && loaded) return;
    compareShown = { id, seed };
    if (compareButton.disabled) {
      // a picture is on its way: replace it; the listeners below settle on whichever arrives last
      showPicture(compareImage, url);
      return;
    }
    busy(compareButton, () => new Promise((resolve) => {
      const done = () => {
        compareImage.removeEventListener("load", onLoad);
        compareImage.removeEventListener("error", onError);
        resolve();
      };
      const onLoad = () => {
        compareImage.alt = `sketches, base and customised samples of run ${compareShown.id}, seed ${compareShown.seed}`;
        done();
      };
      const onError = async () => {
        done();
        compareImage.hidden = true;
        showError(await explainImageError(compareImage.src));
      };
      compareImage.addEventListener("load", onLoad);
      compareImage.addEventListener("error", onError);
      showPicture(compareImage, url);
    }));
  }

  compareButton.addEventListener("click", showCompare);
  compareSelect.addEventListener("change", showCompare);

  function openCompare(runId) {
    updateCompareRuns(runId);
    showView("compare");
    if (compareSelect.value === runId) showCompare();
  }

  function dash(value, format = String) {
    return value === null || value === undefined || (typeof value === "number" && !Number.isFinite(value))
      ? "-" : format(value);
  }
  const fixed2 = (value) => Number(value).toFixed(2);

  async function loadBenchmarks() {
    let data;
    try {
      data = await api("/api/benchmarks");
    } catch (err) {
      showError(err.message);
      return;
    }
    const rows = data.rows || [];
    const cell = (value, numeric) => el("td", { className: numeric ? "num" : null, text: value });
    $("#benchmark-table tbody").replaceChildren(...rows.map((r) => el("tr", {},
      cell(dash(r.benchmark)), cell(dash(r.model)), cell(dash(r.version)), cell(dash(r.sketch_set)),
      cell(dash(r.fid, fixed2), true), cell(dash(r.fid_base, fixed2), true),
      cell(dash(r.kid, (k) => (k * 1000).toFixed(2)), true), cell(dash(r.target_share, fixed2), true),
      cell(dash(r.n), true))));
    if (!rows.length) {
      $("#benchmark-table tbody").append(el("tr", { className: "empty-row" },
        el("td", { colspan: 9, text: "no benchmark results yet (run sketchgan benchmark)" })));
    }
  }

  // -- models ---------------------------------------------------------------------------------------------------------
  async function loadModels() {
    let data;
    try {
      data = await api("/api/models");
    } catch (err) {
      showError(err.message);
      return;
    }
    const models = data.models || [];
    const errorBox = $("#models-error");
    errorBox.textContent = data.error || "";
    errorBox.hidden = !data.error;

    const rows = [];
    for (const model of models) {
      for (const version of model.versions || []) {
        const champion = model.champion !== null && String(model.champion) === String(version.version);
        const aliases = (version.aliases || []).map((alias) =>
          el("span", { className: champion && alias === "champion" ? "alias champion" : "alias", text: alias }));
        rows.push(el("tr", { className: champion ? "is-champion" : null },
          el("td", { text: model.name }),
          el("td", { text: String(version.version) }),
          el("td", {}, el("span", { className: "alias-list" }, ...(aliases.length ? aliases : ["-"]))),
          el("td", { className: "num", text: dash(version.fid, fixed2) }),
          el("td", {}, el("button", { type: "button", className: "model-use small", text: "use",
                                     "aria-label": `use ${model.name} version ${version.version}`,
                                     onclick: () => openUse(version.ref, `${model.name} v${version.version}`) }))));
      }
    }
    if (!rows.length && !data.error) {
      rows.push(el("tr", { className: "empty-row" }, el("td", { colspan: 5, text: "no registered models yet" })));
    }
    $("#models-table tbody").replaceChildren(...rows);
  }

  // -- use: targets ---------------------------------------------------------------------------------------------------
  let targets = [{ ref: "base", label: "base" }];
  let requestedTarget = null; // chosen in the models view; kept while the list is reloaded

  async function loadTargets() {
    try {
      const data = await api("/api/targets");
      targets = data.targets || [];
    } catch (err) {
      showError(err.message);
    }
    if (requestedTarget && !targets.some((t) => t.ref === requestedTarget.ref)) targets.push(requestedTarget);
    fillTargets();
  }

  function fillTargets(preferredModel) {
    const items = targets.map((t) => ({ value: t.ref, label: t.label }));
    fillSelect($("#use-model"), items, preferredModel);
    fillSelect($("#blend-a"), items);
    const blendB = $("#blend-b");
    const hadB = blendB.dataset.items !== undefined;
    fillSelect(blendB, items);
    // b defaults to something other than a, so the first blend shows a change
    if (!hadB && items.length > 1) blendB.value = items[1].value;
    const project = $("#project-target");
    const hadProject = project.dataset.items !== undefined;
    fillSelect(project, items);
    if (!hadProject && items.some((i) => i.value === "base")) project.value = "base";
  }

  function openUse(ref, label) {
    requestedTarget = { ref, label: label || ref };
    if (!targets.some((t) => t.ref === ref)) targets.push(requestedTarget);
    fillTargets(ref);
    showView("use");
    $("#use-model").value = ref;
  }

  // -- use: generate --------------------------------------------------------------------------------------------------
  const truncation = $("#use-truncation");
  truncation.addEventListener("input", () => setText($("#use-truncation-value"), Number(truncation.value).toFixed(2)));
  const strength = $("#use-edit-strength");
  strength.addEventListener("input", () => setText($("#use-edit-strength-value"), strength.value));

  function parseLayers(text) {
    const match = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(text);
    if (!match) throw new Error(`edit layers "${text}": write FIRST-LAST, e.g. 0-3`);
    const first = Number(match[1]);
    const last = match[2] === undefined ? first : Number(match[2]);
    if (last < first) throw new Error(`edit layers "${text}": the last layer comes before the first`);
    return { first, last };
  }

  function editsFromForm() {
    const component = intOrNull($("#use-edit-component"));
    const amount = Number(strength.value);
    if (component === null || Number.isNaN(component) || amount === 0) return [];
    return [{ component, strength: amount, ...parseLayers($("#use-edit-layers").value) }];
  }

  const generateButton = $("#generate");
  $("#generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(generateButton, async () => {
      const body = {
        model: $("#use-model").value,
        n: intOrNull($("#use-n")) ?? 8,
        seed: intOrNull($("#use-seed")) ?? 0,
        truncation: Number(truncation.value),
        interpolate: $("#use-interpolate").checked,
        edits: editsFromForm(),
        compare: $("#use-compare").checked,
      };
      const result = await api("/api/generate", body);
      showPicture($("#use-image"), result.image);
    });
  });

  // -- use: blend -------------------------------------------------------------------------------------------------------
  const blendButton = $("#blend");
  $("#blend-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(blendButton, async () => {
      const body = {
        a: $("#blend-a").value,
        b: $("#blend-b").value,
        space: $("#blend-space").value,
        steps: intOrNull($("#blend-steps")) ?? 5,
        n: 4,
        seed: 0,
      };
      const result = await api("/api/blend", body);
      showPicture($("#blend-image"), result.image);
    });
  });

  // -- use: project -------------------------------------------------------------------------------------------------
  const projectButton = $("#project");
  $("#project-form").addEventListener("submit", (event) => {
    event.preventDefault();
    busy(projectButton, async () => {
      const file = $("#project-file").files[0];
      if (!file) throw new Error("choose a picture to project");
      const body = {
        image: await readFile(file),
        model: $("#project-target").value || "base",
        steps: intOrNull($("#project-steps")) ?? 200,
      };
      setText($("#project-psnr"), "");
      const result = await api("/api/project", body);
      showPicture($("#project-image"), result.image);
      setText($("#project-psnr"), `PSNR ${Number(result.psnr).toFixed(2)} dB`);
    });
  });

  // -- start ----------------------------------------------------------------------------------------------------------
  resetCanvas();
  setTool("pen");
  renderSketches();
  renderRuns();
  updateCompareRuns();
  fillTargets();
  showBaseSamples();
  loadInfo();
  loadSketchSets();
  loadTargets();
  const start = location.hash.slice(1);
  showView(VIEWS.includes(start) ? start : "draw");
  if (currentView !== "runs" && currentView !== "compare") pollRuns(); // learn whether runs are in progress
})();
