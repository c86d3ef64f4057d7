"""Hand mutation pass: apply one textual change to the library, run its tests, restore the file.

Usage (from the repository root): PYTHONPATH=$PWD python tests/scripts/mutate.py [tests/scripts/mutations.json]

Each entry of the JSON list names a file, an exact string, its replacement and the test files to run;
the pass prints CAUGHT (a test failed) or SURVIVED for each. Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(mutation: dict) -> tuple[bool, str]:
    path = os.path.join(ROOT, mutation["file"])
    with open(path) as fh:
        source = fh.read()
    if mutation["old"] not in source:
        return False, "mutation no longer applies: the code changed"
    with open(path, "w") as fh:
        fh.write(source.replace(mutation["old"], mutation["new"], 1))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", *mutation["tests"]],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        with open(path, "w") as fh:
            fh.write(source)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    return result.returncode != 0, failed[0] if failed else ""


def main(spec: str) -> None:
    with open(spec) as fh:
        mutations = json.load(fh)
    for mutation in mutations:
        caught, detail = run(mutation)
        print(f"{mutation['id']:36s} {'CAUGHT' if caught else 'SURVIVED'} {detail[:100]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "mutations.json"))
