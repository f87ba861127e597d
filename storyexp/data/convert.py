"""Raw dataset -> AR-LDM HDF5 layout:  python -m storyexp.data.convert DATASET SRC OUT.h5 [--skip-bad]

    DATASET  a registered dataset with a raw layout: pororo | flintstones | ssid (storyexp.data.registry)
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

from storyexp.errors import ConfigurationError, StoryexpError

from .hdf5 import HDF5Writer, write_hdf5
from .registry import datasets_with_raw_layout, get_dataset
from .sources import open_raw_split
from .story import StoryDataError

SPLITS = ("train", "val", "test")


def convert(dataset: str, src: str | os.PathLike, out: str | os.PathLike, *, skip_bad: bool = False,
            progress: bool = True, splits=SPLITS) -> dict:
    """Convert; returns the report (stories written and skipped per split).

    `dataset` is any registered dataset with a raw layout; what is stored, the caption dataset's name and
    the label order come from its :class:`~storyexp.data.registry.DatasetSpec`.
    """
    spec = get_dataset(dataset)
    if not spec.convertible:
        raise ConfigurationError(f"the {spec.name} dataset has no raw layout to convert; datasets with one: "
                                 f"{', '.join(datasets_with_raw_layout())}")
    src, out = Path(src), Path(out)
    report: dict = {"dataset": spec.name, "source": str(src), "output": str(out), "splits": {}}

    def fill(writer: HDF5Writer) -> None:
        bad: list[StoryDataError] = []
        with _progress(progress) as bar:
            for split in splits:
                stories = open_raw_split(spec, src, split, stored=True)
                n = len(stories)
                split_writer = writer.split(split)
                skipped = []
                task = bar(f"{spec.name} {split}", n)
                for i in range(n):
                    try:
                        split_writer.add(stories[i], index=i)  # read, checked, appended
                    except StoryDataError as err:
                        bad.append(err)
                        skipped.append({"index": i, "story_id": err.story_id, "field": err.field, "error": str(err)})
                    task()
                split_writer.close()
                report["splits"][split] = {"written": split_writer.n, "skipped": skipped}
        if bad and not skip_bad:
            listed = "\n  ".join(str(e) for e in bad)
            raise StoryDataError(f"{len(bad)} bad stories (nothing was written; --skip-bad leaves them out):\n  {listed}",
                                 file=src)

    write_hdf5(out, fill, text_key=spec.text_key, characters=list(spec.characters),
               attrs={"source": f"raw {spec.name}", "dataset": spec.name})
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
    parser.add_argument("dataset", choices=datasets_with_raw_layout())
    parser.add_argument("src", help="raw dataset directory as distributed")
    parser.add_argument("out", help="output HDF5 file")
    parser.add_argument("--skip-bad", action="store_true", help="leave bad stories out and write OUT.report.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = convert(args.dataset, args.src, args.out, skip_bad=args.skip_bad, progress=not args.no_progress)
    except (StoryDataError, StoryexpError, FileNotFoundError) as err:
        print(f"storyexp.data.convert: error: {err}", file=sys.stderr)
        return 1
    for split, info in report["splits"].items():
        print(f"{split}: {info['written']} stories written, {len(info['skipped'])} skipped")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
