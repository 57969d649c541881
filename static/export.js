// Downloads of a view: its figure as SVG or PNG, and the API answers it was drawn from as JSON.

function save(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function svgText(svg) {
  const copy = svg.cloneNode(true);
  copy.querySelectorAll(".current").forEach((node) => node.classList.remove("current"));
  return '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(copy);
}

export function saveSVG(svg, filename) {
  save(new Blob([svgText(svg)], { type: "image/svg+xml" }), filename);
}

// Rasterise at twice the figure's size so the PNG stays sharp on high-density screens.
export async function savePNG(svg, filename, scale = 2) {
  const image = new Image();
  image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svgText(svg));
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = svg.width.baseVal.value * scale;
  canvas.height = svg.height.baseVal.value * scale;
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  save(blob, filename);
}

export function saveJSON(data, filename) {
  save(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }), filename);
}
