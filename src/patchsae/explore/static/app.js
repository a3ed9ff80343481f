// patchsae explorer page: every piece of state lives in this closure, per browser tab.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let info = null;
  let image = null; // answer of /api/encode
  let patch = null; // [row, col] of the clicked patch
  let latent = null;

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  async function call(url, options) {
    $("status").textContent = "working...";
    try {
      const response = await fetch(url, options);
      const body = await response.json();
      if (!response.ok) {
        showError(body.error || `request failed (${response.status})`);
        return null;
      }
      showError("");
      return body;
    } catch (err) {
      showError(`the server did not answer: ${err}`);
      return null;
    } finally {
      $("status").textContent = "";
    }
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.assign(node, attrs || {});
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function groupOf(answer, name, j) {
    if (!answer.groups) return "";
    const base = info.models[0].name;
    if (answer.groups.common.includes(j)) return "common";
    return name === base ? "base_only" : "adapted_only";
  }

  function renderTop(target, answer) {
    target.replaceChildren();
    for (const model of info.models) {
      const box = el("div", { className: "model-list" });
      box.append(el("strong", {}, model.name));
      const list = el("ol");
      list.dataset.model = model.name;
      for (const entry of answer.top[model.name]) {
        const item = el("li", {}, `#${entry.latent}  ${entry.value.toFixed(3)}`);
        item.dataset.latent = entry.latent;
        const group = groupOf(answer, model.name, entry.latent);
        if (group) item.className = `group-${group}`;
        if (entry.latent === latent) item.classList.add("chosen");
        item.addEventListener("click", () => openLatent(entry.latent));
        list.append(item);
      }
      if (!answer.top[model.name].length) list.append(el("li", {}, "no latent fires"));
      box.append(list);
      target.append(box);
    }
    if (answer.groups) {
      const legend = el("p");
      for (const g of ["common", "base_only", "adapted_only"]) {
        legend.append(el("span", { className: `group-${g}` }, `${g}: ${answer.groups[g].length}  `));
      }
      target.append(legend);
    }
  }

  function drawPlot(imageAnswer, patchAnswer) {
    const svg = $("plot");
    svg.replaceChildren();
    const ns = "http://www.w3.org/2000/svg";
    const traces = [];
    const base = info.models[0].name;
    traces.push({ points: imageAnswer.plot[base], color: "#1f4e9c", top: imageAnswer.top[base], name: "image" });
    if (patchAnswer && patchAnswer.plot) {
      traces.push({ points: patchAnswer.plot[base], color: "#c0392b", top: patchAnswer.top[base], name: "patch" });
    }
    let ymax = 1e-9;
    for (const t of traces) for (const [, v] of t.points) ymax = Math.max(ymax, v);
    const X = (j) => 10 + (580 * j) / Math.max(1, info.d_sae - 1);
    const Y = (v) => 210 - (190 * v) / ymax;
    for (const t of traces) {
      const g = document.createElementNS(ns, "g");
      g.setAttribute("class", `trace-${t.name}`);
      for (const [j, v] of t.points) {
        const line = document.createElementNS(ns, "line");
        line.setAttribute("x1", X(j)); line.setAttribute("x2", X(j));
        line.setAttribute("y1", 210); line.setAttribute("y2", Y(v));
        line.setAttribute("stroke", t.color); line.setAttribute("stroke-width", 1.5);
        g.append(line);
      }
      for (const entry of t.top.slice(0, 5)) {
        const label = document.createElementNS(ns, "text");
        label.setAttribute("x", X(entry.latent) + 2); label.setAttribute("y", Y(entry.value) - 2);
        label.setAttribute("font-size", 10); label.setAttribute("fill", t.color);
        label.textContent = entry.latent;
        g.append(label);
      }
      svg.append(g);
    }
  }

  function drawGrid() {
    const canvas = $("overlay");
    const photo = $("photo");
    canvas.width = photo.clientWidth;
    canvas.height = photo.clientHeight;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!image) return;
    const [l, t, r, b] = image.box;
    const [rows, cols] = image.grid;
    const W = canvas.width, H = canvas.height;
    ctx.strokeStyle = "rgba(255,255,255,0.45)";
    ctx.lineWidth = 1;
    for (let i = 0; i <= cols; i++) {
      const x = (l + ((r - l) * i) / cols) * W;
      ctx.beginPath(); ctx.moveTo(x, t * H); ctx.lineTo(x, b * H); ctx.stroke();
    }
    for (let i = 0; i <= rows; i++) {
      const y = (t + ((b - t) * i) / rows) * H;
      ctx.beginPath(); ctx.moveTo(l * W, y); ctx.lineTo(r * W, y); ctx.stroke();
    }
    if (patch) {
      const pw = ((r - l) * W) / cols, ph = ((b - t) * H) / rows;
      ctx.strokeStyle = "#ff3b30"; ctx.lineWidth = 2;
      ctx.strokeRect(l * W + patch[1] * pw, t * H + patch[0] * ph, pw, ph);
    }
  }

  async function upload(body) {
    const answer = await call("/api/encode", { method: "POST", body });
    if (!answer) return;
    image = answer; patch = null;
    $("photo").onload = () => { $("stage").hidden = false; drawGrid(); };
    $("photo").src = answer.image;
    $("patch-label").textContent = "click a patch";
    renderTop($("image-top"), answer);
    $("patch-top").replaceChildren();
    drawPlot(answer, null);
    if (latent !== null) openLatent(latent);
  }

  async function clickPatch(event) {
    if (!image) return;
    const rect = $("overlay").getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width;
    const y = (event.clientY - rect.top) / rect.height;
    const answer = await call(`/api/click?session=${image.session}&x=${x}&y=${y}`);
    if (!answer) return;
    if (!answer.patch) { $("patch-label").textContent = answer.message; return; }
    patch = answer.patch;
    $("patch-label").textContent = `patch row ${patch[0]}, column ${patch[1]}`;
    renderTop($("patch-top"), answer);
    drawPlot(image, answer);
    drawGrid();
  }

  function statsTable(stats) {
    const table = el("table", { className: "stats" });
    const rows = [
      ["dataset", stats.dataset],
      ["image frequency", stats.image_freq.toFixed(4)],
      ["mean activation (where it fires)", stats.mean_act_fired.toFixed(4)],
      ["label entropy", stats.label_entropy.toFixed(3)],
      ["top classes", (stats.top_classes || []).map((c) => `${c.class_name ?? c.label} (${c.count})`).join(", ")],
    ];
    for (const [k, v] of rows) {
      const tr = el("tr");
      tr.append(el("td", {}, k), el("td", {}, String(v)));
      table.append(tr);
    }
    return table;
  }

  async function openLatent(j) {
    const session = image ? image.session : "";
    const style = $("mask-style").value;
    const answer = await call(`/api/latent/${j}?session=${session}&style=${style}`);
    if (!answer) return;
    latent = j;
    $("latent-panel").hidden = false;
    $("latent-id").textContent = `#${j}`;
    $("latent-link").href = answer.link;
    $("latent-masks").replaceChildren();
    $("latent-stats").replaceChildren();
    $("refs").replaceChildren();
    const masks = $("masks-toggle").checked;
    for (const model of answer.models) {
      if (model.mask) {
        const fig = el("figure");
        fig.append(el("img", { src: model.mask, alt: `mask of latent ${j} (${model.name})`, className: "upload-mask" }));
        fig.append(el("figcaption", {}, model.name));
        $("latent-masks").append(fig);
      }
      for (const stats of model.datasets) {
        $("latent-stats").append(el("h3", {}, `${model.name} / ${stats.dataset}`), statsTable(stats));
        const row = el("div", { className: "refs-row" });
        row.dataset.dataset = stats.dataset;
        row.append(el("strong", {}, stats.dataset));
        for (const ref of stats.references) {
          if (!ref.url) continue;
          const fig = el("figure");
          fig.append(el("img", { src: masks ? ref.mask_url : ref.url, className: "ref", alt: `reference ${ref.slot}` }));
          fig.append(el("figcaption", {}, `${ref.class_name ?? ref.label} ${ref.value.toFixed(2)}`));
          row.append(fig);
        }
        if (!stats.references.length) row.append(el("span", {}, "no reference image: this latent never fires"));
        $("refs").append(row);
      }
    }
    for (const item of document.querySelectorAll(".lists li")) {
      item.classList.toggle("chosen", Number(item.dataset.latent) === j);
    }
  }

  async function browse(kind) {
    const answer = await call(`/api/browse?kind=${kind}&limit=100`);
    if (!answer) return;
    $("browse-panel").hidden = false;
    $("browse-title").textContent = `${kind.replace("_", "-")} latents of ${answer.dataset} (${answer.total})`;
    const list = $("browse-list");
    list.replaceChildren();
    for (const row of answer.rows) {
      const item = el("li", {}, `#${row.latent}  freq ${row.image_freq.toFixed(3)}  entropy ${row.label_entropy.toFixed(2)}  ${row.top_class ?? ""}`);
      item.dataset.latent = row.latent;
      item.addEventListener("click", () => openLatent(row.latent));
      list.append(item);
    }
  }

  async function start() {
    info = await call("/api/info");
    if (!info) return;
    $("model-info").textContent = info.models.map((m) => `${m.name}: ${m.backbone} layer ${m.layer}`).join(" | ");
    for (let i = 0; i < info.n_examples; i++) {
      const thumb = el("img", { src: `/api/example/${i}`, alt: `example ${i}`, className: "example" });
      thumb.addEventListener("click", async () => {
        const blob = await (await fetch(`/api/example/${i}`)).blob();
        upload(blob);
      });
      $("examples").append(thumb);
    }
    const requested = new URLSearchParams(location.search).get("latent");
    if (requested !== null) openLatent(Number(requested));
  }

  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) upload(file);
  });
  $("overlay").addEventListener("click", clickPatch);
  $("search-go").addEventListener("click", () => {
    const value = $("search").value;
    if (value === "" || !Number.isInteger(Number(value))) { showError("type a latent id (a whole number)"); return; }
    openLatent(Number(value));
  });
  $("masks-toggle").addEventListener("change", () => { if (latent !== null) openLatent(latent); });
  $("mask-style").addEventListener("change", () => { if (latent !== null) openLatent(latent); });
  $("browse-dense").addEventListener("click", () => browse("dense"));
  $("browse-low-entropy").addEventListener("click", () => browse("low_entropy"));
  window.addEventListener("resize", drawGrid);
  start();
})();
