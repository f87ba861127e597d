"""Configuration of the taming-transformers VQGAN, in the shape of minDALL-E's ``stage1:`` config block.

minDALL-E's YAML reads::

    stage1:
      type: vqgan
      embed_dim: 256        # codebook vector size
      n_embed: 16384        # codebook size
      hparams: {double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult,
                num_res_blocks, attn_resolutions, pdrop}

Every size of the network is derived from these fields; nothing is hard-coded to the 1.3B model, so the tiny
parity config (resolution 32, ch 32, ch_mult [2, 1]) builds with the same code.

Both dataclasses are frozen. `VQGANConfig.from_dict` fills what a block leaves out with the 1.3B defaults (a
minDALL-E config.yaml is merged over them); `VQGANConfig.from_sizes` is the strict reading of a `source: sizes`
block (`model.network.stage1`), where every size must be given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from storyexp.errors import ConfigurationError
from storyexp.models.sizes import parse_sizes, unknown_key_error

# GroupNorm uses this many groups everywhere (taming's `Normalize`), so every channel count must divide by it.
NUM_GROUPS = 32


@dataclass(frozen=True)
class VQGANHParams:
    """The ``stage1.hparams`` block (the keyword arguments of taming's Encoder/Decoder)."""

    double_z: bool = False
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    pdrop: float = 0.0

    def __post_init__(self):
        # YAML/omegaconf give lists (or ListConfig); keep plain tuples so the config is hashable and immutable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))


# The sizes a `source: sizes` block must give (the other fields keep their defaults).
SIZE_KEYS = ("embed_dim", "n_embed", "hparams", "hparams.resolution", "hparams.z_channels", "hparams.ch",
             "hparams.ch_mult", "hparams.num_res_blocks", "hparams.attn_resolutions")


@dataclass(frozen=True)
class VQGANConfig:
    """The ``stage1`` block: codebook size/dimension plus the encoder/decoder hyper-parameters.

    Defaults are those of minDALL-E 1.3B (``configs/dalle-1.3B.yaml``).
    """

    embed_dim: int = 256
    n_embed: int = 16384
    hparams: VQGANHParams = field(default_factory=VQGANHParams)

    def __post_init__(self):
        if isinstance(self.hparams, Mapping) or not isinstance(self.hparams, VQGANHParams):
            object.__setattr__(self, "hparams", _build(VQGANHParams, dict(self.hparams), "stage1.hparams"))
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def num_resolutions(self) -> int:
        return len(self.hparams.ch_mult)

    @property
    def latent_dim(self) -> int:
        """Side of the code grid. minDALL-E takes it from ``attn_resolutions[0]`` (its ``latent_dim``),
        not from resolution / 2**(levels-1); `validate` checks that the two agree."""
        return self.hparams.attn_resolutions[0]

    @property
    def num_codes(self) -> int:
        """Tokens per image (``latent_dim ** 2``), in raster order."""
        return self.latent_dim**2

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "stage1") -> VQGANConfig:
        """Build from a ``stage1`` mapping (plain dict or omegaconf DictConfig); absent fields keep the 1.3B
        defaults. ``type`` (``vqgan``) is accepted and checked; any other unknown key is an error rather than
        silently ignored. `where` names the block in messages."""
        d = dict(d)
        _check_type(d, where)
        return _build(cls, d, where)

    @classmethod
    def from_sizes(cls, d: Mapping[str, Any] | None, where: str = "model.network.stage1") -> VQGANConfig:
        """The strict reading of a `source: sizes` stage-1 block: every size in `SIZE_KEYS` must be given (a left-out
        size would silently become the 1.3B model's), types are checked, and any error is one line naming the key."""
        d = dict(d) if isinstance(d, Mapping) else d
        if isinstance(d, dict):
            _check_type(d, where)
        return parse_sizes(cls, d, where, required=SIZE_KEYS)

    @classmethod
    def from_yaml(cls, path) -> VQGANConfig:
        """Read the ``stage1:`` block of a minDALL-E style config.yaml."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f)
        if "stage1" not in data:
            raise ConfigurationError(f"{path} has no 'stage1:' block")
        return cls.from_dict(data["stage1"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hparams"]["ch_mult"] = list(d["hparams"]["ch_mult"])
        d["hparams"]["attn_resolutions"] = list(d["hparams"]["attn_resolutions"])
        return d

    def validate(self) -> None:
        hp = self.hparams
        if not hp.ch_mult:
            raise ConfigurationError("stage1.hparams.ch_mult must not be empty")
        if not hp.attn_resolutions:
            raise ConfigurationError("stage1.hparams.attn_resolutions must not be empty (it sets the grid side)")
        chans = {hp.ch * m for m in hp.ch_mult} | {hp.ch}
        bad = sorted(c for c in chans if c % NUM_GROUPS)
        if bad:
            raise ConfigurationError(
                f"VQGAN channel counts {bad} are not multiples of GroupNorm's {NUM_GROUPS} groups"
            )
        bottom = hp.resolution // 2 ** (self.num_resolutions - 1)
        if bottom != self.latent_dim:
            raise ConfigurationError(
                f"grid side mismatch: attn_resolutions[0]={self.latent_dim} but resolution {hp.resolution} "
                f"with {self.num_resolutions} levels gives {bottom}"
            )


def _check_type(d: dict, where: str) -> None:
    kind = d.pop("type", "vqgan")
    if kind != "vqgan":
        raise ConfigurationError(f"{where}.type is {kind!r}; only 'vqgan' is implemented")


def _build(cls, d: dict, where: str):
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise unknown_key_error(where, unknown, names, what="key")
    if cls is VQGANConfig and isinstance(d.get("hparams"), Mapping):
        d = {**d, "hparams": _build(VQGANHParams, dict(d["hparams"]), f"{where}.hparams")}
    return cls(**d)
