"""Write the built-in synthetic task as an image folder, to try `--data imagefolder:DIR` without
images of your own: DIR/train, DIR/val and DIR/test, one folder of PNGs per class.

    python examples/synthetic_folder.py my_images [--classes 4] [--train 800] [--size 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from autoprune.data import SyntheticOptions, generate_synthetic, synthetic_class_names


def write_folder(root: Path, options: SyntheticOptions) -> None:
    names = synthetic_class_names(options.num_classes)
    for split, stream, count in (("train", 0, options.train_size), ("val", 1, options.val_size),
                                 ("test", 2, options.test_size)):
        images, labels = generate_synthetic(options, stream, count)
        for index, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{split}_{index:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train", type=int, default=800, help="training images (val and test get a quarter each)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args()
    if args.root.exists():
        parser.error(f"{args.root} exists; choose a new folder")
    options = SyntheticOptions(num_classes=args.classes, train_size=args.train, val_size=args.train // 4,
                               test_size=args.train // 4, image_size=args.size)
    write_folder(args.root, options)
    print(f"wrote {args.root}: {options.num_classes} classes, {args.train} / {args.train // 4} / {args.train // 4} "
          f"train / val / test images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
