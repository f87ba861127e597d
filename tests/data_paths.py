"""Where the parity vectors and dataset fixtures are, and the check that they are all there.

`STORYEXP_PARITY_DIR` / `STORYEXP_FIXTURES_DIR` point at other copies; by default the tests read the ones kept in
the repository (`tests/data/`, see its README). `verify_test_data()` runs once before any test (tests/conftest.py):
every file of `tests/data/MANIFEST.sha256` must be present in the folder in use, and the in-repository copies must
match their checksums. Missing data is a failure that names the path, never a skip.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
MANIFEST = DATA / "MANIFEST.sha256"
ROOTS = {"parity": "STORYEXP_PARITY_DIR", "fixtures": "STORYEXP_FIXTURES_DIR"}


def _root(name: str) -> Path:
    return Path(os.environ.get(ROOTS[name]) or DATA / name).resolve()


def parity_dir() -> Path:
    return _root("parity")


def fixtures_dir() -> Path:
    return _root("fixtures")


def manifest() -> dict[str, str]:
    """{'parity/arldm/meta.json': sha256, ...} from MANIFEST.sha256."""
    if not MANIFEST.is_file():
        raise FileNotFoundError(f"{MANIFEST} is missing: the test data folder is incomplete (see tests/data/README.md)")
    entries = {}
    for line in MANIFEST.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            entries[rel.strip()] = digest
    return entries


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_test_data() -> list[str]:
    """One line per problem (empty when every manifest file is present, and intact where it is checked)."""
    problems = []
    try:
        entries = manifest()
    except FileNotFoundError as err:
        return [str(err)]
    for name in ROOTS:
        root = _root(name)
        in_repo = root == (DATA / name).resolve()
        wanted = {rel.split("/", 1)[1]: digest for rel, digest in entries.items() if rel.startswith(name + "/")}
        if not root.is_dir():
            problems.append(f"{name} data folder {root} does not exist (set {ROOTS[name]} or restore tests/data/{name})")
            continue
        missing = sorted(rel for rel in wanted if not (root / rel).is_file())
        if missing:
            problems.append(f"{name} data folder {root} is incomplete: {len(missing)} file(s) missing, e.g. "
                            f"{root / missing[0]}")
        if in_repo:  # another copy (an override) may be a different set made the same way: presence only
            bad = sorted(rel for rel, digest in wanted.items() if (root / rel).is_file() and _sha256(root / rel) != digest)
            if bad:
                problems.append(f"{name} data folder {root}: {len(bad)} file(s) differ from MANIFEST.sha256, e.g. "
                                f"{root / bad[0]} (a git-lfs pointer or an edited file?)")
    return problems
