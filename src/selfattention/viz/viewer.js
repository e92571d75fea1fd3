// The attention viewer. Plain JavaScript, no libraries, nothing fetched: the data is the JSON block above.
// Tokens are DOM elements (so they can be hovered, read and searched); the lines and heatmaps are canvases.
// State the tests read is published on window.viewerState after every redraw.
(function () {
  "use strict";

  const DATA = JSON.parse(document.getElementById("viewer-data").textContent);
  const TOKENS = DATA.tokens;
  const T = TOKENS.length;
  const ROW = T <= 24 ? 28 : T > 512 ? 16 : 20; // px per token
  const MAX_WIDTH = 12; // px of line thickness for a weight of 1
  const DIGITS = 4;
  const SHOWN_COMPONENTS = 4; // vectors longer than 8 numbers show their first 4 in the panel
  const PANEL_ROWS = 64; // longer sequences list their largest weights first (a button shows all)
  // The whole model's attention rollout, when the page carries it, is one more entry after the layers.
  const ROLLOUT = DATA.rollout ? DATA.layers.length : -1;
  const ROLLOUT_NOTE =
    "Attention rollout (Abnar & Zuidema, 2020): R = Â_L ··· Â_1 with Â = 0.5 · mean over heads of α + 0.5 · I; R_ij is the share of input token j in token i after the last layer (each row sums to 1).";

  const state = { layer: 0, head: 0, focus: null, side: "query", pinned: null, pinnedSide: "query", allRows: false };
  const published = { lines: [], drawnLines: 0, lastDrawMs: 0, draws: 0 };

  // ---- data ------------------------------------------------------------------------------------------
  function decode(m) {
    const text = atob(m.f32);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return { rows: m.shape[0], cols: m.shape[1], a: new Float32Array(bytes.buffer) };
  }
  const cache = new Map();
  function matrix(layer, head, name) {
    const key = layer + "/" + head + "/" + name;
    if (!cache.has(key) && layer === ROLLOUT) cache.set(key, decode(DATA.rollout));
    if (!cache.has(key)) {
      const data = DATA.layers[layer].heads[head];
      cache.set(key, data.topk && name === "weights" ? expand(data.topk) : decode(data[name]));
      if (data.topk) forgetOldest(8); // compact pages are long: keep a few T×T matrices, not one per head
    }
    return cache.get(key);
  }
  function forgetOldest(keep) {
    while (cache.size > keep) cache.delete(cache.keys().next().value);
  }
  function compact(layer, head) {
    return layer === ROLLOUT ? null : DATA.layers[layer].heads[head].topk || null;
  }
  function headCount(layer) {
    return layer === ROLLOUT ? 1 : DATA.layers[layer].heads.length;
  }
  // A compact head carries the K largest weights of each row (exact), their key indices, the rest of the
  // row's mass and its log-sum-exp. Expanded to T×T: kept weights in place, zeros elsewhere, and `known`
  // marks which entries are kept (the panels show only those as numbers).
  function expand(topk) {
    const w = decode(topk.w).a;
    const bytes = Uint8Array.from(atob(topk.j || topk.j32), (c) => c.charCodeAt(0));
    const j = topk.j ? new Uint16Array(bytes.buffer) : new Uint32Array(bytes.buffer);
    const a = new Float32Array(T * T);
    const known = new Uint8Array(T * T);
    for (let i = 0; i < T; i++) {
      for (let r = 0; r < topk.k; r++) {
        a[i * T + j[i * topk.k + r]] = w[i * topk.k + r];
        known[i * T + j[i * topk.k + r]] = 1;
      }
    }
    return { rows: T, cols: T, a, known, rest: decode(topk.rest).a, lse: decode(topk.lse).a, k: topk.k };
  }
  function row(m, i) {
    return m.a.subarray(i * m.cols, (i + 1) * m.cols);
  }
  function masked(i, j) {
    return DATA.causal && j > i;
  }

  // ---- formatting ------------------------------------------------------------------------------------
  function num(x) {
    const s = x.toFixed(DIGITS);
    return s === "-0.0000" ? "0.0000" : s;
  }
  function vec(v) {
    const shown = Array.from(v.slice(0, SHOWN_COMPONENTS), num).join(", ");
    if (v.length <= 8) return "[" + Array.from(v, num).join(", ") + "]";
    return "[" + shown + ", … " + (v.length - SHOWN_COMPONENTS) + " more]";
  }
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "html") node.innerHTML = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children || []) node.append(child);
    return node;
  }
  function sub(name, index) {
    return name + "<sub>" + index + "</sub>";
  }

  // ---- tokens ----------------------------------------------------------------------------------------
  const scroll = document.getElementById("lines-scroll");
  const queriesBox = document.getElementById("queries");
  const keysBox = document.getElementById("keys");
  const canvas = document.getElementById("lines");
  const queryEls = [];
  const keyEls = [];
  function tokenEl(i, side) {
    const node = el("div", { class: "tok", "data-i": String(i), "data-side": side, title: side + " " + i });
    node.textContent = TOKENS[i];
    node.style.top = i * ROW + "px";
    node.style.height = ROW + "px";
    node.style.lineHeight = ROW + "px";
    node.addEventListener("mouseenter", () => {
      if (state.pinned === null) setFocus(i, side);
    });
    node.addEventListener("click", () => pin(i, side));
    return node;
  }
  for (let i = 0; i < T; i++) {
    queryEls.push(queriesBox.appendChild(tokenEl(i, "query")));
    keyEls.push(keysBox.appendChild(tokenEl(i, "key")));
  }
  // The last focused token stays focused when the mouse leaves (so its numbers can be read and scrolled);
  // Escape, or a click on the lines, goes back to the overview of every line.
  function overview() {
    state.pinned = null;
    setFocus(null, "query");
  }
  canvas.addEventListener("click", overview);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") overview();
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    event.preventDefault(); // arrows walk the focus (and the pin) through the tokens on the focused side
    const step = event.key === "ArrowDown" ? 1 : -1;
    const next = state.focus === null ? 0 : Math.min(T - 1, Math.max(0, state.focus + step));
    if (state.pinned !== null) state.pinned = next;
    setFocus(next, state.side);
    (state.side === "query" ? queryEls : keyEls)[next].scrollIntoView({ block: "nearest" });
  });
  let scrollQueued = false;
  scroll.addEventListener("scroll", () => {
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      drawLines();
      publish();
    });
  });

  // The line canvas covers only the visible part of the scrolling token columns (it moves with the scroll),
  // so drawing and rasterising cost the same for 6 tokens or 1000.
  let ratio = 1;
  function layout() {
    const measure = document.createElement("canvas").getContext("2d");
    measure.font = getComputedStyle(queryEls[0]).font;
    let widest = 40;
    for (const token of TOKENS) widest = Math.max(widest, measure.measureText(token).width + 16);
    const labelWidth = Math.min(widest, 160);
    const height = T * ROW + 4;
    queriesBox.style.width = keysBox.style.width = labelWidth + "px";
    queriesBox.style.height = keysBox.style.height = height + "px";
    scroll.style.height = Math.min(height, window.innerHeight * 0.72) + "px";
    const width = Math.max(60, scroll.clientWidth - 2 * labelWidth);
    const visible = scroll.clientHeight;
    ratio = window.devicePixelRatio || 1;
    canvas.style.left = labelWidth + "px";
    canvas.style.width = width + "px";
    canvas.style.height = visible + "px";
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(visible * ratio);
    published.labelWidth = labelWidth;
  }

  // ---- lines -----------------------------------------------------------------------------------------
  const WIDTH_STEP = 0.05; // px: lines are grouped into paths of equal thickness, rounded to this step
  // With nothing focused, weights below 0.02 (lines under 0.24 px) are left out, or below twice the uniform
  // weight 1/T on long sequences: the overview shows the lines that stand out; a focused token shows all.
  const FAINTEST = Math.min(0.02, 2 / T);
  function y(i) {
    return i * ROW + ROW / 2;
  }
  function drawLines() {
    const started = performance.now();
    const ctx = canvas.getContext("2d");
    const width = parseFloat(canvas.style.width);
    const top = scroll.scrollTop;
    const visible = parseFloat(canvas.style.height);
    canvas.style.top = top + "px";
    ctx.setTransform(ratio, 0, 0, ratio, 0, -top * ratio); // draw in token coordinates
    ctx.clearRect(0, top, width, visible);
    const first = Math.max(0, Math.floor(top / ROW) - 1);
    const last = Math.min(T - 1, Math.ceil((top + visible) / ROW) + 1);
    const weights = matrix(state.layer, state.head, "weights");
    const lines = [];
    let drawn = 0;
    if (state.focus === null) {
      // With nothing focused: every line of weight >= FAINTEST that starts or ends at a token in view. Lines of (nearly)
      // equal thickness share one path: a few hundred strokes instead of T².
      const paths = new Map();
      const add = (i, j) => {
        const w = weights.a[i * T + j];
        if (w < FAINTEST) return;
        const step = Math.round((w * MAX_WIDTH) / WIDTH_STEP);
        if (!paths.has(step)) paths.set(step, new Path2D());
        paths.get(step).moveTo(0, y(i));
        paths.get(step).lineTo(width, y(j));
        drawn++;
      };
      for (let i = 0; i < T; i++) {
        const inView = i >= first && i <= last;
        for (let j = inView ? 0 : first; j <= (inView ? T - 1 : last); j++) add(i, j);
      }
      ctx.strokeStyle = "rgba(37, 99, 235, 0.35)";
      for (const [step, path] of paths) {
        ctx.lineWidth = step * WIDTH_STEP;
        ctx.stroke(path);
      }
    } else {
      const f = state.focus;
      ctx.strokeStyle = "rgba(234, 120, 12, 0.85)";
      for (let other = 0; other < T; other++) {
        const [i, j] = state.side === "query" ? [f, other] : [other, f];
        const w = weights.a[i * T + j];
        const lineWidth = w * MAX_WIDTH;
        lines.push({ query: i, key: j, weight: w, width: lineWidth });
        if (lineWidth <= 0) continue;
        ctx.lineWidth = lineWidth;
        ctx.beginPath();
        ctx.moveTo(0, y(i));
        ctx.lineTo(width, y(j));
        ctx.stroke();
        drawn++;
      }
    }
    shadeTokens(weights);
    published.lines = lines;
    published.drawnLines = drawn;
    published.lastDrawMs = performance.now() - started;
    published.draws++;
  }
  const painted = new Map(); // token element -> what shadeTokens last gave it, to touch only what changes
  function shadeTokens(weights) {
    const f = state.focus;
    for (let i = 0; i < T; i++) {
      for (const [els, side] of [[queryEls, "query"], [keyEls, "key"]]) {
        const node = els[i];
        const isFocus = f !== null && state.side === side && i === f;
        const isPinned = state.pinned === i && state.pinnedSide === side;
        let shade = 0;
        let isMasked = false;
        if (f !== null && state.side !== side) {
          const [q, k] = side === "key" ? [f, i] : [i, f];
          shade = weights.a[q * T + k];
          isMasked = masked(q, k);
        }
        const background = shade > 0 ? "rgba(255, 159, 28, " + Math.min(1, 0.15 + shade).toFixed(3) + ")" : "";
        const look = [isFocus, isPinned, isMasked, background].join("|");
        if (painted.get(node) === look) continue;
        painted.set(node, look);
        node.classList.toggle("focus", isFocus);
        node.classList.toggle("pinned", isPinned);
        node.classList.toggle("masked", isMasked);
        node.style.backgroundColor = background;
      }
    }
  }

  // ---- heatmaps --------------------------------------------------------------------------------------
  const heatmaps = new Map(); // one T×T picture per head, drawn once and scaled onto each canvas
  function heatmapSource(layer, head) {
    const key = layer + "/" + head;
    if (heatmaps.has(key)) return heatmaps.get(key);
    const weights = matrix(layer, head, "weights");
    let largest = 0;
    for (const w of weights.a) largest = Math.max(largest, w);
    const image = new ImageData(T, T);
    for (let i = 0; i < T; i++) {
      for (let j = 0; j < T; j++) {
        const p = 4 * (i * T + j);
        if (masked(i, j)) {
          const stripe = (i + j) % 4 < 2;
          image.data.set(stripe ? [225, 215, 198, 255] : [243, 239, 232, 255], p);
          continue;
        }
        const t = largest > 0 ? weights.a[i * T + j] / largest : 0;
        image.data.set([255 - 218 * t, 255 - 156 * t, 255 - 20 * t, 255], p);
      }
    }
    const source = document.createElement("canvas");
    source.width = source.height = T;
    source.getContext("2d").putImageData(image, 0, 0);
    heatmaps.set(key, source);
    return source;
  }
  function paintHeatmap(target, layer, head, focusRow) {
    const source = heatmapSource(layer, head);
    // Whole pixels per cell where they fit, so small matrices show even cells; CSS scales the canvas.
    const size = Number(target.dataset.size);
    const side = T <= size ? T * Math.ceil(size / T) : size;
    if (target.width !== side) target.width = target.height = side;
    const ctx = target.getContext("2d");
    ctx.imageSmoothingEnabled = T > target.width;
    ctx.clearRect(0, 0, target.width, target.height);
    ctx.drawImage(source, 0, 0, target.width, target.height);
    if (focusRow !== null && focusRow !== undefined) {
      const cell = target.height / T;
      ctx.strokeStyle = "#ea780c";
      ctx.lineWidth = 2;
      if (state.side === "query") ctx.strokeRect(1, focusRow * cell, target.width - 2, Math.max(cell, 2));
      else ctx.strokeRect(focusRow * cell, 1, Math.max(cell, 2), target.height - 2);
    }
  }

  const thumbs = [];
  function buildThumbs() {
    const box = document.getElementById("thumbs");
    DATA.layers.forEach((layer, l) => {
      const rowEl = el("div", { class: "thumb-row" }, [el("span", { class: "row-name", text: layer.name, title: layer.name })]);
      layer.heads.forEach((_, h) => {
        const c = el("canvas", { width: "64", height: "64", "data-size": "64" });
        const item = el("div", { class: "thumb", "data-layer": String(l), "data-head": String(h), title: layer.name + ", head " + h }, [
          c,
          el("span", { text: "head " + h }),
        ]);
        item.addEventListener("click", () => select(l, h));
        rowEl.append(item);
        thumbs.push({ item, l, h });
        c.dataset.layer = String(l);
        c.dataset.head = String(h);
        if (lazy) lazy.observe(c);
        else {
          paintHeatmap(c, l, h, null);
          c.dataset.painted = "1";
        }
      });
      box.append(rowEl);
    });
    if (ROLLOUT < 0) return;
    const c = el("canvas", { width: "64", height: "64", "data-size": "64" });
    const item = el("div", { class: "thumb", id: "rollout-thumb", "data-layer": String(ROLLOUT), "data-head": "0", title: ROLLOUT_NOTE }, [
      c,
      el("span", { text: "rollout" }),
    ]);
    item.addEventListener("click", () => select(ROLLOUT, 0));
    thumbs.push({ item, l: ROLLOUT, h: 0 });
    paintHeatmap(c, ROLLOUT, 0, null);
    c.dataset.painted = "1";
    box.append(el("div", { class: "thumb-row" }, [el("span", { class: "row-name", text: "whole model" }), item]));
  }
  // Thumbnails are painted when they scroll into view (a long page has hundreds of T×T heads).
  const lazy =
    "IntersectionObserver" in window
      ? new IntersectionObserver((entries) => {
          for (const entry of entries) {
            if (!entry.isIntersecting) continue;
            const c = entry.target;
            lazy.unobserve(c);
            paintHeatmap(c, Number(c.dataset.layer), Number(c.dataset.head), null);
            c.dataset.painted = "1";
            if (compact(Number(c.dataset.layer), Number(c.dataset.head))) forgetHeatmaps(4);
          }
        })
      : null;
  function forgetHeatmaps(keep) {
    while (heatmaps.size > keep) heatmaps.delete(heatmaps.keys().next().value);
  }

  // ---- numbers ---------------------------------------------------------------------------------------
  // Notation and 0-based positions as `selfattention explain` prints them.
  function queryPanel(i) {
    if (state.layer === ROLLOUT) return rolloutPanel(i);
    if (compact(state.layer, state.head)) return compactQueryPanel(i);
    const L = state.layer;
    const H = state.head;
    const q = row(matrix(L, H, "q"), i);
    const v = matrix(L, H, "v");
    const k = matrix(L, H, "k");
    const scores = Array.from({ length: T }, (_, j) => {
      let dot = 0; // ω_ij = q_i · k_j, from the page's q and k (the page does not carry ω)
      for (let d = 0; d < q.length; d++) dot += q[d] * k.a[j * k.cols + d];
      return dot;
    });
    const weights = row(matrix(L, H, "weights"), i);
    const z = row(matrix(L, H, "context"), i);
    const scale = DATA.layers[L].scale;
    const scaled = Math.abs(scale - 1) > 1e-12;
    const panel = document.getElementById("panel");
    panel.replaceChildren(
      el("h2", { id: "query-title", text: "Query " + i + " " + JSON.stringify(TOKENS[i]) }),
      el("div", { class: "eq", id: "query-vector", html: sub("q", "i") + " = " + vec(q) }),
      el("div", { class: "eq", html: "scores   " + sub("ω", "ij") + " = " + sub("q", "i") + " · " + sub("k", "j") }),
      el("div", {
        class: "eq",
        html:
          "weights  " + sub("α", "ij") + " = softmax<sub>j</sub>(" + (scaled ? num(scale) + " · " : "") + sub("ω", "ij") + ")" +
          (scaled ? "" : ", unscaled") + (DATA.causal ? ", keys j &gt; i masked" : ""),
      }),
      el("div", { class: "eq", html: "context  " + sub("z", "i") + " = Σ<sub>j</sub> " + sub("α", "ij") + " " + sub("v", "j") }),
    );
    const body = el("tbody");
    let total = 0;
    for (const w of weights) total += w;
    for (const j of shownRows(weights)) {
      const term = Array.from(row(v, j), (x) => weights[j] * x);
      const tr = el("tr", { class: masked(i, j) ? "masked" : "", "data-j": String(j) }, [
        el("td", { text: String(j) }),
        el("td", { class: "token", text: TOKENS[j] }),
        el("td", { class: "omega", text: num(scores[j]) }),
        el("td", { class: "alpha", text: masked(i, j) ? "0 (masked)" : num(weights[j]) }),
        el("td", { class: "term", text: vec(term) }),
      ]);
      body.append(tr);
    }
    const head = el("thead", {}, [
      el("tr", {}, [
        el("th", { text: "j" }),
        el("th", { text: "token" }),
        el("th", { html: sub("ω", "ij") }),
        el("th", { html: sub("α", "ij") }),
        el("th", { html: sub("α", "ij") + " · " + sub("v", "j") }),
      ]),
    ]);
    const foot = el("tfoot", {}, [
      el("tr", {}, [
        el("td", { colspan: "3", html: "sum" }),
        el("td", { id: "alpha-sum", text: num(total) }),
        el("td", { id: "context", text: "z = " + vec(z) }),
      ]),
    ]);
    panel.append(el("table", { id: "steps" }, [head, body, foot]));
    rowsNote(panel);
  }
  // A compact page: the kept keys of row i, exact; ω_ij = (ln α_ij + lse_i) / scale; the others as one sum.
  function compactQueryPanel(i) {
    const m = matrix(state.layer, state.head, "weights");
    const scale = DATA.layers[state.layer].scale;
    const kept = [];
    for (let j = 0; j < T; j++) if (m.known[i * T + j] && !masked(i, j) && m.a[i * T + j] > 0) kept.push(j);
    const body = el("tbody");
    let total = m.rest[i];
    for (const j of kept) {
      const w = m.a[i * T + j];
      total += w;
      body.append(
        el("tr", { "data-j": String(j) }, [
          el("td", { text: String(j) }),
          el("td", { class: "token", text: TOKENS[j] }),
          el("td", { class: "omega", text: num((Math.log(w) + m.lse[i]) / scale) }),
          el("td", { class: "alpha", text: num(w) }),
        ]),
      );
    }
    body.append(
      el("tr", { class: "rest" }, [
        el("td", { text: "…" }),
        el("td", { class: "token", text: "the other " + (T - kept.length) + " keys" }),
        el("td", { text: "" }),
        el("td", { class: "alpha", id: "rest-mass", text: num(m.rest[i]) }),
      ]),
    );
    const panel = document.getElementById("panel");
    panel.replaceChildren(
      el("h2", { id: "query-title", text: "Query " + i + " " + JSON.stringify(TOKENS[i]) }),
      el("div", {
        class: "eq",
        html: "weights  " + sub("α", "ij") + " = softmax<sub>j</sub>(" + num(scale) + " · " + sub("ω", "ij") + ")" + (DATA.causal ? ", keys j &gt; i masked" : ""),
      }),
      el("p", { class: "muted", id: "compact-note", text: "A compact page: the " + m.k + " largest weights of each row, exact, and the rest of the row's mass; q, k, v and z are not carried." }),
      el("table", { id: "steps" }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: "j" }), el("th", { text: "token" }), el("th", { html: sub("ω", "ij") }), el("th", { html: sub("α", "ij") })])]),
        body,
        el("tfoot", {}, [el("tr", {}, [el("td", { colspan: "3", html: "sum" }), el("td", { id: "alpha-sum", text: num(total) })])]),
      ]),
    );
  }
  // The rollout has no q, k or ω: only R_ij, the share of input token j in token i after the last layer.
  function rolloutPanel(i) {
    const shares = row(matrix(ROLLOUT, 0, "weights"), i);
    const body = el("tbody");
    let total = 0;
    for (const r of shares) total += r;
    for (const j of shownRows(shares)) {
      body.append(
        el("tr", { class: masked(i, j) ? "masked" : "", "data-j": String(j) }, [
          el("td", { text: String(j) }),
          el("td", { class: "token", text: TOKENS[j] }),
          el("td", { class: "rollout", text: num(shares[j]) }),
        ]),
      );
    }
    const panel = document.getElementById("panel");
    panel.replaceChildren(
      el("h2", { id: "query-title", text: "Token " + i + " " + JSON.stringify(TOKENS[i]) + " after the last layer" }),
      el("p", { class: "muted", id: "rollout-note", text: ROLLOUT_NOTE }),
      el("table", { id: "steps" }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: "j" }), el("th", { text: "token" }), el("th", { html: sub("R", "ij") })])]),
        body,
        el("tfoot", {}, [el("tr", {}, [el("td", { colspan: "2", html: "sum" }), el("td", { id: "rollout-sum", text: num(total) })])]),
      ]),
    );
    rowsNote(panel);
  }
  // Long sequences: the table lists the PANEL_ROWS largest weights (in key order) unless asked for all.
  function shownRows(weights) {
    const all = Array.from({ length: T }, (_, j) => j);
    if (T <= PANEL_ROWS || state.allRows) return all;
    return all.sort((a, b) => weights[b] - weights[a]).slice(0, PANEL_ROWS).sort((a, b) => a - b);
  }
  function rowsNote(panel) {
    if (T <= PANEL_ROWS) return;
    const button = el("button", { type: "button", id: "all-rows", text: state.allRows ? "show the largest " + PANEL_ROWS : "show all " + T });
    button.addEventListener("click", () => {
      state.allRows = !state.allRows;
      drawPanel();
    });
    const text = state.allRows ? "all " + T + " keys shown " : "the " + PANEL_ROWS + " largest of " + T + " weights shown (the sum and z use all) ";
    panel.append(el("p", { class: "muted", id: "rows-note", text }, [button]));
  }
  function keyPanel(j) {
    const weights = matrix(state.layer, state.head, "weights");
    const symbol = state.layer === ROLLOUT ? "R" : "α";
    const panel = document.getElementById("panel");
    const body = el("tbody");
    const column = Float32Array.from({ length: T }, (_, i) => weights.a[i * T + j]);
    for (const i of shownRows(column)) {
      body.append(
        el("tr", { class: masked(i, j) ? "masked" : "" }, [
          el("td", { text: String(i) }),
          el("td", { class: "token", text: TOKENS[i] }),
          el("td", { class: "alpha", text: masked(i, j) ? "0 (masked)" : keyWeight(weights, i, j) }),
        ]),
      );
    }
    panel.replaceChildren(
      el("h2", { text: "Key " + j + " " + JSON.stringify(TOKENS[j]) + ": the weight each query i gives it" }),
      el("table", { id: "steps" }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: "i" }), el("th", { text: "token" }), el("th", { html: sub(symbol, "i" + j) })])]),
        body,
      ]),
    );
    rowsNote(panel);
  }
  // A weight a compact page did not keep is at most the smallest one it kept in that row.
  function keyWeight(m, i, j) {
    if (!m.known || m.known[i * T + j]) return num(m.a[i * T + j]);
    let smallest = Infinity;
    for (let c = 0; c < T; c++) if (m.known[i * T + c] && !masked(i, c)) smallest = Math.min(smallest, m.a[i * T + c]);
    return "≤ " + num(smallest === Infinity ? 0 : smallest);
  }
  function drawPanel() {
    const panel = document.getElementById("panel");
    if (state.focus === null) {
      panel.replaceChildren(
        el("h2", { text: "Hover a token" }),
        el("p", {
          class: "muted",
          html: "Hover a query token on the left to see its scores ω, weights α and the weighted sum of the values that makes its context vector z; hover a key token on the right to see who attends to it.",
        }),
      );
      if (state.layer === ROLLOUT) panel.append(el("p", { class: "muted", id: "rollout-note", text: ROLLOUT_NOTE }));
    } else if (state.side === "query") queryPanel(state.focus);
    else keyPanel(state.focus);
  }

  // ---- state -----------------------------------------------------------------------------------------
  function publish() {
    window.viewerState = Object.freeze({
      layer: state.layer,
      head: state.head,
      focus: state.focus,
      side: state.side,
      pinned: state.pinned,
      causal: DATA.causal,
      numTokens: T,
      numLayers: DATA.layers.length,
      numHeads: headCount(state.layer),
      rollout: state.layer === ROLLOUT,
      hasRollout: ROLLOUT >= 0,
      compact: compact(state.layer, state.head) !== null,
      paintedThumbs: thumbs.filter(({ item }) => item.querySelector("canvas").dataset.painted === "1").length,
      lines: published.lines,
      drawnLines: published.drawnLines,
      lastDrawMs: published.lastDrawMs,
      draws: published.draws,
      ready: true,
    });
    document.body.dataset.layer = String(state.layer);
    document.body.dataset.head = String(state.head);
    document.body.dataset.focus = state.focus === null ? "" : state.side + ":" + state.focus;
  }
  function redraw() {
    drawLines();
    drawPanel();
    paintHeatmap(document.getElementById("heatmap"), state.layer, state.head, state.focus);
    document.getElementById("heatmap-what").textContent =
      state.layer === ROLLOUT ? "rollout R of the whole model: row = token after the last layer, column = input token" : "α of this head: row = query, column = key";
    for (const { item, l, h } of thumbs) item.classList.toggle("selected", l === state.layer && h === state.head);
    publish();
  }
  function setFocus(i, side) {
    if (state.focus === i && state.side === side) return;
    state.focus = i;
    state.side = side || "query";
    redraw();
  }
  function pin(i, side) {
    const same = state.pinned === i && state.pinnedSide === side;
    state.pinned = same ? null : i;
    state.pinnedSide = side;
    state.focus = null; // force a redraw of the pin outline
    setFocus(i, side);
  }
  function fillHeads() {
    const heads = document.getElementById("head");
    const count = headCount(state.layer);
    heads.replaceChildren(...Array.from({ length: count }, (_, h) => el("option", { value: String(h), text: state.layer === ROLLOUT ? "mean" : String(h) })));
    heads.value = String(state.head);
    heads.disabled = state.layer === ROLLOUT;
  }
  function select(layer, head) {
    state.layer = layer;
    state.head = Math.min(head, headCount(layer) - 1);
    document.getElementById("layer").value = String(layer);
    fillHeads();
    redraw();
  }

  // ---- start -----------------------------------------------------------------------------------------
  const layerSelect = document.getElementById("layer");
  DATA.layers.forEach((layer, l) => layerSelect.append(el("option", { value: String(l), text: layer.name })));
  if (ROLLOUT >= 0) layerSelect.append(el("option", { value: String(ROLLOUT), text: "rollout (whole model)" }));
  layerSelect.addEventListener("change", () => select(Number(layerSelect.value), state.head));
  document.getElementById("head").addEventListener("change", (e) => select(state.layer, Number(e.target.value)));
  document.getElementById("mask-badge").hidden = !DATA.causal;
  document.getElementById("heatmap-mask").textContent = DATA.causal ? "; hatched = masked (a key after the query)" : "";
  window.viewerSelect = select;
  window.viewerFocus = setFocus;
  layout();
  buildThumbs();
  fillHeads();
  redraw();
  window.addEventListener("resize", () => {
    layout();
    redraw();
  });
})();
