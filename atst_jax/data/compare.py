"""Which clips two prepared datasets do not share: ``python -m atst_jax.data.compare A B``.

Reads each dataset's ``manifest.jsonl`` (atst_jax.data.lineage); a dataset prepared before manifests existed
is hashed from its shards instead (slower, and without source file names). Prints the clips only one of them
has and the clips both have under one id but with different content (other audio, labels or front end).

Exit status: 0 identical clip sets, 1 they differ, 2 bad input (one line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from atst_jax.data import lineage, records
from atst_jax.errors import UserError

SHOWN = 20  # ids listed per group; --all lists every one


class CompareError(UserError):
    """A path that is not a prepared dataset."""


def clips(directory: str) -> tuple[dict[str, dict], bool]:
    """``({id: manifest line}, from the manifest?)`` of a prepared dataset directory."""
    if not os.path.isdir(directory):
        raise CompareError(f"{directory}: no such directory")
    manifest = lineage.read_manifest(directory)
    if manifest is not None:
        entries = manifest[1]
    else:
        try:
            entries = lineage.entries_from_records(records.list_record_files(directory))
        except (OSError, ValueError) as e:
            raise CompareError(f"{directory}: not a prepared dataset ({' '.join(str(e).split())})") from None
    return {e["id"]: e for e in entries}, manifest is not None


def diff(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], list[str], list[str]]:
    """``(only in a, only in b, same id but other content)``, each sorted."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    changed = sorted(i for i in set(a) & set(b) if a[i]["sha256"] != b[i]["sha256"])
    return only_a, only_b, changed


def _describe(e: dict) -> str:
    return e["id"] + (f" ({e['file']})" if e.get("file") else "")


def _parser():
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(
        prog="python -m atst_jax.data.compare",
        description="Compare the clips of two prepared datasets: which ids only one has, and which ids both "
        "have with different content (SHA-256 of the stored records). Exit status: 0 identical, 1 they "
        "differ, 2 bad input.",
    )
    p.add_argument("a", help="a prepared dataset directory")
    p.add_argument("b", help="another prepared dataset directory")
    p.add_argument(
        "--all", action="store_true", help=f"list every differing clip (default: the first {SHOWN})"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    a, a_listed = clips(args.a)
    b, b_listed = clips(args.b)
    for path, listed in ((args.a, a_listed), (args.b, b_listed)):
        if not listed:
            print(f"note: {path} has no {lineage.MANIFEST}: hashed from its records", file=sys.stderr)
    only_a, only_b, changed = diff(a, b)
    fa = lineage.fingerprint((i, e["sha256"]) for i, e in a.items())
    fb = lineage.fingerprint((i, e["sha256"]) for i, e in b.items())
    print(f"A {args.a}: {len(a)} clips, fingerprint {fa}")
    print(f"B {args.b}: {len(b)} clips, fingerprint {fb}")
    groups = (
        (f"only in A ({len(only_a)}):", [_describe(a[i]) for i in only_a]),
        (f"only in B ({len(only_b)}):", [_describe(b[i]) for i in only_b]),
        (f"in both, different content ({len(changed)}):", [_describe(a[i]) for i in changed]),
    )
    for title, lines in groups:
        if lines:
            print(title)
            shown = lines if args.all else lines[:SHOWN]
            print("".join(f"  {x}\n" for x in shown), end="")
            if len(shown) < len(lines):
                print(f"  ... and {len(lines) - len(shown)} more (--all lists them)")
    if not (only_a or only_b or changed):
        print("identical: the same clips with the same content")
        return 0
    return 1


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
