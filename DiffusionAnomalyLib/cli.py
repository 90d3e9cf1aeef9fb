"""The ``diffusion-anomaly`` command: phantom, train, run, evaluate, demo, import-checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_phantom(args) -> int:
    import json

    from .export import check_writable_dir, write_json
    from .phantoms import make_phantom
    from .volume import write_volume

    out = check_writable_dir(args.out)
    ext = ".nrrd" if args.format == "nrrd" else ".nii.gz"
    for n in range(args.count):
        seed = args.seed + n
        case = make_phantom(seed, n_lesions=args.lesions)
        stem = f"phantom_{seed:06d}"
        write_volume(case.pet, out / f"{stem}_pet{ext}")
        write_volume(case.lesion_labels, out / f"{stem}_lesions{ext}")
        write_json({"seed": seed, "lesions": case.lesions, **case.pet.meta}, out / f"{stem}.json")
        print(f"{stem}: {len(case.lesions)} lesion(s) -> {out}")
        if args.verbose:
            print(json.dumps(case.lesions, indent=1))
    return 0


def _cmd_train(args) -> int:
    from .training import TrainConfig, default_card, train

    cfg = TrainConfig(
        out=Path(args.out), train_seeds=(args.train_seed, args.train_seed + args.train_cases),
        val_seeds=(args.val_seed, args.val_seed + args.val_cases), steps=args.steps, max_minutes=args.max_minutes,
        batch_size=args.batch_size, lr=args.lr, val_every=args.val_every, seed=args.seed, device=args.device,
        workers=args.workers, resume=not args.no_resume,
    )
    best = train(cfg, default_card(), log=lambda m: print(m, flush=True))
    print(f"best checkpoint: {best}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-anomaly", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write seeded synthetic PET phantoms with lesion masks")
    ph.add_argument("--out", required=True)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--count", type=int, default=1)
    ph.add_argument("--lesions", type=int, default=None, help="number of lesions (default: random 0..4)")
    ph.add_argument("--format", choices=("nrrd", "nifti"), default="nrrd")
    ph.add_argument("--verbose", action="store_true")
    ph.set_defaults(func=_cmd_phantom)

    tr = sub.add_parser("train", help="train (or resume) an IgCONDA-PET model on phantoms")
    tr.add_argument("--out", required=True, help="work folder: best.safetensors, state.safetensors, cache/")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--max-minutes", type=float, default=None)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--train-seed", type=int, default=1000)
    tr.add_argument("--train-cases", type=int, default=160)
    tr.add_argument("--val-seed", type=int, default=900000)
    tr.add_argument("--val-cases", type=int, default=12)
    tr.add_argument("--val-every", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--workers", type=int, default=2)
    tr.add_argument("--no-resume", action="store_true")
    tr.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
