// Downloads of a view: its figure as SVG or PNG, and the API answers it was drawn from as JSON.
// Each carries the provenance records of those answers (model, software, request, seeds, time),
// so that a file found in a folder months later says where it came from; the formats are
// explorer/experiments/figures.py's (which reads them back) and the experiment runner's result.json.

function save(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// The answers a view's data holds (the data itself, or objects and arrays holding answers, such
// as the compare view's two /lens and /attention answers), in order: every object whose
// `provenance` names its endpoint (every answer the viewer asks for, every job result).
function answersIn(data) {
  if (Array.isArray(data)) return data.flatMap(answersIn);
  if (data === null || typeof data !== "object") return [];
  if (typeof data.provenance?.endpoint === "string") return [data];
  return Object.values(data).flatMap(answersIn);
}

export const provenanceOf = (data) => answersIn(data).map((answer) => answer.provenance);

const without = (object, keys) => Object.fromEntries(Object.entries(object).filter(([key]) => !keys.includes(key)));

// The SVG with the records as JSON in a <metadata id="provenance">, the root's first child.
function svgText(svg, records) {
  const copy = svg.cloneNode(true);
  copy.querySelectorAll(".current").forEach((node) => node.classList.remove("current"));
  const metadata = document.createElementNS("http://www.w3.org/2000/svg", "metadata");
  metadata.id = "provenance";
  metadata.textContent = JSON.stringify(records);
  copy.prepend(metadata);
  return '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(copy);
}

export function saveSVG(svg, records, filename) {
  save(new Blob([svgText(svg, records)], { type: "image/svg+xml" }), filename);
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

// CRC-32 (the PNG chunk checksum, zlib's crc32).
function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// `png` (bytes) with an iTXt chunk "provenance" holding the records as uncompressed UTF-8 JSON,
// just before IEND (always the last 12 bytes: it has no data).
function pngWith(png, records) {
  // keyword, NUL, compression flag 0, method 0, empty language tag, NUL, empty translated keyword, NUL
  const body = new TextEncoder().encode("iTXtprovenance\0\0\0\0\0" + JSON.stringify(records));
  const chunk = new Uint8Array(body.length + 8);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, body.length - 4);  // the data's length: without the type
  chunk.set(body, 4);
  view.setUint32(body.length + 4, crc32(body));  // over type and data
  const end = png.length - 12;
  return new Blob([png.subarray(0, end), chunk, png.subarray(end)], { type: "image/png" });
}

// Rasterise at twice the figure's size so the PNG stays sharp on high-density screens.
export async function savePNG(svg, records, filename, scale = 2) {
  const image = new Image();
  image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svgText(svg, records));
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = svg.width.baseVal.value * scale;
  canvas.height = svg.height.baseVal.value * scale;
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  save(pngWith(new Uint8Array(await blob.arrayBuffer()), records), filename);
}

// The view's answers, each as the request to send again (without "provenance", "async" and
// "stream", which change the answer's form only), the response (without its provenance) and the provenance: what
// `python -m explorer replay` reads. A view whose data holds no answer saves that data instead.
export function saveJSON(view, data, filename) {
  const requests = answersIn(data).map(({ provenance, ...response }, i) => ({
    name: `${view}-${i}`, endpoint: provenance.endpoint, request: without(provenance.request, ["provenance", "async", "stream"]),
    response, provenance,
  }));
  const result = { format: "explorer-result/1", view, created: new Date().toISOString(), requests,
                   ...(requests.length ? {} : { data }) };
  save(new Blob([JSON.stringify(result, null, 2)], { type: "application/json" }), filename);
}
