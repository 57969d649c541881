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
export function blues(value) {
  const t = Math.min(Math.max(value, 0), 1) * (BLUES.length - 1);
  const i = Math.min(Math.floor(t), BLUES.length - 2);
  const f = t - i;
  return BLUES[i].map((c, j) => Math.round(c + (BLUES[i + 1][j] - c) * f));
}

export const rgb = ([r, g, b]) => `rgb(${r},${g},${b})`;

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
