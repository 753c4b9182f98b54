"""README blocks: the results the experiments and benchmarks measure, written between markers in the README."""

from __future__ import annotations

import shutil
from pathlib import Path


def update_readme(readme: Path, block: str, start: str, end: str) -> None:
    """Replace the text between two markers (the README's results come from demo and benchmark runs)."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme}: no {start} ... {end} markers to write the results into")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{block.strip()}\n{end}{tail}")


def publish_to_readme(readme: Path, text: str, images: list[tuple[Path, str, str]],
                      start: str, end: str) -> None:
    """Copy each (source, file name, alt text) image to docs/images beside the README and write `text`
    followed by the image links into the README block between `start` and `end`."""
    folder = readme.parent / "docs" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for source, name, alt in images:
        shutil.copy(source, folder / name)
        links.append(f"![{alt}](docs/images/{name})")
    update_readme(readme, text.rstrip() + "\n\n" + "\n".join(links) + "\n", start, end)
