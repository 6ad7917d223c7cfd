"""``rsna-cspine predict-2d IMAGE --checkpoint PT [--cam OUT.png] [--saliency OUT.png]``: print class
probabilities, one line per class; optionally write the Grad-CAM and saliency pictures."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="PNG/JPEG/DICOM image")
    parser.add_argument("--checkpoint", required=True, help="best.pt of a train-2d run")
    parser.add_argument("--cam", default=None, metavar="OUT.png", help="also write the Grad-CAM overlay here")
    parser.add_argument("--saliency", default=None, metavar="OUT.png",
                        help="also write the vanilla-gradient saliency map here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.twod.predict import predict_2d

    probs = predict_2d(args.image, args.checkpoint, cam_path=args.cam, device=args.device,
                       saliency_path=args.saliency)
    for name, p in probs.items():
        print(f"{name}\t{p:.6f}")
    return 0
