// The "under the hood" panel: the caption's words coloured by one LSTM unit of the decoder, as in
// Karpathy's notes on recurrent networks (blue negative, white 0, red positive), and the unit's
// gates per word. The ranked units come from GET /v1/models/NAME/cells; the states from a second
// /v1/captions request with output_hidden_states=true and one sequence, sent only while the panel
// is open, so a plain caption costs nothing more.
"use strict";
window.underTheHood = function ({ authorization, fields }) {
  const $ = (id) => document.getElementById(id);
  const hood = $("hood"), unit = $("unit"), about = $("unit-about"), status = $("hood-status");
  const cellWords = $("cell-words"), table = $("gates"), rows = table.tBodies[0];
  const GATES = ["i", "f", "g", "o"];
  const units = new Map();  // model name -> its units (null: none), fetched once
  let withUnits = new Set(); // models GET /v1/models lists with "cells": true
  let image = null, model = null, states = null, sent = 0;

  hood.addEventListener("toggle", () => { if (hood.open) explain(); });
  unit.addEventListener("input", paint);  // arrow keys on the closed select, too

  // GET /v1/models's entries: only models listed with cells are asked for them.
  function models(listed) {
    withUnits = new Set(listed.filter((m) => m.cells).map((m) => m.name));
  }

  function reset() {
    image = null; model = null; states = null; sent++;
    hood.hidden = true;
    cellWords.textContent = ""; rows.textContent = ""; status.textContent = "";
  }

  // A caption is on show: offer the panel when the model that answered has ranked units.
  async function captioned(photo, answeredBy) {
    const request = ++sent;
    const found = await unitsOf(answeredBy);
    if (request !== sent || !found) return;
    image = photo; model = answeredBy; states = null;
    if (unit.dataset.model !== model) {
      unit.textContent = "";
      found.units.forEach((u, k) => {
        const option = document.createElement("option");
        option.value = String(k);
        option.textContent = u.name;
        if (u.direction) option.title = u.direction + (u.score != null ? " (score " + u.score + ")" : "");
        unit.appendChild(option);
      });
      unit.dataset.model = model;
    }
    hood.hidden = false;
    if (hood.open) explain();
  }

  async function unitsOf(name) {
    if (!name || !withUnits.has(name)) return null;
    if (!units.has(name)) {
      units.set(name, fetch("/v1/models/" + encodeURIComponent(name) + "/cells", { headers: authorization() })
        .then((r) => (r.ok ? r.json() : null)).catch(() => null));
    }
    return units.get(name);
  }

  async function explain() {
    if (!image || states) return;
    const request = sent;
    status.textContent = "Reading the decoder's state…";
    const form = new FormData();
    form.append("image", image, image.name || "image");
    fields().forEach(([name, value]) => {
      if (name === "num_return_sequences" || name === "return_attention") return;
      form.append(name, value);
    });
    form.append("num_return_sequences", "1");  // one sequence: well inside the service's word bound
    form.append("output_hidden_states", "true");
    let body;
    try {
      const response = await fetch("/v1/captions", { method: "POST", body: form, headers: authorization() });
      body = await response.json();
      if (!response.ok) throw new Error((body.title || response.status) + ": " + (body.detail || ""));
    } catch (err) {
      if (request === sent) status.textContent = "Could not read the state: " + err.message;
      return;
    }
    if (request !== sent) return;
    states = body.images[0].sequences[0];
    status.textContent = "";
    paint();
  }

  function paint() {
    unitsOf(model).then((found) => { if (found && states) draw(found.units[Number(unit.value)]); });
  }

  // Reading-aligned, as `captioner cells` ranked the units: word t is coloured with the state
  // after reading it, which is hidden_states entry t + 1 (entry t is the state word t was chosen
  // from). The last word's is the <eos> entry; a caption cut at max_new_tokens has none for it.
  function draw(chosen) {
    const hidden = states.hidden_states;
    const values = states.words.map((_, t) => (hidden[chosen.kind][t + 1] || [])[chosen.index]);
    const gates = hidden.gates || null;
    const scale = Math.max(1, ...values.filter((v) => v !== undefined).map(Math.abs));
    about.textContent = [chosen.direction, chosen.score != null ? "score " + Number(chosen.score).toFixed(2) : "",
      chosen.over_shuffled_max != null ? Number(chosen.over_shuffled_max).toFixed(1) + "x the best shuffled unit" : ""]
      .filter(Boolean).join("; ");
    cellWords.textContent = ""; rows.textContent = "";
    table.classList.toggle("no-gates", !gates);
    states.words.forEach((word, t) => {
      const v = values[t];
      const span = document.createElement("span");
      span.textContent = word;
      if (v === undefined) {
        span.title = word + ": no state after it (the caption was cut off)";
      } else {
        span.dataset.value = v.toFixed(4);
        span.style.background = diverging(v / scale);
        span.style.color = Math.abs(v / scale) > 0.6 ? "#fff" : "#222";
        span.title = word + ": " + v.toFixed(3);
      }
      cellWords.appendChild(span);
      cellWords.appendChild(document.createTextNode(" "));

      const row = rows.insertRow();
      row.insertCell().textContent = word;
      const cell = row.insertCell();
      cell.textContent = v === undefined ? "–" : v.toFixed(2);
      if (v !== undefined) cell.style.background = diverging(v / scale);
      GATES.forEach((g) => {
        const x = gates && gates[g][t + 1] ? gates[g][t + 1][chosen.index] : undefined;
        const td = row.insertCell();
        td.className = "gate";
        td.textContent = x === undefined ? "–" : x.toFixed(2);
        if (x !== undefined) {  // a bar: i, f, o in (0, 1), grey; g in (-1, 1), its sign as colour
          const pct = Math.round(100 * Math.min(1, Math.abs(x)));
          const colour = g !== "g" ? "#d4d4d4" : x < 0 ? "#9ecae1" : "#fcae91";
          td.style.background = "linear-gradient(to right, " + colour + " " + pct + "%, transparent " + pct + "%)";
          td.dataset.value = x.toFixed(4);
        }
      });
    });
  }

  // x in [-1, 1] -> white at 0, RdBu's ends at -1 (blue) and +1 (red).
  function diverging(x) {
    const a = Math.min(1, Math.abs(x));
    const end = x < 0 ? [33, 102, 172] : [178, 24, 43];
    const mix = end.map((c) => Math.round(255 + (c - 255) * a));
    return "rgb(" + mix.join(", ") + ")";
  }

  return { models, reset, captioned };
};
