"""docs/results.md: the results the experiments and benchmarks measure, each written between its markers there."""

from __future__ import annotations

import shutil
from pathlib import Path


def write_block(doc: Path, block: str, start: str, end: str) -> None:
    """Replace the text between two markers of `doc` (the text around them is written by hand)."""
    text = doc.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{doc}: no {start} ... {end} markers to write the results into")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{block.strip()}\n{end}{tail}")


def publish(doc: Path, text: str, images: list[tuple[Path, str, str]], start: str, end: str) -> None:
    """Copy each (source, file name, alt text) image into the `images/` folder beside `doc` and write `text`
    followed by the image links into `doc`'s block between `start` and `end`."""
    folder = doc.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for source, name, alt in images:
        shutil.copy(source, folder / name)
        links.append(f"![{alt}](images/{name})")
    write_block(doc, text.rstrip() + "\n\n" + "\n".join(links) + "\n", start, end)
