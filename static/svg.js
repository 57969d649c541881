// Drawing helpers shared by the views. Figures style themselves with attributes, not page CSS,
// so that the exported SVG/PNG looks like the page.

const NS = "http://www.w3.org/2000/svg";
export const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
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

const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];

// Sequential colour for a value in [0, 1], as [r, g, b].
export const blues = (value) => ramp(BLUES, value);

export const rgb = ([r, g, b]) => `rgb(${r},${g},${b})`;

// A number as a label: `digits` significant digits, no trailing zeros.
export const fmt = (v, digits = 4) => String(Number(v.toPrecision(digits)));

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

const REDS = [[255, 245, 235], [253, 208, 162], [253, 141, 60], [217, 72, 1], [127, 39, 4]];

// Linear interpolation through colour stops for a value in [0, 1].
function ramp(stops, value) {
  const t = Math.min(Math.max(value, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(t), stops.length - 2);
  const f = t - i;
  return stops[i].map((c, j) => Math.round(c + (stops[i + 1][j] - c) * f));
}

// Sequential orange-red for a value in [0, 1] (surprisal: how unexpected a token was).
export const oranges = (value) => ramp(REDS, value);

// Diverging colour for a value in [-1, 1]: red below 0, white at 0, blue above.
export function diverging(value) {
  const v = Math.min(Math.max(value, -1), 1);
  const end = v < 0 ? [178, 24, 43] : [33, 102, 172];
  return end.map((c) => Math.round(255 + (c - 255) * Math.abs(v)));
}

// Dark fills need light text.
export const inkOn = ([r, g, b]) => (0.299 * r + 0.587 * g + 0.114 * b < 140 ? "#fff" : "#111");

// A horizontal colour bar `width` wide at (x, y) for `colour(t)`, t in [0, 1], labelled at both ends.
export function colourBar(x, y, width, colour, low, high) {
  const bar = el("g", { transform: `translate(${x} ${y})`, class: "colour-bar" });
  const steps = 24;
  for (let i = 0; i < steps; i++) {
    bar.append(el("rect", { x: (i * width) / steps, width: width / steps + 0.5, height: 10,
                            fill: rgb(colour(i / (steps - 1))) }));
  }
  bar.append(el("text", { x: -4, y: 9, "text-anchor": "end", "font-size": 10 }, low),
             el("text", { x: width + 4, y: 9, "font-size": 10 }, high));
  return bar;
}

// A heatmap of `values` [rows][cols] on `svg`, its top-left corner at (x, y), cells `w` x `h`
// filled with `fill(value)` (a CSS colour) and classed `cls`; row labels on the left, column
// labels below (slanted when `rotate`: tokens), thinned out when cells are small. Returns the
// cells in row-major order (for `readable`).
export function heatmap(svg, values, { x, y, w, h, fill, cls, rowLabels, colLabels, rotate = false }) {
  const g = el("g", { transform: `translate(${x} ${y})` });
  const cells = [];
  values.forEach((row, r) => row.forEach((v, c) => {
    const cell = el("rect", { x: c * w, y: r * h, width: w - 1, height: h - 1, fill: fill(v), class: `cell ${cls}`,
                              "data-row": r, "data-col": c });
    g.append(cell);
    cells.push(cell);
  }));
  const rowStep = Math.ceil(12 / h), colStep = rotate ? 1 : Math.ceil(24 / w);
  rowLabels.forEach((label, r) => r % rowStep === 0 && g.append(
    el("text", { x: -6, y: r * h + h / 2, "text-anchor": "end", "dominant-baseline": "middle", "font-size": 10 }, label)));
  const below = values.length * h + 12;
  colLabels.forEach((label, c) => c % colStep === 0 && g.append(rotate
    ? el("text", { transform: `translate(${c * w + w / 2} ${below}) rotate(50)`, "font-size": 10 }, label)
    : el("text", { x: c * w + w / 2, y: below, "text-anchor": "middle", "font-size": 10 }, label)));
  svg.append(g);
  return cells;
}
