"""Stage `prepare`: unpack data/raw/dataset.zip safely, check every image and split the dataset.

Writes data/prepared/ (built in a temporary sibling folder and renamed into place at the end):
  images/        the images the manifest lists, as unpacked; converted images replace their originals as
                 `<name>.png`; every other file the archive held is deleted and listed in report.json
  manifest.csv   path,label,split (train, val, test),sha256; paths relative to the project root
  classes.json   the sorted class names; a label's index is its position in this list
  report.json    classes, counts per split and class, skipped files, converted images, ignored entries,
                 warnings (classes with fewer than MIN_TRAIN_IMAGES training images), left_out (classes
                 too small to keep, each with its reason)

A class with fewer usable images than data.min_class_images, or too few in one folder to reach every split
(train, val, test), is left out with one line for all of them; with data.min_class_images null, it stops the
stage with one line naming the class, its folder and the images it needs. The classes with few training
images get one warning line between them.
"""

from __future__ import annotations

from tlpipe.errors import stage_main
from tlpipe.params import load_params
from tlpipe.paths import PREPARED_DIR, RAW_ARCHIVE
from tlpipe.preparation import Settings, prepare, summary


@stage_main
def main() -> None:
    settings = Settings.from_params(load_params())
    report = prepare(RAW_ARCHIVE, PREPARED_DIR, settings)
    print(f"{summary(report)} -> {PREPARED_DIR}/")


if __name__ == "__main__":
    main()
