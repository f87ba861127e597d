"""Config -> AR-LDM networks + tokenizers (`model.network` in conf/model/arldm*.yaml).

    source: pretrained   Stable Diffusion folder/hub id + BLIP model_large.pth + BERT tokenizer (real runs)
    source: sizes        random initialisation from small sizes, tokenizers written from a word list
                         (the CPU demo and the tiny test configuration; nothing is downloaded)

Either may start from an original AR-LDM Lightning checkpoint (`init_from_original`), loaded strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.arldm.loading import (
    ARLDMComponents,
    build_arldm_from_pretrained,
    build_arldm_from_sizes,
    load_original_arldm_checkpoint,
)

SOURCES = ("pretrained", "sizes")
PRETRAINED_KEYS = ("stable_diffusion", "blip_checkpoint", "bert_tokenizer")


def build_arldm(network: dict[str, Any], characters: list[str], max_length: int) -> ARLDMComponents:
    network = dict(network)
    source = network.pop("source", None)
    init_from = network.pop("init_from_original", None)
    if source == "sizes":
        for key in PRETRAINED_KEYS:  # inherited from the published config; unused when building from sizes
            network.pop(key, None)
        words = list(network.pop("words", None) or [])
        built = build_arldm_from_sizes(words + list(characters), max_length=max_length, new_tokens=characters,
                                       **network)
    elif source == "pretrained":
        try:
            built = build_arldm_from_pretrained(
                network.pop("stable_diffusion"),
                network.pop("blip_checkpoint"),
                network.pop("bert_tokenizer"),
                max_length=max_length,
                new_tokens=characters,
                **network,
            )
        except MissingResourceError as err:  # the loader's list of every missing file, with the config's fix added
            raise MissingResourceError(
                f"Pretrained weights for the AR-LDM model are missing.\n{err}\n"
                "Put them under the weights directory (README.md, 'Weights') or point model.network.* at them."
            ) from err
    else:
        raise ConfigurationError(f"model.network.source must be one of {SOURCES}, got {source!r}.")
    if init_from:
        if not Path(init_from).is_file():
            raise MissingResourceError("Original AR-LDM checkpoint (model.network.init_from_original)", init_from)
        load_original_arldm_checkpoint(built.model, init_from)
    return built
