"""Raw dataset -> AR-LDM HDF5 layout:  python -m storyexp.data.convert DATASET SRC OUT.h5 [--skip-bad]

    DATASET  pororo | flintstones | ssid
    SRC      the raw directory as distributed (StoryDALL-E's pororo / flintstones archive unpacked; for SSID
             the folder holding SSID_Annotations/ and SSID_Images/)
    OUT.h5   written atomically: a failed conversion leaves no file behind

Every story is read and checked first (frames per story, captions per story, missing or unreadable
images). Without --skip-bad, any problem stops the conversion with one message naming every offending
story; with --skip-bad, those stories are left out and listed in OUT.h5.report.json.

The output is what AR-LDM's own conversion scripts write (groups train/val/test, image0..image4 as PNG
bytes encoded like cv2 does from RGB arrays, captions joined by '|' in `text` or `ssid`), so AR-LDM's
readers read it; Pororo strips and Flintstones clips are stored whole (clips stacked vertically), so
storyexp's reader picks frames from them exactly as from the raw source. Also stored: story ids,
character labels and the character names. Two differences from the original scripts, on purpose:
captions are kept exactly as in the source (AR-LDM's scripts delete tabs and newlines, joining words),
and SSID frames are ordered by `image_order` (the original kept the JSON's order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from storyexp.utils.io import atomic_write

from .hdf5 import FORMAT_NAME, FORMAT_VERSION, N_FRAMES, check_story, encode_png
from .story import Story, StoryDataError

SPLITS = ("train", "val", "test")
DATASETS = ("pororo", "flintstones", "ssid")


def stored_stories(dataset: str, root: Path, split: str):
    """(number of stories, read(i) -> Story with the frames as they are to be stored, characters, text key)."""
    if dataset == "pororo":
        from .raw_pororo import PORORO_CHARACTERS, PororoRawStories

        reader = PororoRawStories(root, split)

        def read(i: int) -> Story:
            story = reader[i]
            story.frames = [reader.strip(i, j) for j in range(N_FRAMES)]
            return story

        return len(reader), read, list(PORORO_CHARACTERS), "text"
    if dataset == "flintstones":
        from .raw_flintstones import FLINTSTONES_CHARACTERS, FlintstonesRawStories

        reader = FlintstonesRawStories(root, split)

        def read(i: int) -> Story:
            story = reader[i]
            story.frames = [np.concatenate(list(reader.clip(i, j)), axis=0) for j in range(N_FRAMES)]
            return story

        return len(reader), read, list(FLINTSTONES_CHARACTERS), "text"
    if dataset == "ssid":
        from .raw_ssid import SSIDRawStories

        reader = SSIDRawStories(root, split)
        return len(reader), reader.__getitem__, [], "ssid"
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


class _SplitWriter:
    """Appends stories to one split group row by row, so a whole dataset never sits in memory."""

    def __init__(self, group: h5py.Group, text_key: str, n_characters: int):
        self.group, self.n = group, 0
        vlen = h5py.vlen_dtype(np.dtype("uint8"))
        text = h5py.string_dtype("utf-8")
        for j in range(N_FRAMES):
            group.create_dataset(f"image{j}", shape=(0,), maxshape=(None,), dtype=vlen, chunks=(64,))
        group.create_dataset(text_key, shape=(0,), maxshape=(None,), dtype=text, chunks=(256,))
        group.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=text, chunks=(256,))
        if n_characters:
            group.create_dataset("labels", shape=(0, N_FRAMES, n_characters), maxshape=(None, N_FRAMES, n_characters),
                                 dtype=np.float32, chunks=(64, N_FRAMES, n_characters))
        self.text_key, self.n_characters = text_key, n_characters

    def add(self, story: Story) -> None:
        i = self.n
        for name in self.group:
            self.group[name].resize(i + 1, axis=0)
        for j, frame in enumerate(story.frames):
            self.group[f"image{j}"][i] = encode_png(np.asarray(frame))
        self.group[self.text_key][i] = "|".join(story.captions)
        self.group["ids"][i] = str(story.id)
        if self.n_characters:
            self.group["labels"][i] = np.asarray(story.labels, dtype=np.float32)
        self.n += 1


def convert(dataset: str, src: str | os.PathLike, out: str | os.PathLike, *, skip_bad: bool = False,
            progress: bool = True, splits=SPLITS) -> dict:
    """Convert; returns the report (stories written and skipped per split)."""
    src, out = Path(src), Path(out)
    report: dict = {"dataset": dataset, "source": str(src), "output": str(out), "splits": {}}

    def write(tmp: Path) -> None:
        bad: list[StoryDataError] = []
        with h5py.File(tmp, "w") as f, _progress(progress) as bar:
            for split in splits:
                n, read, characters, text_key = stored_stories(dataset, src, split)
                f.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "text_key": text_key,
                                "characters": json.dumps(characters), "source": f"raw {dataset}"})
                writer = _SplitWriter(f.create_group(split), text_key, len(characters))
                skipped = []
                task = bar(f"{dataset} {split}", n)
                for i in range(n):
                    try:
                        story = read(i)
                        check_story(story, out, split, i)
                    except StoryDataError as err:
                        bad.append(err)
                        skipped.append({"index": i, "story_id": err.story_id, "field": err.field, "error": str(err)})
                    else:
                        writer.add(story)
                    task()
                report["splits"][split] = {"written": writer.n, "skipped": skipped}
        if bad and not skip_bad:
            listed = "\n  ".join(str(e) for e in bad)
            raise StoryDataError(f"{len(bad)} bad stories (nothing was written; --skip-bad leaves them out):\n  {listed}",
                                 file=src)

    atomic_write(out, write)
    if skip_bad:
        Path(f"{out}.report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


class _progress:
    """A rich progress bar (or nothing); `bar(name, total)` returns an advance() callable."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> Callable[[str, int], Callable[[], None]]:
        if not self.enabled:
            return lambda name, total: (lambda: None)
        from rich.progress import Progress

        self.progress = Progress(transient=False)
        self.progress.start()

        def bar(name: str, total: int):
            task = self.progress.add_task(name, total=total)
            return lambda: self.progress.advance(task)

        return bar

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storyexp.data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("src", help="raw dataset directory as distributed")
    parser.add_argument("out", help="output HDF5 file")
    parser.add_argument("--skip-bad", action="store_true", help="leave bad stories out and write OUT.report.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = convert(args.dataset, args.src, args.out, skip_bad=args.skip_bad, progress=not args.no_progress)
    except (StoryDataError, FileNotFoundError) as err:
        print(f"storyexp.data.convert: error: {err}", file=sys.stderr)
        return 1
    for split, info in report["splits"].items():
        print(f"{split}: {info['written']} stories written, {len(info['skipped'])} skipped")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
