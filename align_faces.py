"""Align face images onto the 112x112 ArcFace template.

    python align_faces.py INPUT_DIR OUTPUT_DIR [--landmarks FILE] [--model-root DIR] ...

Without --landmarks, faces and landmarks come from insightface's detector, whose ONNX files must
be on disk (default ~/.insightface/models/buffalo_l); nothing is downloaded.
"""

from __future__ import annotations

import argparse

from fame.data.align import DEFAULT_PACK, align_faces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder of face images (searched recursively)")
    parser.add_argument("output_dir", help="aligned crops are written here under the same relative paths")
    parser.add_argument("--landmarks", help="CSV (path,x1,y1,...,x5,y5) or JSON file of five landmarks per image")
    parser.add_argument("--model-root", help="folder with the insightface pack's ONNX files")
    parser.add_argument(
        "--pack", default=DEFAULT_PACK, help="model pack under ~/.insightface/models (default %(default)s)"
    )
    parser.add_argument("--image-size", type=int, default=112, help="crop size, a multiple of 112 or 128")
    parser.add_argument("--det-size", type=int, default=640, help="detector input size")
    parser.add_argument("--det-thresh", type=float, default=0.5, help="detector score threshold")
    parser.add_argument("--ctx-id", type=int, default=0, help="insightface device id (-1 for CPU)")
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of stopping")
    args = parser.parse_args(argv)
    summary = align_faces(
        args.input_dir,
        args.output_dir,
        model_root=args.model_root,
        landmarks=args.landmarks,
        image_size=args.image_size,
        pack=args.pack,
        det_size=args.det_size,
        det_thresh=args.det_thresh,
        ctx_id=args.ctx_id,
        skip_corrupt=args.skip_corrupt,
    )
    print(f"aligned {len(summary.aligned)} images into {args.output_dir}")
    if summary.no_face:
        print(f"no face found in {len(summary.no_face)}: {', '.join(summary.no_face[:10])}")
    if summary.corrupt:
        print(f"skipped {len(summary.corrupt)} unreadable: {', '.join(summary.corrupt[:10])}")


if __name__ == "__main__":
    main()
