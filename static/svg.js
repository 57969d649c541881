// Drawing helpers shared by the views. Figures style themselves with attributes, not page CSS,
// so that the exported SVG/PNG looks like the page.

const NS = "http://www.w3.org/2000/svg";
const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
export const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                        "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

// A figure's root: fixed natural size (CSS scales it down on small screens) and a white
// background so the PNG is not transparent.
export function figure(width, height, label) {
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "font-family": FONT,
                          "font-size": 12, role: "img", "aria-label": label, class: "figure" });
  svg.append(el("rect", { width, height, fill: "#fff" }));
  return svg;
}

// Tokens as labels: spaces and newlines made visible, long tokens shortened.
export function showToken(token, max = 14) {
  const s = token.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}

// Every number the views show: `digits` significant digits without trailing zeros (small values
// stay readable), or `decimals` fixed places where values are compared down a column; `sign`
// puts "+" before values >= 0, for signed quantities.
export function fmt(v, { digits = 4, decimals, sign = false } = {}) {
  const s = decimals === undefined ? String(Number(v.toPrecision(digits))) : v.toFixed(decimals);
  return sign && v >= 0 ? `+${s}` : s;
}

// A share in [0, 1] as a percentage: two significant digits below 10%, so small ones do not all
// read "0.0%".
export const percent = (p) => `${fmt(p * 100, p >= 0.1 ? { decimals: 1 } : { digits: 2 })}%`;

// The colour convention of every figure, stated under each colour bar: signed values (effects,
// recoveries, attributions) on a diverging scale centred on 0, symmetric to the largest |value|;
// non-negative ones (probabilities, weights, gates, entropies) on a sequential scale from white.
// A scale: its ends `lo` and `hi`, `colour(v)` as [r, g, b], and `note`, the convention in words.
const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
export const ORANGES = [[255, 245, 235], [253, 208, 162], [253, 141, 60], [217, 72, 1], [127, 39, 4]];
const BLUE = [33, 102, 172], RED = [178, 24, 43];

// Linear interpolation through colour stops for a value in [0, 1].
function ramp(stops, value) {
  const t = Math.min(Math.max(value, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(t), stops.length - 2);
  const f = t - i;
  return stops[i].map((c, j) => Math.round(c + (stops[i + 1][j] - c) * f));
}

export const sequential = (hi, { lo = 0, stops = BLUES } = {}) => ({
  lo, hi, note: "sequential: darker = higher",
  colour: (v) => ramp(stops, (v - lo) / (hi - lo || 1)),
});

export const diverging = (max) => ({
  lo: -max, hi: max, note: "diverging: 0 = white, blue +, red −",
  colour: (v) => ramp([RED, [255, 255, 255], BLUE], (v / (max || 1) + 1) / 2),
});

export const rgb = ([r, g, b]) => `rgb(${r},${g},${b})`;

// Dark fills need light text.
export const inkOn = ([r, g, b]) => (0.299 * r + 0.587 * g + 0.114 * b < 140 ? "#fff" : "#111");

// A horizontal colour bar of `scale`, `width` wide at (x, y): its ends labelled (`label` after the
// high one), the scale's convention written under it.
export function colourBar(x, y, width, scale, label = "") {
  const bar = el("g", { transform: `translate(${x} ${y})`, class: "colour-bar" });
  const steps = 24;
  for (let i = 0; i < steps; i++) {
    const v = scale.lo + (scale.hi - scale.lo) * (i / (steps - 1));
    bar.append(el("rect", { x: (i * width) / steps, width: width / steps + 0.5, height: 10, fill: rgb(scale.colour(v)) }));
  }
  bar.append(el("text", { x: -4, y: 9, "text-anchor": "end", "font-size": 10 }, fmt(scale.lo)),
             el("text", { x: width + 4, y: 9, "font-size": 10 },
                `${fmt(scale.hi, { sign: scale.lo < 0 })} ${label}`.trim()),
             el("text", { y: 23, "font-size": 10, fill: "#555" }, scale.note));
  return bar;
}

// A [rows][cols] grid as one pixel <image>, `width` x `height`: for grids too large for a rect
// per cell (long texts' attention) and for thumbnails.
function pixelImage(values, scale, width, height) {
  const rows = values.length, cols = values[0].length;
  const canvas = Object.assign(document.createElement("canvas"), { width: cols, height: rows });
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(cols, rows);
  values.forEach((row, r) => row.forEach((v, c) => pixels.data.set([...scale.colour(v), 255], (r * cols + c) * 4)));
  ctx.putImageData(pixels, 0, 0);
  return el("image", { href: canvas.toDataURL("image/png"), width, height,
                       style: "image-rendering: pixelated", preserveAspectRatio: "none" });
}

// The heatmap of every view: `values` [rows][cols] drawn in `parent` with its top-left corner at
// (x, y), cells `w` x `h` (less `gap`) coloured by `scale`. A cell is a <rect class="cell CLS">
// with data-row, data-col and `attrs(row, col)`; with `text(value, row, col)` it is a <g> of the
// rect and that label. Row labels on the left, column labels below (`above`: above; slanted when
// `rotate`: tokens), thinned out when cells are small. `image`: one pixel image, no cells.
// Returns the cells in row-major order (for `readable`).
export function heatmap(parent, values, { x = 0, y = 0, w, h, scale, cls = "", gap = 1, rowLabels = [],
                                          colLabels = [], above = false, rotate = false, text, attrs, image = false }) {
  const g = el("g", { transform: `translate(${x} ${y})` });
  const cells = [];
  if (image) {
    g.append(pixelImage(values, scale, values[0].length * w, values.length * h));
  } else {
    values.forEach((row, r) => row.forEach((v, c) => {
      const colour = scale.colour(v);
      const box = { x: c * w, y: r * h, width: w - gap, height: h - gap, fill: rgb(colour) };
      const data = { class: `cell ${cls}`.trim(), "data-row": r, "data-col": c, ...attrs?.(r, c) };
      const label = text?.(v, r, c);
      const cell = label == null ? el("rect", { ...box, ...data }) : el("g", data, el("rect", box),
        el("text", { x: c * w + (w - gap) / 2, y: r * h + (h - gap) / 2, "text-anchor": "middle",
                     "dominant-baseline": "middle", "font-size": Math.min(11, h / 2), fill: inkOn(colour) }, label));
      g.append(cell);
      cells.push(cell);
    }));
  }
  const rowStep = Math.ceil(12 / h);
  const colStep = Math.ceil((rotate ? 12 : 6 * Math.max(0, ...colLabels.map((l) => l.length)) + 6) / w);
  rowLabels.forEach((label, r) => r % rowStep === 0 && g.append(
    el("text", { x: -6, y: r * h + h / 2, "text-anchor": "end", "dominant-baseline": "middle", "font-size": 10 }, label)));
  const at = above ? -6 : values.length * h + 12;
  colLabels.forEach((label, c) => c % colStep === 0 && g.append(rotate
    ? el("text", { transform: `translate(${c * w + w / 2} ${at}) rotate(${above ? -60 : 50})`,
                   "dominant-baseline": "middle", "font-size": 10 }, label)
    : el("text", { x: c * w + w / 2, y: at, "text-anchor": "middle", "font-size": 10 }, label)));
  parent.append(g);
  return cells;
}

const tip = document.getElementById("tip");

function showTip(item, text) {
  const box = item.getBoundingClientRect();
  tip.textContent = text;
  tip.hidden = false;
  const left = Math.min(box.right + 8, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(left, 8)}px`;
  tip.style.top = `${Math.max(box.top - tip.offsetHeight - 4, 8)}px`;
}

// Hover and keyboard reading of a figure's items (row-major, `cols` per row): the mouse or the
// arrow keys (once the figure has focus) pick an item, `describe(i)` says what it is, shown in a
// tooltip by the item and in the view's live readout line for screen readers.
export function readable(svg, items, cols, describe, readout) {
  let current = 0;
  const pick = (i) => {
    items[current]?.classList.remove("current");
    current = i;
    items[i].classList.add("current");
    const text = describe(i);
    readout.textContent = text;
    showTip(items[i], text);
  };
  items.forEach((item, i) => item.addEventListener("mouseenter", () => pick(i)));
  svg.addEventListener("mouseleave", () => { tip.hidden = true; });
  svg.addEventListener("blur", () => { tip.hidden = true; });
  svg.setAttribute("tabindex", "0");
  svg.addEventListener("focus", () => items.length && pick(current));
  svg.addEventListener("keydown", (event) => {
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols,
                   Home: -current, End: items.length - 1 - current }[event.key];
    if (step === undefined || event.target !== svg) return;  // not while a control inside has focus
    event.preventDefault();
    const i = current + step;
    if (i >= 0 && i < items.length) pick(i);
  });
}
