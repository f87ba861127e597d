"""storyexp-download (storyexp/download.py): URL downloads against a Range-capable server on 127.0.0.1, resume,
checksums (md5, sha256 prefix, trust-on-first-use manifest), `--check`, the hub entries with `snapshot_download`
monkeypatched, and the destinations against what the model configs and loaders read. Never the real internet."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storyexp import download as dl
from storyexp.download_sources import GROUPS, SOURCES, hub_hash_prefix, md5_from_url, sources_by_name
from tests.conftest import REPO, compose_cfg
from tests.data_paths import parity_dir

PROD = sources_by_name()


# ------------------------------------------------------------------------------------------------ local server


class _Handler(BaseHTTPRequestHandler):
    """GET with single-range `Range: bytes=N-` support (http.server's SimpleHTTPRequestHandler has none)."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.seen.append({"path": self.path, "range": self.headers.get("Range")})
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        header = self.headers.get("Range")
        if header and server.honour_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:  # announce the whole body, send part of it, hang up
            self.wfile.write(body[: server.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.seen, httpd.honour_range, httpd.drop_after = {}, [], True, None
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def blob(n: int, seed: int = 0) -> bytes:
    """n deterministic pseudo-random bytes (no two halves alike, so a wrong offset shows)."""
    out, counter = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def mindalle_tarball() -> bytes:
    """A .tar.gz laid out like minDALL-E's 1.3B.tar.gz (top folder 1.3B/), holding the tiny parity release folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(parity_dir() / "mindalle", arcname="1.3B",
                filter=lambda info: None if info.name.endswith("cases.pt") else info)
    return buffer.getvalue()


def local_sources(server, *, tar: bytes | None = None, md5: str | None = None, fid_prefix: str | None = "auto",
                  blip: bytes | None = None, fid: bytes | None = None):
    """The production table with its URL entries pointed at the local server (the rest unchanged)."""
    blip = blob(300_000, 1) if blip is None else blip
    fid = blob(50_000, 2) if fid is None else fid
    tar = mindalle_tarball() if tar is None else tar
    server.files.update({"/model_large.pth": blip, "/1.3B.tar.gz": tar, "/fid/" + PROD["fid"].filename: fid})
    prefix = hashlib.sha256(fid).hexdigest()[:8] if fid_prefix == "auto" else fid_prefix
    replaced = {
        "blip": dataclasses.replace(PROD["blip"], url=server.base + "/model_large.pth"),
        "minDALL-E": dataclasses.replace(PROD["minDALL-E"], url=server.base + "/1.3B.tar.gz",
                                         md5=md5 or hashlib.md5(tar).hexdigest()),
        "fid": dataclasses.replace(PROD["fid"], url=server.base + "/fid/" + PROD["fid"].filename,
                                   sha256_prefix=prefix),
    }
    return tuple(replaced.get(s.name, s) for s in SOURCES)


def states(names, weights, sources):
    return {s.name: s.state for s in dl.check(names, weights, sources)}


# ------------------------------------------------------------------------------------------------ the table


def test_production_table_urls_and_checksums():
    url = PROD["minDALL-E"].url
    assert url == ("https://arena.kakaocdn.net/brainrepo/models/minDALL-E/57b008f02ceaa02b779c8b7463143315/"
                   "1.3B.tar.gz")
    assert PROD["minDALL-E"].md5 == md5_from_url(url) == "57b008f02ceaa02b779c8b7463143315"
    assert PROD["fid"].sha256_prefix == hub_hash_prefix("pt_inception-2015-12-05-6726825d.pth") == "6726825d"
    assert hub_hash_prefix("model_large.pth") is None
    assert PROD["blip"].url == "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"
    assert PROD["blip"].md5 is None and PROD["blip"].sha256_prefix is None  # none published: trust on first use
    assert PROD["vqgan_imagenet_f16_16384"].kind == "manual" and PROD["vqgan_imagenet_f16_16384"].url is None
    with pytest.raises(ValueError, match="not an md5"):
        md5_from_url("https://example.org/models/x/1.3B.tar.gz")
    # every name a group lists exists
    assert {n for names in GROUPS.values() for n in names} == set(PROD)


def test_destinations_are_what_the_composed_model_configs_read(tmp_path):
    weights = tmp_path / "weights"  # compose_cfg puts paths.weights_dir there
    want = {
        "arldm": {"stable_diffusion": "stable-diffusion-v1-5", "blip_checkpoint": "blip/model_large.pth",
                  "bert_tokenizer": "bert-base-uncased"},
        "mindalle": {"mindalle": "minDALL-E/1.3B"},
        "mega": {"min_dalle": "min-dalle", "vqgan_encoder": "vqgan_imagenet_f16_16384/last.ckpt"},
    }
    dests = {s.read_by: s.dest for s in SOURCES}
    for model, keys in want.items():
        network = compose_cfg([f"model={model}", "data=pororo"], tmp_path).model.network
        for key, rel in keys.items():
            assert Path(network[key]) == weights / rel
            if model != "mindalle":
                assert dests[f"model.network.{key}"] == rel
    # the archive unpacks into minDALL-E/, whose top folder 1.3B/ is model.network.mindalle
    assert PROD["minDALL-E"].dest == "minDALL-E" and all(a[0].startswith("1.3B/") for _, a in PROD["minDALL-E"].required)


def test_required_files_are_the_loaders_own_lists():
    from storyexp.metrics.fid import FID_WEIGHTS_FILE, FID_WEIGHTS_URL
    from storyexp.models.arldm import loading as arldm_loading
    from storyexp.models.mega.loading import LAYOUTS
    from storyexp.models.mindalle.model import CHECKPOINTS, TOKENIZER_FILES

    as_tuples = lambda files: tuple((what, tuple(alts)) for what, alts in files)  # noqa: E731
    assert PROD["stable-diffusion-v1-5"].required == as_tuples(arldm_loading._SD_FILES)
    assert PROD["bert-base-uncased"].required == as_tuples(arldm_loading._BERT_FILES)
    assert sorted(a[0] for _, a in PROD["min-dalle"].required) == sorted(LAYOUTS["flat"].values())
    assert [a[0] for _, a in PROD["minDALL-E"].required] == [f"1.3B/{n}" for n in
                                                             ("config.yaml", *CHECKPOINTS, *TOKENIZER_FILES)]
    assert PROD["fid"].dest == f"fid/{FID_WEIGHTS_FILE}" and PROD["fid"].url == FID_WEIGHTS_URL


def test_weights_dir_default_follows_the_paths_config_rule(tmp_path):
    assert dl.default_weights_dir({"STORYEXP_WEIGHTS_DIR": "/w", "STORYEXP_ROOT": "/r"}) == Path("/w")
    assert dl.default_weights_dir({"STORYEXP_ROOT": "/r"}) == Path("/r/weights")
    assert dl.default_weights_dir({}, cwd=tmp_path) == tmp_path / "weights"


def test_names_resolve_by_model_and_entry_and_unknown_is_one_line(capsys):
    assert dl.resolve_names(["mega"]) == ["min-dalle", "vqgan_imagenet_f16_16384"]
    assert dl.resolve_names(["fid", "MINDALL-E"]) == ["minDALL-E", "fid"]  # table order, case-insensitive
    assert dl.resolve_names([]) == [s.name for s in SOURCES]
    assert dl.main(["nonsense", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("storyexp-download: unknown name 'nonsense'") and "\n" not in err and "arldm" in err


def test_help_states_the_trust_on_first_use_rule(capsys):
    with pytest.raises(SystemExit) as done:
        dl.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "trust on first use" in out and dl.MANIFEST_NAME in out


def test_list_names_every_entry_and_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "storyexp.download", "--list", "--weights-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    for source in SOURCES:
        assert source.name in out.stdout and source.dest in out.stdout
    assert "CC-BY-NC-SA-4.0" in out.stdout


# ------------------------------------------------------------------------------------------------ URL downloads


def test_blip_download_records_sha256_and_check_sees_a_later_change(server, tmp_path, capsys):
    sources = local_sources(server)
    weights = tmp_path / "w"
    assert dl.main(["blip", "--weights-dir", str(weights)], sources=sources) == 0
    final = weights / "blip" / "model_large.pth"
    data = server.files["/model_large.pth"]
    assert final.read_bytes() == data and not final.with_name("model_large.pth.part").exists()
    manifest = json.loads((weights / dl.MANIFEST_NAME).read_text())["files"]
    assert manifest["blip/model_large.pth"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["blip/model_large.pth"]["size"] == len(data)

    capsys.readouterr()
    assert dl.main(["blip", "--check", "--weights-dir", str(weights)], sources=sources) == 0
    assert "present" in capsys.readouterr().out
    # the same size, one byte changed: only the recorded sha256 can tell
    final.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert dl.main(["blip", "--check", "--weights-dir", str(weights)], sources=sources) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    assert states(["blip"], weights, sources) == {"blip": dl.MISMATCH}
    # --no-hash compares sizes only: the same size passes, a different size does not
    assert dl.check(["blip"], weights, sources, hash_files=False)[0].state == dl.PRESENT
    final.write_bytes(data[:-1])
    assert dl.check(["blip"], weights, sources, hash_files=False)[0].state == dl.MISMATCH
    # a re-download is verified against the record too: a server now sending other bytes is refused
    final.unlink()
    server.files["/model_large.pth"] = blob(300_000, 99)
    assert dl.main(["blip", "--weights-dir", str(weights)], sources=sources) == 1
    assert "differs from the one recorded" in capsys.readouterr().err
    assert not final.exists() and not final.with_name("model_large.pth.part").exists()


def test_resume_requests_only_the_rest_and_is_byte_identical(server, tmp_path):
    sources = local_sources(server)
    data = server.files["/model_large.pth"]
    final = tmp_path / "blip" / "model_large.pth"
    final.parent.mkdir(parents=True)
    half = len(data) // 2
    final.with_name("model_large.pth.part").write_bytes(data[:half])
    assert states(["blip"], tmp_path, sources) == {"blip": dl.INCOMPLETE}
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert [r["range"] for r in server.seen] == [f"bytes={half}-"]
    assert final.read_bytes() == data
    # the digests cover the whole file, not only the resumed half
    recorded = json.loads((tmp_path / dl.MANIFEST_NAME).read_text())["files"]["blip/model_large.pth"]
    assert recorded["sha256"] == hashlib.sha256(data).hexdigest()


def test_dropped_connection_keeps_the_part_and_the_next_run_resumes(server, tmp_path, capsys):
    sources = local_sources(server)
    data = server.files["/model_large.pth"]
    server.drop_after = 100_000
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 1
    err = capsys.readouterr().err.strip()
    part = tmp_path / "blip" / "model_large.pth.part"
    assert "ended after 100000 of 300000 bytes" in err and "rerun to resume" in err and len(err.splitlines()) == 1
    assert part.read_bytes() == data[:100_000]
    server.drop_after = None
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert server.seen[-1]["range"] == "bytes=100000-"
    assert (tmp_path / "blip" / "model_large.pth").read_bytes() == data


def test_server_without_range_support_restarts_from_zero(server, tmp_path):
    sources = local_sources(server)
    data = server.files["/model_large.pth"]
    server.honour_range = False
    final = tmp_path / "blip" / "model_large.pth"
    final.parent.mkdir(parents=True)
    final.with_name("model_large.pth.part").write_bytes(b"stale bytes of something else")
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert final.read_bytes() == data


def test_complete_part_gets_416_and_is_finished(server, tmp_path):
    sources = local_sources(server)
    data = server.files["/model_large.pth"]
    final = tmp_path / "blip" / "model_large.pth"
    final.parent.mkdir(parents=True)
    final.with_name("model_large.pth.part").write_bytes(data)
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert final.read_bytes() == data and server.seen[0]["range"] == f"bytes={len(data)}-"


def test_mindalle_archive_is_md5_checked_unpacked_and_loads(server, tmp_path):
    from storyexp.models.mindalle.model import MinDalle

    sources = local_sources(server)
    assert dl.main(["mindalle", "--weights-dir", str(tmp_path)], sources=sources) == 0
    folder = tmp_path / "minDALL-E" / "1.3B"
    for name in ("config.yaml", "stage1_last.ckpt", "tokenizer/bpe-16k-vocab.json"):
        assert (folder / name).read_bytes() == (parity_dir() / "mindalle" / name).read_bytes()
    # the archive is removed once unpacked; no scratch folder is left
    assert sorted(p.name for p in (tmp_path / "minDALL-E").iterdir()) == ["1.3B"]
    assert states(["mindalle"], tmp_path, sources) == {"minDALL-E": dl.PRESENT}
    MinDalle.from_pretrained(folder)  # what model=mindalle reads loads (strictly)
    # the unpacked files are recorded (trust on first use), so a later change is seen
    manifest = json.loads((tmp_path / dl.MANIFEST_NAME).read_text())["files"]
    ckpt = folder / "stage2_last.ckpt"
    assert manifest["minDALL-E/1.3B/stage2_last.ckpt"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # the same size, one bit changed
    assert states(["mindalle"], tmp_path, sources) == {"minDALL-E": dl.MISMATCH}


def test_md5_mismatch_is_refused_and_nothing_is_left(server, tmp_path, capsys):
    sources = local_sources(server, md5="0" * 32)
    assert dl.main(["minDALL-E", "--weights-dir", str(tmp_path)], sources=sources) == 1
    err = capsys.readouterr().err.strip()
    assert "md5" in err and "0" * 32 in err and len(err.splitlines()) == 1
    assert list((tmp_path / "minDALL-E").iterdir()) == []  # no archive, no .part, no 1.3B/
    assert states(["minDALL-E"], tmp_path, sources) == {"minDALL-E": dl.MISSING}


def test_fid_sha256_prefix_is_checked(server, tmp_path, capsys):
    final = tmp_path / "fid" / PROD["fid"].filename
    # the production prefix 6726825d against a tiny file: refused, not left in place
    wrong = local_sources(server, fid_prefix=PROD["fid"].sha256_prefix)
    assert dl.main(["fid", "--weights-dir", str(tmp_path)], sources=wrong) == 1
    assert "does not start with 6726825d" in capsys.readouterr().err
    assert not final.exists() and not final.with_name(final.name + ".part").exists()
    # a prefix that matches: accepted, and the FID metric's own look-up finds it
    right = local_sources(server)
    assert dl.main(["fid", "--weights-dir", str(tmp_path)], sources=right) == 0
    from storyexp.metrics.fid import find_weights

    assert find_weights(weights_dir=tmp_path) == final
    # a file put there by hand that does not match the name's prefix is reported
    final.write_bytes(b"not the inception weights")
    assert states(["fid"], tmp_path, right) == {"fid": dl.MISMATCH}


def test_unreachable_server_is_one_line_and_exit_1(tmp_path, capsys):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/model_large.pth"
    sources = tuple(dataclasses.replace(s, url=url) if s.name == "blip" else s for s in SOURCES)
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 1
    err = capsys.readouterr().err.strip()
    final = tmp_path / "blip" / "model_large.pth"
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"blip: could not reach 127.0.0.1:{port}: ")
    assert err.endswith(f"; download by hand: {url} into {final}")


def test_http_error_status_is_one_line(server, tmp_path, capsys):
    sources = tuple(dataclasses.replace(s, url=server.base + "/nowhere.pth") if s.name == "blip" else s
                    for s in SOURCES)
    assert dl.main(["blip", "--weights-dir", str(tmp_path)], sources=sources) == 1
    err = capsys.readouterr().err.strip()
    assert "HTTP 404" in err and "download by hand" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ --check


def test_check_states_and_exit_codes(server, tmp_path, capsys):
    sources = local_sources(server)
    assert dl.main(["--check", "--weights-dir", str(tmp_path)], sources=sources) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "fetch by hand" in out and "taming-transformers" in out
    assert set(states([], tmp_path, sources).values()) == {dl.MISSING}
    # only what is asked for counts
    assert dl.main(["fid", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert dl.main(["fid", "--check", "--weights-dir", str(tmp_path)], sources=sources) == 0
    assert dl.main(["fid", "mega", "--check", "--weights-dir", str(tmp_path)], sources=sources) == 1
    # the taming last.ckpt put there by hand counts as present
    vqgan = tmp_path / "vqgan_imagenet_f16_16384" / "last.ckpt"
    vqgan.parent.mkdir(parents=True)
    vqgan.write_bytes(b"ckpt")
    assert states(["vqgan_imagenet_f16_16384"], tmp_path, sources) == {"vqgan_imagenet_f16_16384": dl.PRESENT}
    # an archive part, a downloaded but not unpacked archive
    (tmp_path / "minDALL-E").mkdir()
    (tmp_path / "minDALL-E" / "1.3B.tar.gz.part").write_bytes(b"x" * 10)
    status = dl.check(["minDALL-E"], tmp_path, sources)[0]
    assert status.state == dl.INCOMPLETE and "10 bytes" in status.detail
    (tmp_path / "minDALL-E" / "1.3B.tar.gz.part").rename(tmp_path / "minDALL-E" / "1.3B.tar.gz")
    assert "not unpacked" in dl.check(["minDALL-E"], tmp_path, sources)[0].detail


def test_download_of_a_manual_entry_says_fetch_by_hand(tmp_path, capsys):
    assert dl.main(["vqgan_imagenet_f16_16384", "--weights-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "fetch by hand" in err and "taming-transformers" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ hub entries


def _sd_repo() -> dict[str, bytes]:
    """A Stable Diffusion v1-5 repository listing (file names as on the hub), tiny contents."""
    names = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "README.md",
             "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
             "safety_checker/model.safetensors", "scheduler/scheduler_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
             "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin"]
    repo = {name: name.encode() for name in names}
    for path in (parity_dir() / "arldm" / "pretrained" / "tokenizer").iterdir():
        repo[f"tokenizer/{path.name}"] = path.read_bytes()
    return repo


HUB = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd_repo,
    "bert-base-uncased": lambda: {
        "vocab.txt": (parity_dir() / "arldm" / "blip" / "bert_tokenizer" / "vocab.txt").read_bytes(),
        "tokenizer_config.json": b"{}", "tokenizer.json": b"{}", "config.json": b"{}",
        "model.safetensors": b"weights", "pytorch_model.bin": b"weights", "flax_model.msgpack": b"weights"},
    "kuprel/min-dalle": lambda: {
        **{n: (parity_dir() / "mega" / n).read_bytes()
           for n in ("encoder.pt", "decoder.pt", "detoker.pt", "vocab.json", "merges.txt")},
        "encoder_mini.pt": b"mini", "decoder_mini.pt": b"mini", "vocab_mini.json": b"{}", "merges_mini.txt": b"",
        "config.json": b"{}", "config_mini.json": b"{}"},
}


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub.snapshot_download writing the requested files of a listed repository, filtered the hub's way."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def snapshot_download(repo_id, *, local_dir=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "local_dir": local_dir, "allow_patterns": allow_patterns, **kwargs})
        repo = HUB[repo_id]()
        for name in filter_repo_objects(list(repo), allow_patterns=allow_patterns):
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(repo[name])
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return calls


def test_hub_entries_fetch_only_what_the_loaders_read(fake_hub, tmp_path):
    from storyexp.models.arldm import loading as arldm_loading
    from storyexp.models.mega.loading import resolve_files

    assert dl.main(["stable-diffusion-v1-5", "bert-base-uncased", "min-dalle", "--weights-dir", str(tmp_path)]) == 0
    assert [(c["repo_id"], c["local_dir"]) for c in fake_hub] == [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", str(tmp_path / "stable-diffusion-v1-5")),
        ("bert-base-uncased", str(tmp_path / "bert-base-uncased")),
        ("kuprel/min-dalle", str(tmp_path / "min-dalle")),
    ]
    assert fake_hub[2]["allow_patterns"] == ["encoder.pt", "decoder.pt", "detoker.pt", "vocab.json", "merges.txt"]
    sd = tmp_path / "stable-diffusion-v1-5"
    got = sorted(p.relative_to(sd).as_posix() for p in sd.rglob("*") if p.is_file())
    assert got == ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                   "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                   "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # no fp16/EMA/.bin/.ckpt copies
    bert = tmp_path / "bert-base-uncased"
    assert sorted(p.name for p in bert.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json",
                                                      "vocab.txt"]  # not the BERT weights
    # what the loaders check is there
    assert arldm_loading._missing(sd, arldm_loading._SD_FILES) == []
    assert arldm_loading._missing(bert, arldm_loading._BERT_FILES) == []
    assert resolve_files(tmp_path / "min-dalle")["encoder"] == tmp_path / "min-dalle" / "encoder.pt"
    assert states(["stable-diffusion-v1-5", "bert-base-uncased", "min-dalle"], tmp_path, SOURCES) == {
        "stable-diffusion-v1-5": dl.PRESENT, "bert-base-uncased": dl.PRESENT, "min-dalle": dl.PRESENT}
    # present entries are not fetched again
    assert dl.main(["bert-base-uncased", "--weights-dir", str(tmp_path)]) == 0 and len(fake_hub) == 3
    # a removed required file makes the entry missing; a half-done hub download makes it incomplete
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    status = dl.check(["stable-diffusion-v1-5"], tmp_path)[0]
    assert status.state == dl.MISSING and "unet/diffusion_pytorch_model.safetensors" in status.detail
    marker = sd / ".cache" / "huggingface" / "download" / "unet" / "x.incomplete"
    marker.parent.mkdir(parents=True)
    marker.write_bytes(b"")
    assert dl.check(["stable-diffusion-v1-5"], tmp_path)[0].state == dl.INCOMPLETE


def test_hub_offline_is_honoured(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main(["bert-base-uncased", "--weights-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert fake_hub == [] and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1


def test_hub_failure_is_one_line(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert dl.main(["bert-base-uncased", "--weights-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not fetch bert-base-uncased" in err
    assert "Network is unreachable" in err and f"into {tmp_path / 'bert-base-uncased'}" in err


def test_unreadable_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / dl.MANIFEST_NAME).write_text("{not json")
    assert dl.main(["fid", "--check", "--weights-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert dl.MANIFEST_NAME in err and len(err.splitlines()) == 1
