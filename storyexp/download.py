"""`storyexp-download` / `python -m storyexp.download`: fetch the pretrained files each model reads into weights/.

    storyexp-download                      # everything (arldm, mindalle, mega, fid)
    storyexp-download arldm fid            # by model, or by entry name (`--list` shows them)
    storyexp-download --check              # present / missing / incomplete / checksum mismatch; exit 1 if not all present
    storyexp-download --list               # the table of sources, destinations, sizes, licences

The layout written is exactly what `model=arldm|mindalle|mega` and the FID metric read
(storyexp/download_sources.py has the table). Hugging Face repositories go through
`huggingface_hub.snapshot_download(local_dir=...)` (it resumes and verifies itself; `HF_HUB_OFFLINE=1` is honoured:
nothing is fetched from the hub). Plain URLs are fetched resumably: the bytes go into `<file>.part` (an
interrupted download continues with an HTTP Range request) and the file is renamed into place only once complete
and verified: md5 where the source publishes one (minDALL-E's URL carries it), the sha256 prefix in a torch.hub-style
file name (the FID weights), and otherwise **trust on first use**: no sha256 is published for them, so the sha256 of
the first complete download is recorded in `<weights>/.storyexp-sha256.json` and every later `--check` (or a
re-download) is compared with it.

HTTP client: the standard library's urllib. Considered: torch.hub.download_url_to_file (checks a hash prefix but
cannot resume), huggingface_hub's internal `http_get` (resumes, but is not public API and its signature changes
between releases), httpx / requests (not dependencies of storyexp). Progress bars are rich's.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from storyexp.download_sources import GROUPS, SOURCES, Source, sources_by_name
from storyexp.utils.io import atomic_write_text

__all__ = ["DownloadError", "Manifest", "Status", "check", "default_weights_dir", "download", "fetch_url", "main",
           "resolve_names"]

MANIFEST_NAME = ".storyexp-sha256.json"
CHUNK = 1 << 20
TIMEOUT_S = 30.0

PRESENT, MISSING, INCOMPLETE, MISMATCH = "present", "missing", "incomplete", "checksum mismatch"

TOFU_HELP = ("Checksums: md5 where published (minDALL-E), the sha256 prefix in the FID weights' file name, and for "
             "files without a published checksum (BLIP's model_large.pth) trust on first use: the sha256 of the "
             "first complete download is recorded in <weights-dir>/" + MANIFEST_NAME + " and later --check runs "
             "verify the files against it. Hugging Face repositories are verified by huggingface_hub.")


class DownloadError(Exception):
    """An expected failure (network, HTTP status, checksum): its message is one line for the user."""


class UnknownNameError(DownloadError):
    """A name on the command line that is neither a model nor an entry (exit status 2, like argparse's)."""


# ------------------------------------------------------------------------------------------------ places


def default_weights_dir(environ: dict[str, str] | os._Environ | None = None, cwd: Path | None = None) -> Path:
    """$STORYEXP_WEIGHTS_DIR, else $STORYEXP_ROOT/weights, else ./weights: storyexp/conf/paths/default.yaml's rule."""
    env = os.environ if environ is None else environ
    if env.get("STORYEXP_WEIGHTS_DIR"):
        return Path(env["STORYEXP_WEIGHTS_DIR"]).expanduser()
    root = Path(env["STORYEXP_ROOT"]).expanduser() if env.get("STORYEXP_ROOT") else (cwd or Path.cwd())
    return root / "weights"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (at its import) or as set since."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.is_offline_mode()) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


# ------------------------------------------------------------------------------------------------ manifest


class Manifest:
    """`<weights>/.storyexp-sha256.json`: {relative path: {sha256, size, source, recorded}} (trust on first use)."""

    def __init__(self, weights_dir: Path):
        self.path = Path(weights_dir) / MANIFEST_NAME
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise DownloadError(f"{self.path} is not readable JSON ({err}); fix or delete it (its recorded "
                                    "sha256 values are then recorded again on the next download)") from None
            self.entries = dict(data.get("files", {})) if isinstance(data, dict) else {}

    def get(self, rel: str) -> dict | None:
        return self.entries.get(rel)

    def record(self, rel: str, sha256: str, size: int, source: str) -> None:
        self.entries[rel] = {"sha256": sha256, "size": size, "source": source,
                             "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"comment": "sha256 of each file as first downloaded by storyexp-download (trust on "
                                      "first use); storyexp-download --check verifies against it",
                           "files": dict(sorted(self.entries.items()))}, indent=1)
        atomic_write_text(self.path, text + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ check


@dataclass
class Status:
    name: str
    state: str             # present | missing | incomplete | checksum mismatch
    path: Path
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == PRESENT


def _missing_required(folder: Path, source: Source) -> list[str]:
    return [alts[0] for _, alts in source.required if not any((folder / alt).is_file() for alt in alts)]


def _verify_recorded(weights_dir: Path, rel: str, manifest: Manifest, hash_files: bool) -> str | None:
    """None when the file agrees with its manifest record (or there is none); otherwise what differs."""
    record = manifest.get(rel)
    if record is None:
        return None
    path = weights_dir / rel
    size = path.stat().st_size
    if record.get("size") is not None and size != record["size"]:
        return f"{rel}: {size} bytes, {record['size']} recorded"
    if hash_files and file_sha256(path) != record.get("sha256"):
        return f"{rel}: sha256 differs from the one recorded on {record.get('recorded', '?')}"
    return None


def _part_size(path: Path) -> int | None:
    part = path.with_name(path.name + ".part")
    return part.stat().st_size if part.is_file() else None


def check_one(source: Source, weights_dir: Path, manifest: Manifest, hash_files: bool = True) -> Status:
    dest = weights_dir / source.dest
    if source.kind == "hub":
        missing = _missing_required(dest, source)
        incomplete = sorted(dest.glob(".cache/huggingface/download/**/*.incomplete")) if dest.is_dir() else []
        if missing and incomplete:
            return Status(source.name, INCOMPLETE, dest, f"{len(incomplete)} file(s) half downloaded; rerun to resume")
        if missing:
            return Status(source.name, MISSING, dest, "missing: " + ", ".join(missing))
        return Status(source.name, PRESENT, dest)
    if source.kind == "manual":
        if dest.is_file():
            return Status(source.name, PRESENT, dest, "fetched by hand")
        return Status(source.name, MISSING, dest, f"fetch by hand: {source.pointer}")
    if source.archive:
        missing = _missing_required(dest, source)
        archive = dest / source.filename
        if missing:
            part = _part_size(archive)
            if part is not None:
                return Status(source.name, INCOMPLETE, dest, f"{archive.name}.part: {part} bytes so far; rerun to resume")
            if archive.is_file():
                return Status(source.name, INCOMPLETE, dest, f"{archive.name} downloaded but not unpacked; rerun")
            return Status(source.name, MISSING, dest, "missing: " + ", ".join(missing))
        for _, alts in source.required:
            rel = (Path(source.dest) / alts[0]).as_posix()
            problem = _verify_recorded(weights_dir, rel, manifest, hash_files)
            if problem:
                return Status(source.name, MISMATCH, dest, problem)
        return Status(source.name, PRESENT, dest)
    # one file
    if not dest.is_file():
        part = _part_size(dest)
        if part is not None:
            return Status(source.name, INCOMPLETE, dest, f"{dest.name}.part: {part} bytes so far; rerun to resume")
        return Status(source.name, MISSING, dest, f"from {source.url}")
    if source.sha256_prefix and hash_files and not file_sha256(dest).startswith(source.sha256_prefix):
        return Status(source.name, MISMATCH, dest, f"sha256 does not start with {source.sha256_prefix} (its file name)")
    problem = _verify_recorded(weights_dir, source.dest, manifest, hash_files)
    if problem:
        return Status(source.name, MISMATCH, dest, problem)
    if manifest.get(source.dest) is None and not source.sha256_prefix and not source.md5:
        return Status(source.name, PRESENT, dest, "no sha256 recorded (not fetched by storyexp-download)")
    return Status(source.name, PRESENT, dest)


def check(names: Sequence[str], weights_dir: Path, sources: Sequence[Source] = SOURCES,
          hash_files: bool = True) -> list[Status]:
    table = sources_by_name(tuple(sources))
    manifest = Manifest(weights_dir)
    return [check_one(table[name], weights_dir, manifest, hash_files) for name in resolve_names(names, sources)]


# ------------------------------------------------------------------------------------------------ names


def resolve_names(names: Sequence[str], sources: Sequence[Source] = SOURCES) -> list[str]:
    """Entry names for the given model / entry names (case-insensitive), in table order; [] means all."""
    table = [source.name for source in sources]
    if not names:
        return table
    lower = {name.lower(): name for name in table}
    wanted: set[str] = set()
    for name in names:
        key = name.lower()
        if key in GROUPS:
            wanted.update(n for n in GROUPS[key] if n in table)
        elif key in lower:
            wanted.add(lower[key])
        else:
            raise UnknownNameError(f"unknown name {name!r}: use a model ({', '.join(GROUPS)}) or an entry "
                                f"({', '.join(table)})")
    return [name for name in table if name in wanted]


# ------------------------------------------------------------------------------------------------ URL download


def _by_hand(url: str, path: Path) -> str:
    return f"download by hand: {url} into {path}"


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason).strip() or type(reason).__name__


def fetch_url(url: str, final: Path, *, md5: str | None = None, sha256_prefix: str | None = None,
              expected_sha256: str | None = None, progress: Callable[[int, int | None], None] | None = None,
              timeout: float = TIMEOUT_S) -> str:
    """Download `url` to `final` through `final.part` (resumed with a Range request); returns the sha256.

    The complete file is checked (md5, sha256 prefix, an expected sha256) before it is renamed into place; a
    file that fails a check is deleted, never left at `final` or as a `.part` to be resumed. A dropped connection
    keeps the `.part` so the next run continues it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    host = urlparse(url).netloc or url
    offset = part.stat().st_size if part.is_file() else 0
    md5_digest, sha_digest = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "storyexp-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    total: int | None = None
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # nothing after the .part's end: it is complete already
                response = None
                total = offset
            else:
                raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}; {_by_hand(url, final)}") from None
        if response is not None:
            with response:
                if offset and response.status == 206:
                    first = (response.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
                    if first.strip() != str(offset):  # not the range asked for: start again
                        raise DownloadError(f"{url} answered the range {offset}- with "
                                            f"{response.headers.get('Content-Range')!r}; delete {part} and rerun")
                    mode = "ab"
                else:  # 200: the server sent the whole file (no Range support, or a fresh download)
                    offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
                if offset:  # hash what is already there, so the digests cover the whole file
                    with open(part, "rb") as handle:
                        for block in iter(lambda: handle.read(CHUNK), b""):
                            md5_digest.update(block)
                            sha_digest.update(block)
                done = offset
                with open(part, mode) as out:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        md5_digest.update(block)
                        sha_digest.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
                    out.flush()
                    os.fsync(out.fileno())
        else:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    md5_digest.update(block)
                    sha_digest.update(block)
    except urllib.error.URLError as err:
        raise DownloadError(f"could not reach {host}: {_reason(err)}; {_by_hand(url, final)}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:  # the connection dropped mid-way
        kept = part.stat().st_size if part.is_file() else 0
        raise DownloadError(f"connection to {host} lost ({_reason(err)}); {kept} bytes kept in {part}, rerun to "
                            f"resume, or {_by_hand(url, final)}") from None
    except OSError as err:  # the local side: disk full, permissions
        raise DownloadError(f"could not write {part}: {err}") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise DownloadError(f"connection to {host} ended after {size} of {total} bytes ({part} kept); rerun to "
                            f"resume, or {_by_hand(url, final)}")

    def refuse(what: str) -> DownloadError:
        part.unlink(missing_ok=True)
        return DownloadError(f"{final.name}: {what}; the download was deleted, rerun to fetch it again or "
                             f"{_by_hand(url, final)}")

    sha256 = sha_digest.hexdigest()
    if md5 and md5_digest.hexdigest() != md5:
        raise refuse(f"md5 {md5_digest.hexdigest()} is not the published {md5}")
    if sha256_prefix and not sha256.startswith(sha256_prefix):
        raise refuse(f"sha256 {sha256} does not start with {sha256_prefix} (from its file name)")
    if expected_sha256 and sha256 != expected_sha256:
        raise refuse(f"sha256 {sha256} differs from the one recorded in {MANIFEST_NAME} ({expected_sha256}); "
                     f"delete its entry there to accept a changed file")
    os.replace(part, final)  # same folder: atomic
    return sha256


def _unpack(archive: Path, dest: Path, source: Source, weights_dir: Path, manifest: Manifest) -> None:
    """Unpack a verified .tar.gz into `dest`: into a scratch folder first, then each top-level entry moved in."""
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(scratch, filter="data")  # no absolute paths, links out of the folder or devices
        except (tarfile.TarError, OSError, EOFError) as err:
            archive.unlink(missing_ok=True)
            raise DownloadError(f"{archive} could not be unpacked ({err}); it was deleted, rerun to fetch it "
                                f"again or {_by_hand(source.url, dest)}") from None
        missing = _missing_required(scratch, source)
        if missing:
            raise DownloadError(f"{archive.name} does not hold {', '.join(missing)}; the loader needs them "
                                f"(nothing was moved into {dest})")
        for entry in sorted(scratch.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for _, alts in source.required:
        rel = (Path(source.dest) / alts[0]).as_posix()
        path = weights_dir / rel
        manifest.record(rel, file_sha256(path), path.stat().st_size, f"{source.url} ({alts[0]})")
    archive.unlink(missing_ok=True)


def _download_url(source: Source, weights_dir: Path, manifest: Manifest, console) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    dest = weights_dir / source.dest
    final = dest / source.filename if source.archive else dest
    rel = final.relative_to(weights_dir).as_posix()
    columns = (TextColumn(source.name), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    if not (source.archive and final.is_file()):  # a complete archive from an earlier run is only unpacked
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(source.name, total=None)
            sha256 = fetch_url(source.url, final, md5=source.md5, sha256_prefix=source.sha256_prefix,
                               expected_sha256=(manifest.get(rel) or {}).get("sha256"),
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        if not source.archive:
            manifest.record(rel, sha256, final.stat().st_size, source.url)
    elif source.md5:  # verify the earlier run's archive before unpacking it
        digest = hashlib.md5(usedforsecurity=False)
        with open(final, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                digest.update(block)
        if digest.hexdigest() != source.md5:
            final.unlink()
            raise DownloadError(f"{final}: md5 {digest.hexdigest()} is not the published {source.md5}; it was "
                                f"deleted, rerun to fetch it again")
    if source.archive:
        _unpack(final, dest, source, weights_dir, manifest)


def _download_hub(source: Source, weights_dir: Path) -> None:
    import huggingface_hub

    dest = weights_dir / source.dest
    if hub_offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set: {source.repo_id} is not fetched; unset it, or copy the "
                            f"repository's {', '.join(source.allow_patterns)} into {dest}")
    try:
        huggingface_hub.snapshot_download(source.repo_id, local_dir=str(dest),
                                          allow_patterns=list(source.allow_patterns))
    except Exception as err:  # hub/network/disk errors of every kind: one line, never a traceback
        host = urlparse(huggingface_hub.constants.ENDPOINT).netloc or "huggingface.co"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DownloadError(f"could not fetch {source.repo_id} from {host}: {first}; download by hand: "
                            f"https://huggingface.co/{source.repo_id} ({', '.join(source.allow_patterns)}) "
                            f"into {dest}") from None
    missing = _missing_required(dest, source)
    if missing:
        raise DownloadError(f"{source.repo_id} downloaded into {dest} but {', '.join(missing)} is missing "
                            "(the repository changed?); the loader needs it")


def download(names: Sequence[str], weights_dir: Path, sources: Sequence[Source] = SOURCES, console=None,
             err: Callable[[str], None] | None = None) -> list[Status]:
    """Fetch each requested entry that is not already present; returns the statuses afterwards."""
    if console is None:
        from rich.console import Console

        console = Console()
    err = err or (lambda line: print(line, file=sys.stderr))
    table = sources_by_name(tuple(sources))
    manifest = Manifest(weights_dir)
    results = []
    for name in resolve_names(names, sources):
        source = table[name]
        status = check_one(source, weights_dir, manifest, hash_files=False)
        if status.state == PRESENT:
            console.print(f"{name}: present at {status.path}", soft_wrap=True)
        elif source.kind == "manual":
            err(f"{name}: not downloadable here, fetch by hand: {source.pointer} -> {status.path}")
        else:
            try:
                console.print(f"{name}: fetching {source.source_text} into {weights_dir / source.dest}",
                              soft_wrap=True)
                if source.kind == "hub":
                    _download_hub(source, weights_dir)
                else:
                    _download_url(source, weights_dir, manifest, console)
            except DownloadError as error:
                err(f"{name}: {error}")
            status = check_one(source, weights_dir, manifest, hash_files=False)
        results.append(status)
    return results


# ------------------------------------------------------------------------------------------------ command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storyexp-download",
        description="Fetch the pretrained files of model=arldm / mindalle / mega and the FID weights into the "
                    "weights folder, laid out as the model configs read them. Resumable; existing files are "
                    "kept.",
        epilog=TOFU_HELP)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models ({', '.join(GROUPS)}) or entries (see --list); default: all")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="default: $STORYEXP_WEIGHTS_DIR, else $STORYEXP_ROOT/weights, else ./weights")
    parser.add_argument("--check", action="store_true",
                        help="download nothing; print each entry's state (present / missing / incomplete / "
                             "checksum mismatch) and exit 1 unless all requested are present")
    parser.add_argument("--no-hash", action="store_true",
                        help="with --check: compare sizes only, skip hashing (fast; no sha256 verification)")
    parser.add_argument("--list", action="store_true", help="print the sources table and exit")
    return parser


def _console():
    from rich.console import Console

    # piped output (logs, tests): wide, so table cells are not broken in the middle of a path
    return Console() if sys.stdout.isatty() else Console(width=200)


def _print_list(sources: Sequence[Source], weights_dir: Path, console) -> None:
    from rich.table import Table

    table = Table(title=f"storyexp-download sources (weights folder: {weights_dir})")
    for column in ("name", "models", "destination", "size", "source", "licence"):
        table.add_column(column, overflow="fold")
    for source in sources:
        table.add_row(source.name, ",".join(source.models), source.dest, source.size,
                      ("by hand: " if source.kind == "manual" else "") + source.source_text, source.licence)
    console.print(table)


def _print_statuses(statuses: Iterable[Status], console) -> None:
    from rich.table import Table

    styles = {PRESENT: "green", MISSING: "red", INCOMPLETE: "yellow", MISMATCH: "bold red"}
    table = Table()
    for column in ("name", "state", "path", "detail"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        table.add_row(status.name, f"[{styles[status.state]}]{status.state}[/]", str(status.path), status.detail)
    console.print(table)


def main(argv: Sequence[str] | None = None, *, sources: Sequence[Source] | None = None) -> int:
    """The command; returns the exit status (0: everything requested present, 1: not, 2: bad arguments).

    `sources` replaces the table (the tests point it at a local server); the production table is SOURCES.
    """
    args = _parser().parse_args(argv)
    sources = tuple(SOURCES if sources is None else sources)
    weights_dir = (args.weights_dir or default_weights_dir()).expanduser()
    console = _console()
    try:
        names = resolve_names(args.names, sources)
        if args.list:
            _print_list([s for s in sources if s.name in names], weights_dir, console)
            return 0
        if args.check:
            statuses = check(names, weights_dir, sources, hash_files=not args.no_hash)
        else:
            statuses = download(names, weights_dir, sources, console)
    except DownloadError as err:
        print(f"storyexp-download: {err}", file=sys.stderr)
        return 2 if isinstance(err, UnknownNameError) else 1
    except KeyboardInterrupt:
        print("storyexp-download: interrupted; rerun to resume (partial files are kept as .part)", file=sys.stderr)
        return 130
    _print_statuses(statuses, console)
    bad = [s.name for s in statuses if not s.ok]
    if bad:
        console.print(f"not present: {', '.join(bad)}", soft_wrap=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
