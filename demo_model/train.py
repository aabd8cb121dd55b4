"""Trains the demo model from nothing and writes it as a diffusers directory:

    python -m demo_model.train [--output demo_model/sdxl-shapes] [--work build/demo_model]

Stage 1 trains the VAE (:mod:`.train_vae`), stage 2 the UNet on cached latents and text encodings
(:mod:`.train_unet`). Both checkpoint into ``--work`` every few hundred steps: the same command
resumes an interrupted run, and skips a stage already finished. The defaults are the run that made
the shipped model (about 90 minutes from nothing on 2 CPU cores; demo_model/README.md has
the figures).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from distrifusion.clip_vocab import write_clip_bpe_files

from . import SHIPPED
from .preview_map import fit_preview_map
from .train_unet import train_unet
from .train_vae import train_vae


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo_model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=SHIPPED, help="diffusers directory to write")
    parser.add_argument("--work", type=Path, default=Path("build/demo_model"), help="checkpoints and caches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=16000, help="training scenes (seeds 0..N-1)")
    parser.add_argument("--learning-rate", type=float, default=6e-4, help="the peak learning rate")
    parser.add_argument(
        "--freeze-text-encoders",
        action="store_true",
        help="keep both text encoders at their seeded random weights (default: trained with the UNet;"
        " frozen, 4000 steps drew backgrounds of the prompted colour 12.5%% of the time, chance)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    vae_dir = args.work / "vae"
    if (args.work / "vae.ckpt").exists() and (vae_dir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_dir)
    else:
        vae = train_vae(args.work, args.vae_steps, args.batch, args.seed)
        vae.save_pretrained(vae_dir)
    vae_minutes = (time.monotonic() - started) / 60
    pipe = train_unet(args.work, vae, args.unet_steps, args.batch, args.scenes, args.seed, args.learning_rate,
                      text_encoders=not args.freeze_text_encoders)  # fmt: skip
    # Half precision halves what the repository carries; the loaders cast to the run's dtype.
    pipe.to(torch.float16).save_pretrained(args.output, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_bpe_files(args.output / name)
    shipped_vae = AutoencoderKL.from_pretrained(args.output / "vae", dtype=torch.float32).eval()
    fit_preview_map(shipped_vae).save(args.output / "vae")  # the previews of streamed requests
    summary = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "batch": args.batch,
        "scenes": args.scenes,
        "learning_rate": args.learning_rate,
        "train_text_encoders": not args.freeze_text_encoders,
        "vae_scaling_factor": vae.config.scaling_factor,
        "minutes_this_run": round((time.monotonic() - started) / 60, 1),
        "vae_minutes_this_run": round(vae_minutes, 1),
    }
    (args.output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    tqdm.write(f"wrote {args.output}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
