"""What `storyexp-download` fetches: one entry per file set, with where it goes under `weights/`.

Each destination is exactly what the model configs read (`storyexp/conf/model/{arldm,mindalle,mega}.yaml`,
`model.network.*` = `${paths.weights_dir}/<dest>`) and what the FID metric looks for (`<weights_dir>/fid/`), and
each entry's `required` files are the ones its loader checks before loading (tests/test_download.py compares them
with the loaders' own lists), so "present" means "the loader finds everything".

Kinds:
    hub     a Hugging Face repository, fetched with `huggingface_hub.snapshot_download(local_dir=...)` (it resumes
            and verifies its files itself); `allow_patterns` keeps out what no loader reads (fp16 / EMA copies,
            .bin duplicates of the safetensors, the full .ckpt files).
    url     one file over HTTP(S), resumable, checked by md5 (when the source publishes one), by a sha256 prefix
            (torch.hub's `name-<sha256[:8]>.ext` file-name convention) and, trust on first use, by the sha256
            recorded in `weights/.storyexp-sha256.json` when it was first downloaded; `archive=True` unpacks a
            .tar.gz into `dest`.
    manual  no stable direct URL is documented: `--check` says where to get it by hand.

No code of this module imports torch or the models, so the download tool starts quickly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

__all__ = ["GROUPS", "SOURCES", "Source", "hub_hash_prefix", "md5_from_url", "sources_by_name"]

Kind = Literal["hub", "url", "manual"]


@dataclass(frozen=True)
class Source:
    """One file set: where it comes from, where it goes (relative to the weights folder), what reads it."""

    name: str
    kind: Kind
    models: tuple[str, ...]
    dest: str                    # hub / archive: a folder; url / manual: the file itself
    what: str
    size: str                    # approximate download size, for the user
    read_by: str                 # the config key that points at it
    licence: str = ""
    # hub
    repo_id: str | None = None
    allow_patterns: tuple[str, ...] = ()
    # url
    url: str | None = None
    md5: str | None = None
    sha256_prefix: str | None = None
    archive: bool = False        # url is a .tar.gz unpacked into dest
    # hub / archive: (what, alternatives relative to dest; any one is enough) the loader requires
    required: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    # manual: where to get it by hand
    pointer: str = ""

    @property
    def filename(self) -> str:
        """The downloaded file's name: the URL's last path segment (url kind)."""
        return urlparse(self.url or "").path.rsplit("/", 1)[-1]

    @property
    def source_text(self) -> str:
        if self.kind == "hub":
            return f"https://huggingface.co/{self.repo_id}"
        if self.kind == "url":
            return str(self.url)
        return self.pointer


def md5_from_url(url: str) -> str:
    """minDALL-E's release URLs carry the archive's md5 as the penultimate path segment (its own downloader checks it)."""
    segment = urlparse(url).path.rstrip("/").split("/")[-2]
    if not re.fullmatch(r"[0-9a-f]{32}", segment):
        raise ValueError(f"{url}: the penultimate path segment {segment!r} is not an md5")
    return segment


def hub_hash_prefix(filename: str) -> str | None:
    """The sha256 prefix of a torch.hub-style name `name-<sha256[:8+]>.ext` (`pt_inception-...-6726825d.pth`)."""
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", filename)
    return match.group(1) if match else None


_MINDALLE_URL = ("https://arena.kakaocdn.net/brainrepo/models/minDALL-E/57b008f02ceaa02b779c8b7463143315/"
                 "1.3B.tar.gz")
_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth")
_BLIP_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"

# what storyexp.models.arldm.loading checks in a Stable Diffusion folder (its _SD_FILES) and a BERT folder
_SD_REQUIRED = (
    ("CLIP tokenizer vocabulary", ("tokenizer/vocab.json",)),
    ("CLIP tokenizer merges", ("tokenizer/merges.txt",)),
    ("CLIP text encoder config", ("text_encoder/config.json",)),
    ("CLIP text encoder weights", ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin")),
    ("VAE config", ("vae/config.json",)),
    ("VAE weights", ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin")),
    ("UNet config", ("unet/config.json",)),
    ("UNet weights", ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin")),
)
_BERT_REQUIRED = (("BERT tokenizer vocabulary", ("vocab.txt",)),)
# min-dalle's files on the hub are flat, the loader's "flat" layout (storyexp.models.mega.loading.LAYOUTS)
_MIN_DALLE_FILES = ("encoder.pt", "decoder.pt", "detoker.pt", "vocab.json", "merges.txt")
# what storyexp.models.mindalle.model.load_mindalle_folder checks, inside the archive's top folder 1.3B/
_MINDALLE_FILES = ("config.yaml", "stage1_last.ckpt", "stage2_last.ckpt", "tokenizer/bpe-16k-vocab.json",
                   "tokenizer/bpe-16k-merges.txt")

SOURCES: tuple[Source, ...] = (
    Source(
        name="stable-diffusion-v1-5", kind="hub", models=("arldm",), dest="stable-diffusion-v1-5",
        what="Stable Diffusion v1-5: UNet, VAE, CLIP text encoder and tokenizer (diffusers folders, safetensors)",
        size="~4.3 GB", read_by="model.network.stable_diffusion", licence="CreativeML OpenRAIL-M (model card)",
        repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        # only the fp32 safetensors the loader reads: not the fp16 / non-EMA variants, .bin copies or v1-5-*.ckpt
        allow_patterns=("model_index.json", "tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
                        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
                        "unet/diffusion_pytorch_model.safetensors"),
        required=_SD_REQUIRED,
    ),
    Source(
        name="bert-base-uncased", kind="hub", models=("arldm",), dest="bert-base-uncased",
        what="BERT tokenizer for BLIP (vocab.txt; the BERT weights are not needed)", size="~1 MB",
        read_by="model.network.bert_tokenizer", licence="Apache-2.0 (model card)",
        repo_id="bert-base-uncased",
        allow_patterns=("vocab.txt", "tokenizer_config.json", "tokenizer.json", "config.json"),
        required=_BERT_REQUIRED,
    ),
    Source(
        name="blip", kind="url", models=("arldm",), dest="blip/model_large.pth",
        what="Salesforce BLIP ViT-L pre-training checkpoint (model_large.pth)", size="~3.6 GB",
        read_by="model.network.blip_checkpoint", licence="BSD-3-Clause (Salesforce/BLIP repository)",
        url=_BLIP_URL,  # no checksum published: sha256 recorded on first download (trust on first use)
    ),
    Source(
        name="minDALL-E", kind="url", models=("mindalle",), dest="minDALL-E",
        what="kakaobrain minDALL-E 1.3B release (unpacked: 1.3B/config.yaml, stage1/stage2 ckpts, tokenizer/)",
        size="~5 GB", read_by="model.network.mindalle", licence="stage 2 weights CC-BY-NC-SA-4.0",
        url=_MINDALLE_URL, md5=md5_from_url(_MINDALLE_URL), archive=True,
        required=tuple((name, (f"1.3B/{name}",)) for name in _MINDALLE_FILES),
    ),
    Source(
        name="min-dalle", kind="hub", models=("mega",), dest="min-dalle",
        what="min-dalle's DALL-E Mega files (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt; float16)",
        size="~5 GB", read_by="model.network.min_dalle",
        repo_id="kuprel/min-dalle",
        allow_patterns=_MIN_DALLE_FILES,  # not the *_mini files, config*.json or anything else in the repository
        required=tuple((name, (name,)) for name in _MIN_DALLE_FILES),
    ),
    Source(
        name="vqgan_imagenet_f16_16384", kind="manual", models=("mega",), dest="vqgan_imagenet_f16_16384/last.ckpt",
        what="taming-transformers VQGAN f16/16384 (ImageNet) last.ckpt: Mega's source-frame encoder", size="~1 GB",
        read_by="model.network.vqgan_encoder", licence="",
        pointer=("the `vqgan_imagenet_f16_16384` link in the taming-transformers README "
                 "(https://github.com/CompVis/taming-transformers); put its last.ckpt here"),
    ),
    Source(
        name="fid", kind="url", models=("fid",), dest="fid/pt_inception-2015-12-05-6726825d.pth",
        what="pytorch-fid's Inception weights (FID, eval.fid.weights)", size="~91 MB",
        read_by="eval.fid.weights (looked up in <weights_dir>/fid/)", licence="Apache-2.0 (pytorch-fid)",
        url=_FID_URL, sha256_prefix=hub_hash_prefix(_FID_URL.rsplit("/", 1)[-1]),
    ),
)

# names a user can give on the command line besides the entries' own: the model (or metric) that reads them
GROUPS: dict[str, tuple[str, ...]] = {
    "arldm": ("stable-diffusion-v1-5", "bert-base-uncased", "blip"),
    "mindalle": ("minDALL-E",),
    "mega": ("min-dalle", "vqgan_imagenet_f16_16384"),
    "fid": ("fid",),
}


def sources_by_name(sources: tuple[Source, ...] = SOURCES) -> dict[str, Source]:
    return {source.name: source for source in sources}
