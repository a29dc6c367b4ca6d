"""``tformer selftest``: run this device's self-check now and print its table.

    tformer selftest                 # the cached verdict, checking first if there is none
    tformer selftest --refresh       # check again (after a driver or kernel change)
    tformer selftest --json          # the verdict as JSON, for a bug report

On a CPU it checks the Triton kernels under the interpreter (TRITON_INTERPRET=1), slowly.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser(prog: str = "tformer selftest") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="a torch device (default: cuda if visible, else cpu)")
    parser.add_argument("--refresh", action="store_true", help="ignore the cached verdict and check again")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each path may take (default 300 "
                                                                     "on a GPU, 600 on a CPU)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer selftest") -> int:
    args = build_parser(prog).parse_args(argv)
    import torch

    from tformer.ops.selftest.cache import key_file
    from tformer.ops.selftest.check import format_table, verdict_for

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    verdict = verdict_for(device, refresh=args.refresh, timeout_s=args.timeout)
    if verdict is None:
        print("error: no self-check verdict (another rank holds the check; see the warning above)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(verdict, indent=1))
    else:
        print("\n".join(format_table(verdict)))
        print(f"cached at {key_file(verdict['key'])}")
    return 0
