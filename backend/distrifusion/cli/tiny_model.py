"""``distrifusion-tiny-model``: write a small random-weight SDXL or SD 1.5 pipeline to a directory."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..tiny_model import ARCHS, save_tiny_model


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the CLI."""
    parser = argparse.ArgumentParser(
        prog="distrifusion-tiny-model",
        description=(
            "Write a random-weight diffusers pipeline with the real SDXL (or SD 1.5) architecture and "
            "CLIP tokenizers, shrunk in width, for tests and benchmarks without a model hub."
        ),
    )
    parser.add_argument("output_dir", type=Path, help="directory to write (save_pretrained layout)")
    parser.add_argument("--arch", choices=ARCHS, default="sdxl", help="architecture (default: sdxl)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    output_dir = save_tiny_model(args.output_dir, arch=args.arch, seed=args.seed)
    files = sorted(p for p in output_dir.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    summary = f"{len(files)} files, {total / 2**20:.1f} MiB"
    print(f"wrote tiny {args.arch} pipeline (seed {args.seed}) to {output_dir}: {summary}")
    for path in files:
        print(f"  {path.relative_to(output_dir)}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
