"""Command line for the model layer.

    python -m thinkrec.model export --adapters runs/ml1m/adapters --peft runs/ml1m/peft
    python -m thinkrec.model export --adapters runs/ml1m/adapters --peft out --only global expert_2
    python -m thinkrec.model convert                      # download + convert the default model once
    python -m thinkrec.model convert --model path/to/model.gguf
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thinkrec.model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write saved adapters in PEFT's format, one directory per adapter")
    ex.add_argument("--adapters", required=True, help="directory with adapters.json + adapters.safetensors")
    ex.add_argument("--peft", required=True, help="output directory; gets one subdirectory per adapter")
    ex.add_argument("--only", nargs="*", default=None, help="adapter names to export (default: all)")
    ex.add_argument("--base-model", default=None,
                    help="base_model_name_or_path to write (default: the one saved with the adapters)")
    cv = sub.add_parser("convert", help="resolve (download/convert) a model and print its directory")
    cv.add_argument("--model", default=None, help="HF id, local dir or .gguf file (default: SmolLM2-135M)")
    cv.add_argument("--cache", default=None, help="cache directory (default: $THINKREC_CACHE or ~/.cache/thinkrec)")
    args = ap.parse_args(argv)

    from thinkrec.errors import USER_ERRORS, report

    from .adapters import export_peft
    from .load import resolve_model

    try:
        if args.cmd == "export":
            for d in export_peft(args.adapters, args.peft, args.only, args.base_model):
                print(d)
        else:
            print(resolve_model(args.model, args.cache)[0])
    except USER_ERRORS as e:  # the user's input or files: the message, no traceback
        return report("python -m thinkrec.model", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
