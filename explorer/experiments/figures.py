"""Provenance inside figure files, so a figure found in a folder months later says where it came
from: a PNG carries it in an `iTXt` chunk with the keyword "provenance", an SVG in a
`<metadata id="provenance">` element; both hold the JSON list of the provenance records of the
answers the figure draws (the viewer's exports write the same). And the figure of each endpoint
that `explorer/plots.py` can draw.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping
from xml.etree import ElementTree

from .. import plots

KEYWORD = b"provenance"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG_NS = "http://www.w3.org/2000/svg"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    out, at = [], len(PNG_SIGNATURE)
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        out.append((png[at + 4:at + 8], png[at + 8:at + 8 + length]))
        at += 12 + length
    return out


def png_with(png: bytes, records: list[dict[str, Any]]) -> bytes:
    """`png` with an iTXt "provenance" chunk (UTF-8 JSON, uncompressed) just before its IEND."""
    text = json.dumps(records, ensure_ascii=False).encode()
    # iTXt: keyword, NUL, compression flag 0, method 0, empty language tag, NUL, empty translated keyword, NUL
    chunk = _chunk(b"iTXt", KEYWORD + b"\0\0\0\0\0" + text)
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def svg_with(svg: str, records: list[dict[str, Any]]) -> str:
    """`svg` with a `<metadata id="provenance">` holding the JSON as the root's first child."""
    ElementTree.register_namespace("", SVG_NS)
    root = ElementTree.fromstring(svg)
    meta = ElementTree.Element(f"{{{SVG_NS}}}metadata", {"id": "provenance"})
    meta.text = json.dumps(records, ensure_ascii=False)
    root.insert(0, meta)
    return ElementTree.tostring(root, encoding="unicode")


def read_provenance(path: str | Path) -> list[dict[str, Any]]:
    """The provenance records a PNG or SVG figure carries; [] when it carries none."""
    data = Path(path).read_bytes()
    if data.startswith(PNG_SIGNATURE):
        for kind, body in _chunks(data):
            if kind == b"iTXt" and body.startswith(KEYWORD + b"\0"):
                keyword_end = len(KEYWORD) + 1
                # compression flag, method, language tag NUL, translated keyword NUL, then the text
                rest = body[keyword_end + 2:]
                rest = rest[rest.index(b"\0") + 1:]
                text = rest[rest.index(b"\0") + 1:]
                return json.loads((zlib.decompress(text) if body[keyword_end] else text).decode())
        return []
    root = ElementTree.fromstring(data)
    meta = root.find(f".//{{{SVG_NS}}}metadata[@id='provenance']")
    return [] if meta is None or not meta.text else json.loads(meta.text)


# --- one figure per endpoint ------------------------------------------------------------------

def _lens(response: Mapping[str, Any]) -> Any:
    """A target's trajectory when /lens was asked about one, else the top-1 grid."""
    return plots.plot_target_trajectory(response) if response.get("target") else plots.plot_lens_grid(response)


FIGURES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "/trace": plots.plot_trajectories,
    "/attention": plots.plot_attention_heatmap,
    "/predict": plots.plot_logit_lens,
    "/lens": _lens,
    "/dla": plots.plot_dla,
    "/patch": plots.plot_patching,
    "/causal_trace": plots.plot_causal_trace,
    "/attribution_patch": plots.plot_attribution_vs_patching,
}


def save_figure(endpoint: str, response: Mapping[str, Any], provenance: dict[str, Any],
                stem: Path) -> list[Path]:
    """Draw `response` (of `endpoint`) as `stem`.png and `stem`.svg, each carrying `provenance`;
    [] when plots.py has no figure for this endpoint or this answer."""
    draw = FIGURES.get(endpoint)
    if draw is None:
        return []
    figure = draw(response)
    written = []
    for fmt, embed in (("png", png_with), ("svg", svg_with)):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, metadata={"Software": None} if fmt == "png" else {"Date": None})
        data = buffer.getvalue()
        path = stem.with_suffix(f".{fmt}")
        if fmt == "png":
            path.write_bytes(embed(data, [provenance]))
        else:
            path.write_text(embed(data.decode(), [provenance]))
        written.append(path)
    return written
