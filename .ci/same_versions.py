"""Compare two `pip freeze` outputs: exit 1, naming them, if a package of the first changed version or vanished.

    python .ci/same_versions.py before.txt after.txt

Packages that only the second lists (what an extra added) are fine; so are editable or URL lines.
"""

import re
import sys


def versions(path):
    """{normalised name: version} of the `name==version` lines of a freeze file."""
    out = {}
    for line in open(path, encoding="utf-8"):
        name, sep, version = line.strip().partition("==")
        if sep:
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def main(before_path, after_path):
    before, after = versions(before_path), versions(after_path)
    changed = [f"{n} {v} -> {after.get(n, 'removed')}" for n, v in sorted(before.items()) if after.get(n) != v]
    added = sorted(set(after) - set(before))
    if changed:
        print(f"error: installing the extras changed {len(changed)} installed version(s): {'; '.join(changed)}",
              file=sys.stderr)
        return 1
    print(f"same versions: {len(before)} packages of the base install unchanged, {len(added)} added by the extras")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
