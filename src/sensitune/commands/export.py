"""``sensitune export --run runs/x --format {delta,peft,merged} --out DIR``.

``delta``: the task delta folder (delta.safetensors + delta.json), smallest and exact.
``peft``: Hugging Face PEFT's LoRA adapter layout (adapter_config.json + adapter_model.safetensors)
for ``PeftModel.from_pretrained(timm_model, DIR)``. LoRA units (``lora``, the LoRA part of
``spt-lora``, k-bit LoRA dequantised), the head and modules trained whole are expressible;
sparse entries, sequential adapters and AdaptFormer are not: the export is refused and lists
them, unless ``--partial`` (then only the expressible part is written, with a warning).
``merged``: a plain timm model with the delta folded in (model.safetensors + config.json);
not possible for adapters (non-linear).
The storage report (bytes on disk vs the theoretical minimum) is printed for every export.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sensitune.cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run's task delta (delta, PEFT or merged model)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (holding delta/) or a delta folder")
    p.add_argument("--format", dest="fmt", choices=("delta", "peft", "merged"), default="delta")
    p.add_argument("--out", required=True, help="output folder (replaced atomically if it exists)")
    p.add_argument("--partial", action="store_true",
                   help="peft: export the expressible part even if some units cannot be expressed")
    p.add_argument("--force", action="store_true", help="apply the delta even if the base fingerprint differs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sensitune.artifacts import format_storage, read_delta, resolve_delta_dir
    from sensitune.artifacts.export import export

    from sensitune.commands._checks import refuse_non_finite_delta

    folder = resolve_delta_dir(args.run)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    refuse_non_finite_delta(read_delta(folder), folder)
    result = export(folder, out, args.fmt, partial=args.partial, force=args.force)
    delta = read_delta(folder)
    print(f"exported {delta.method} delta from {folder} as {args.fmt} -> {result.out} "
          f"({result.bytes_on_disk:,} B on disk)")
    print("storage of the delta:")
    print(format_storage(delta.storage))
    for note in result.notes:
        print(f"note: {note}")
    if result.left_out:
        print(f"WARNING: PEFT cannot express {len(result.left_out)} part(s); they were NOT exported and the "
              f"PEFT model differs from the trained one:", file=sys.stderr)
        for item in result.left_out:
            print(f"  - {item}", file=sys.stderr)
    return 0
