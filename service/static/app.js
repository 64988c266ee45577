// The captioner web page: send the image to /v1/captions with return_attention=true, show the
// n-best captions, and paint the attention grid of the word under the mouse over the image.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), file = $("file"), words = $("words"), nbest = $("nbest");
  const status = $("status"), errorBox = $("error"), stage = $("stage"), preview = $("preview"), heat = $("heat");
  let current = null; // the best sequence of the last response

  drop.addEventListener("click", () => file.click());
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  file.addEventListener("change", () => { if (file.files.length) send(file.files[0]); });

  async function send(image) {
    errorBox.textContent = ""; words.textContent = ""; nbest.textContent = "";
    status.textContent = "Captioning…";
    preview.src = URL.createObjectURL(image);
    stage.hidden = false;
    clearHeat();
    const form = new FormData();
    form.append("image", image, image.name || "image");
    const beams = $("num_beams").value, n = $("num_return_sequences").value;
    form.append("num_beams", beams);
    form.append("num_return_sequences", String(Math.min(Number(n), Number(beams))));
    form.append("return_attention", "true");
    const headers = {};
    if ($("apikey").value) headers["Authorization"] = "Bearer " + $("apikey").value;
    let response, body;
    try {
      response = await fetch("/v1/captions", { method: "POST", body: form, headers });
      body = await response.json();
    } catch (err) {
      status.textContent = ""; errorBox.textContent = "Request failed: " + err; return;
    }
    if (!response.ok) {
      status.textContent = "";
      errorBox.textContent = (body.title || "Error") + ": " + (body.detail || response.status);
      return;
    }
    status.textContent = "Done in " + Math.round(body.timings_ms.total) + " ms";
    show(body.images[0]);
  }

  function show(result) {
    current = result.sequences[0];
    current.words.forEach((word, i) => {
      const span = document.createElement("span");
      span.textContent = word;
      span.dataset.index = String(i);
      span.addEventListener("mouseenter", () => highlight(i, span));
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
