// The captioner web page: send the image (chosen, dropped or pasted) to /v1/captions with
// return_attention=true, show the n-best captions, and paint the attention grid of the word under
// the mouse (or the last tapped word) over the image. No build step, no dependencies.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), file = $("file"), words = $("words"), nbest = $("nbest");
  const status = $("status"), errorBox = $("error"), stage = $("stage"), preview = $("preview"), heat = $("heat");
  const modelField = $("model-field"), model = $("model"), apikey = $("apikey");
  let current = null;    // the best sequence of the last response
  let previewUrl = null; // object URL of the image on show
  let latest = 0;        // number of the last request sent: older answers are dropped
  const hood = window.underTheHood({ authorization, fields: options });  // hood.js

  // Choosing a file: click or Enter/Space on the drop zone opens the file picker.
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); }
  });
  file.addEventListener("change", () => { if (file.files.length) send(file.files[0]); file.value = ""; });

  // Dropping: anywhere on the page (a file dropped beside the zone would otherwise open in the tab).
  const carriesFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    document.body.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) document.body.classList.remove("over");  // left the window
  });
  document.addEventListener("drop", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    document.body.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });

  // Pasting: an image on the clipboard (a screenshot, "copy image") is captioned; text pastes
  // (into the API key field, say) go on as usual.
  document.addEventListener("paste", (e) => {
    const image = imageIn(e.clipboardData);
    if (!image) return;
    e.preventDefault();
    send(image);
  });

  function imageIn(data) {
    if (!data) return null;
    for (const f of Array.from(data.files || [])) if (f.type.startsWith("image/")) return f;
    for (const item of Array.from(data.items || [])) {
      if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
    }
    return null;
  }

  // The preview is shown only once the browser has decoded it: never an empty or broken image.
  preview.addEventListener("load", () => { stage.hidden = false; });
  preview.addEventListener("error", () => { stage.hidden = true; });

  // Optional model selector: shown when the service lists more than one model at GET /v1/models
  // ({"default": name, "models": [{"name": ...}, ...]}); hidden, and no `model` field sent, when it
  // does not (a 404 from a service without the list, a 401 before the API key is typed).
  async function loadModels() {
    let listed = [], fallback = null;
    try {
      const response = await fetch("/v1/models", { headers: authorization() });
      if (response.ok) {
        const body = await response.json();
        listed = (body.models || []).filter((m) => m && m.name);
        fallback = body.default;
      }
    } catch (err) { listed = []; }
    const chosen = modelField.hidden ? fallback : model.value;
    model.textContent = "";
    listed.forEach((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name;
      if (m.description) option.title = m.description;
      model.appendChild(option);
    });
    if (listed.some((m) => m.name === chosen)) model.value = chosen;
    hood.models(listed);
    modelField.hidden = listed.length < 2;
  }
  apikey.addEventListener("change", loadModels);  // the list may need the key
  loadModels();

  function authorization() {
    return apikey.value ? { Authorization: "Bearer " + apikey.value } : {};
  }

  // The form fields of a request besides the image; a new option is one more line here.
  function options() {
    const beams = $("num_beams").value, n = $("num_return_sequences").value;
    const fields = [
      ["num_beams", beams],
      ["num_return_sequences", String(Math.min(Number(n), Number(beams)))],
      ["return_attention", "true"],
    ];
    if (!modelField.hidden && model.value) fields.push(["model", model.value]);
    return fields;
  }

  async function send(image) {
    const request = ++latest;
    errorBox.textContent = ""; words.textContent = ""; nbest.textContent = "";
    current = null;
    clearHeat();
    hood.reset();
    status.textContent = "Captioning…";
    drop.classList.add("small");
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(image);
    stage.hidden = true;  // until the new image has loaded
    preview.src = previewUrl;
    const form = new FormData();
    form.append("image", image, image.name || "image");
    options().forEach(([name, value]) => form.append(name, value));
    let response, body;
    try {
      response = await fetch("/v1/captions", { method: "POST", body: form, headers: authorization() });
      body = await response.json().catch(() => ({}));
    } catch (err) {
      if (request !== latest) return;
      status.textContent = ""; errorBox.textContent = "Request failed: " + err; return;
    }
    if (request !== latest) return;
    if (!response.ok) {
      status.textContent = "";
      errorBox.textContent = (body.title || "Error") + ": " + (body.detail || response.status);
      return;
    }
    status.textContent = body.timings_ms ? "Done in " + Math.round(body.timings_ms.total) + " ms" : "Done";
    show(body.images[0]);
    hood.captioned(image, body.model_name);
  }

  function show(result) {
    current = result.sequences[0];
    current.words.forEach((word, i) => {
      const span = document.createElement("span");
      span.textContent = word;
      span.dataset.index = String(i);
      span.addEventListener("mouseenter", () => highlight(i, span));
      span.addEventListener("click", () => highlight(i, span));  // touch screens have no hover
      span.addEventListener("mouseleave", () => { span.classList.remove("active"); clearHeat(); });
      words.appendChild(span);
      words.appendChild(document.createTextNode(" "));
    });
    result.sequences.forEach((seq) => {
      const li = document.createElement("li");
      li.textContent = seq.text + "  (log-prob " + seq.log_prob.toFixed(2) + ")";
      nbest.appendChild(li);
    });
  }

  function clearHeat() {
    heat.getContext("2d").clearRect(0, 0, heat.width, heat.height);
    heat.dataset.word = "";
  }

  // Draw the (H', W') grid at its own size, then let the browser scale it smoothly over the image.
  function highlight(i, span) {
    if (!current || !current.attention) return;
    words.querySelectorAll("span.active").forEach((other) => other.classList.remove("active"));
    span.classList.add("active");
    const grid = current.attention[i];
    const h = grid.length, w = grid[0].length;
    let lo = Infinity, hi = -Infinity;
    grid.forEach((row) => row.forEach((v) => { lo = Math.min(lo, v); hi = Math.max(hi, v); }));
    heat.width = w; heat.height = h;
    const ctx = heat.getContext("2d");
    const pixels = ctx.createImageData(w, h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const v = hi > lo ? (grid[y][x] - lo) / (hi - lo) : 0;
        const o = 4 * (y * w + x);
        pixels.data[o] = 255 * clamp(1.5 - Math.abs(4 * v - 3));
        pixels.data[o + 1] = 255 * clamp(1.5 - Math.abs(4 * v - 2));
        pixels.data[o + 2] = 255 * clamp(1.5 - Math.abs(4 * v - 1));
        pixels.data[o + 3] = 255;
      }
    }
    ctx.putImageData(pixels, 0, 0);
    heat.dataset.word = current.words[i];
  }

  function clamp(v) { return Math.max(0, Math.min(1, v)); }
})();
