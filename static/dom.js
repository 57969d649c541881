// Page (HTML) helpers shared by every module, as svg.js is for figures.

export const $ = (selector) => document.querySelector(selector);

// An element with properties, then attributes (for the ARIA and data ones that have no property).
export function make(tag, props = {}, attrs = {}) {
  const node = Object.assign(document.createElement(tag), props);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// Fills a <select> with [value, label] pairs.
export function options(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

// [value, label] pairs "0".."n-1" labelled `${prefix}0`.., for a layer or head <select>.
export const range = (n, prefix) => Array.from({ length: n }, (_, i) => [String(i), `${prefix}${i}`]);
