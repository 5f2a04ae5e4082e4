"""`anondata demo`: keygen, anonymize, verify, restore on two sample photos; writes a PNG grid."""

from __future__ import annotations

from ._args import ExamplesFormatter, count, positive


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on two sample photos (offline) and write a PNG grid",
        description=(
            "Runs keygen, anonymize (faces detected), verify and restore on two public-domain sample "
            "photos that ship with scikit-image and matplotlib, then writes OUT/demo.png: one row per "
            "photo, columns original | anonymized | restored | wrong key. Needs no network."
        ),
        epilog="""examples:
  anondata demo                                 # writes anondata-demo/demo.png
  anondata demo --out /tmp/demo --steps 20 --inversion-iters 8
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("--out", default="anondata-demo", metavar="DIR", help="new folder for everything (default: anondata-demo)")
    p.add_argument("--model", default="embedded", help="'embedded' (default), a local diffusers folder, or a Hub id")
    p.add_argument("--steps", type=positive, default=None, help="sampler steps (default: 10)")
    p.add_argument("--inversion-iters", type=count, default=None, help="fixed-point inversion iterations (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (drawn only when stderr is a terminal)")
    p.set_defaults(run=run, interrupted="what it wrote is removed")


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, model=args.model, steps=args.steps, inversion_iters=args.inversion_iters,
             progress=not args.no_progress)
    return 0
