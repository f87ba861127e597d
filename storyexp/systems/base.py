"""The story-system contract: what every model's LightningModule offers the tasks and callbacks.

Tasks and callbacks use only this interface, never a concrete system:

    task, num_frames, num_targets, first_target, image_size      the story layout (continuation: frame 0 is
                                                                  given, 1..4 generated; visualization: all 5)
    generate(batch, captions=None, seed=None, **sampler)        uint8 [B, V, H, W, 3], V = num_targets
    generate_candidates(batch, ..., num_candidates=K)           uint8 [B, K, V, H, W, 3]
    stream_story(batch, seed=None, num_candidates=K, **sampler) FrameUpdate per target frame as sampling produces
                                                                  it, then generate_candidates()' output (task=app)
    tokenize(captions)                                          the token ids the model reads
    trainable_parameter_names()                                 the trainable set
    checkpoint_extras() / load_checkpoint_extras(checkpoint)    what travels in a checkpoint besides weights
    saved_frozen_prefixes() / frozen_sources()                  frozen parts a lean checkpoint keeps / the
                                                                  pretrained files the rest is rebuilt from
    check_config(model_config)  (classmethod)                  the model's options, checked before building

The shared lifecycle lives here once:
- **per-story seeding**: every random draw of training (diffusion noise and timesteps, classifier-free and
  caption dropout), validation, test and sampling comes from one generator per story, seeded from the run's seed
  and the story's id (`story_seed`; training also mixes in the optimizer step), so results do not depend on batch
  size, worker count or process count: 2 DDP processes take the same step as 1 (tests/test_ddp_equivalence.py).
  Dropout layers inside the networks still draw from torch's global RNG (their masks are per element);
- the eval-mode toggle while sampling, the caption-truncation warning, the predict output, the steps and their
  metrics (validation/test losses are story-weighted means kept in torchmetrics states, exact across processes),
  the strict state-dict check on load, AdamW + warm-up/decay;
- lean checkpoints, in every `train.mode`: a checkpoint holds `saved_state_keys()` (the trainable parameters, the
  buffers and `saved_frozen_prefixes()`, frozen parts the config cannot rebuild) and, in `checkpoint["storyexp"]
  ["frozen"]`, where the frozen rest comes from (`frozen_sources()`: the pretrained files, path + size + sha256) and one
  sha256 of the frozen tensors as built (`frozen_digest`). On load the frozen parts are rebuilt from the config and
  must hash to the record, else one ConfigurationError line; the saved keys are checked strictly.
  `model.train.save_frozen=true` writes every key (a full dump, for someone without the pretrained files). Sharded
  checkpoints (FSDP / DeepSpeed) keep their full shards: each rank writes its own, nothing is filtered;
- `train.mode=lora` (`storyexp.systems.lora`): a subclass's `apply_mode` calls `add_lora`; sampling outside fitting
  merges the adapters (see the lora module for why not during fitting); the frozen digest hashes the base unmerged.

A subclass builds its networks in `__init__` (after `init_layout`) and implements `losses(batch, generators)`,
`sample_stories(batch, captions, num_candidates, settings, generators)` and `tokenize(captions)`; its sampling calls
`report_frames(first, frames)` as target frames come into being (a no-op unless `stream_story` listens), so one
streaming loop serves every system. The networks hear nothing of it: their samplers take an optional plain
`on_frames` callable, which a system passes only while `reporting` (`codes_reporter` for the token samplers), so
sampling without a listener runs exactly as before. The models draw frames autoregressively: AR-LDM one frame at a
time; StoryDALL-E frame 0 first in visualization and then the others together (all together in continuation, one by
one with `sampler.chain`), so its reports come in those groups.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import lightning as L
import torch
from torchmetrics import MeanMetric

from storyexp.data.story import N_FRAMES
from storyexp.errors import ConfigurationError
from storyexp.systems import lora as lora_utils
from storyexp.systems.schedules import IMPLS, configure_adamw
from storyexp.utils.fingerprints import RECORD_KEY, file_record, short, tensors_sha256
from storyexp.utils.loading import check_state_dict

TASKS = ("continuation", "visualization")
MAX_TRUNCATION_WARNINGS = 5
FROZEN_RECORD = "frozen"  # checkpoint[RECORD_KEY][FROZEN_RECORD]: where a lean checkpoint's frozen parts come from
SHARDED_STRATEGIES = ("fsdp", "deepspeed")  # Lightning `strategy_name`s whose checkpoints are per-rank shards
LOAD_HINT = ("load a checkpoint with the model.train options (mode, lora, freeze_*) and model sizes it was trained "
             "with (a lean one, model.train.save_frozen=false, holds only what trains)")


# (first target index, uint8 [B, K, n, H, W, 3]): target frames first..first+n-1 of every story and candidate
FrameListener = Callable[[int, torch.Tensor], None]


class FrameUpdate(NamedTuple):
    """One item of `StorySystem.stream_story`: `index` is a target frame (0..V-1; story frame first_target + index)
    and `frames` that frame of every story and candidate, uint8 [B, K, H, W, 3]; the last item has `index` None and
    `frames` the whole stories, uint8 [B, K, V, H, W, 3], exactly what `generate_candidates` returns for the same
    batch, seed, settings and K."""

    index: int | None
    frames: torch.Tensor


class _StreamClosed(Exception):
    """Raised inside the sampling thread when the consumer of `stream_story` has gone (e.g. a closed page)."""


def story_seed(seed: int, story_id: str) -> int:
    """A 63-bit seed for one story: the same for a story whatever batch, worker or process it lands in."""
    digest = hashlib.sha256(f"{int(seed)}/{story_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_row(generators: Sequence[torch.Generator], rows_per_story: int) -> list[torch.Generator]:
    """Each story's generator repeated for its rows (rows story-major), for samplers that take one per row."""
    return [g for g in generators for _ in range(rows_per_story)]


def has_frozen(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is frozen (its pretrained file is then a source of a lean checkpoint)."""
    return any(not p.requires_grad for p in module.parameters())


def frozen_mismatch(checkpoint: str, record: dict[str, Any], rebuilt: str) -> str:
    """The one-line refusal of a lean checkpoint whose frozen weights the config rebuilds differently: the recorded
    sources (path + short sha256) and the fix."""
    sources = [(key, f) for key, files in (record.get("sources") or {}).items() for f in files]
    if sources:
        where = "; ".join(f"model.{key}: {f['path']} (sha256 {short(f.get('sha256'))})" for key, f in sources)
        keys = ", ".join(dict.fromkeys(f"model.{key}" for key, _ in sources))
        fix = f"point {keys} at the files recorded"
    else:
        seed = record.get("network_seed")
        where = f"no pretrained files, the seeded random init (model.network.seed={seed})"
        fix = f"build them as trained (model.network.seed={seed}, the same sizes)"
    return (f"{checkpoint} holds only what trains (model.train.save_frozen=false), but the frozen weights this config "
            f"builds differ from the ones it was trained with (sha256 {short(rebuilt)}, recorded "
            f"{short(record.get('sha256'))}; they came from {where}): {fix}, or use a full-dump checkpoint (trained "
            "with model.train.save_frozen=true).")


class StorySystem(L.LightningModule):
    """Base class of every story system; see the module docstring for the contract."""

    optimizer_defaults: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999)}
    frozen_hint = "check model.train"
    modes: tuple[str, ...] = ("finetune",)  # model.train.mode values (the first is the default)

    # ------------------------------------------------------------------------------------------- config

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        """Raise one ConfigurationError line for a bad model option (called before anything is built)."""
        task = model.get("task")
        if task not in TASKS:
            raise ConfigurationError(f"model.task={task!r} is not valid: it must be one of {TASKS} (data.task).")
        mode = (model.get("train") or {}).get("mode", cls.modes[0])
        if mode not in cls.modes:
            raise ConfigurationError(f"model.train.mode={mode!r} is not valid for {cls.__name__}: it must be one "
                                     f"of {cls.modes}.")
        if mode == "lora":
            lora_utils.check_lora_config((model.get("train") or {}).get("lora"))
        save_frozen = (model.get("train") or {}).get("save_frozen", False)
        if not isinstance(save_frozen, bool):
            raise ConfigurationError(f"model.train.save_frozen={save_frozen!r} is not valid: it must be true (every "
                                     "weight in the checkpoint) or false (what trains; the rest rebuilt from the "
                                     "config).")
        impl = (model.get("optimizer") or {}).get("impl", "adamw")
        if impl not in IMPLS:
            raise ConfigurationError(f"model.optimizer.impl={impl!r} is not valid: it must be one of {IMPLS}.")
        k = (model.get("sampler") or {}).get("num_candidates", 1)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigurationError(f"model.sampler.num_candidates={k!r} is not valid: it must be an integer >= 1.")

    def init_layout(self, task: str, image_size: int) -> None:
        if task not in TASKS:
            raise ConfigurationError(f"model.task={task!r} is not valid: it must be one of {TASKS} (data.task).")
        self.task = task
        self.image_size = int(image_size)
        self.num_frames = N_FRAMES
        self.num_targets = N_FRAMES - 1 if task == "continuation" else N_FRAMES
        self._warned_long = 0
        self._eval_means = torch.nn.ModuleDict()
        self._lora = False  # set by `add_lora` (train.mode=lora)
        self._lora_merged = False
        self._frozen_digest: str | None = None  # `frozen_digest`, computed once
        self.lora_merge_for_sampling = True  # False: sample with unmerged adapters (tests compare both)
        self._frame_listener: FrameListener | None = None  # set while `stream_story` samples (`report_frames`)

    @property
    def first_target(self) -> int:
        return self.num_frames - self.num_targets

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    # ------------------------------------------------------------------------------------------- LoRA

    def add_lora(self, module: torch.nn.Module, default_targets: list[str], where: str,
                 exclude: str | None = None) -> None:
        """train.mode=lora: peft adapters on `module`'s `train.lora.target_modules` linears (everything in
        `module` frozen but them). The caller then re-enables the parts that train fully."""
        lora_utils.inject_lora(module, (self.hparams.get("train") or {}).get("lora"), default_targets, where, exclude)
        self._lora = True

    def set_lora_merged(self, merged: bool) -> None:
        """Fold the adapters into the base weights, or take them out (no-op without LoRA or when already so)."""
        if self._lora and self._lora_merged != merged:
            if merged and not self.save_frozen:
                self.frozen_digest()  # the base as built, before the adapters are folded into it
            lora_utils.set_merged(self, merged)
            self._lora_merged = merged

    # ------------------------------------------------------------------------------------ lean checkpoints

    def saved_frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes a lean checkpoint keeps although they do not train: frozen parts the config
        cannot rebuild (e.g. a stage-1 VQGAN fitted on the training data)."""
        return ()

    def frozen_sources(self) -> dict[str, list[str]]:
        """{config key (e.g. "network.mindalle"): the files / folders the frozen parts are read from}: recorded with
        their size and sha256 in a lean checkpoint, and named when a load rebuilds other frozen weights. Empty for
        networks built from sizes (the seeded random init: `network.seed`)."""
        return {}

    @property
    def save_frozen(self) -> bool:
        """model.train.save_frozen: true writes every key (a full dump), false (default) a lean checkpoint."""
        return bool((self.hparams.get("train") or {}).get("save_frozen", False))

    def lean_state_keys(self) -> set[str]:
        """What a lean checkpoint holds: the trainable parameters, every buffer (and extra state) and
        `saved_frozen_prefixes()`. Matched through the parameters themselves, so wrappers that rename parameters
        but not state-dict keys (activation checkpointing) do not matter."""
        keep = self.saved_frozen_prefixes()
        return {key for key, value in self.state_dict(keep_vars=True).items()
                if not isinstance(value, torch.nn.Parameter) or value.requires_grad
                or (keep and key.startswith(keep))}

    def frozen_state_keys(self) -> list[str]:
        """The state-dict keys a lean checkpoint leaves out (state-dict order): the frozen parameters the config
        rebuilds."""
        lean = self.lean_state_keys()
        return [key for key in self.state_dict(keep_vars=True) if key not in lean]

    def saved_state_keys(self) -> set[str] | None:
        """The state-dict keys a checkpoint holds: `lean_state_keys()`, or every key (None) with
        model.train.save_frozen=true."""
        return None if self.save_frozen else self.lean_state_keys()

    def frozen_digest(self) -> str:
        """sha256 of the frozen tensors (`frozen_state_keys`: key, dtype, shape, bytes), computed once: the frozen
        weights never change, and the first call comes before anything could alter them (`setup`, before
        Lightning's precision plugin converts the weights; `set_lora_merged`, before the adapters are folded into
        the base)."""
        if self._frozen_digest is None:
            state = self.state_dict()
            self._frozen_digest = tensors_sha256((key, state[key]) for key in self.frozen_state_keys())
        return self._frozen_digest

    def frozen_record(self, lean: bool) -> dict[str, Any]:
        """`checkpoint["storyexp"]["frozen"]`: {"saved": "lean" | "full"}, and for a lean checkpoint the frozen
        tensors' sha256, the pretrained files they come from (`frozen_sources`) and `network.seed`."""
        if not lean:
            return {"saved": "full"}
        sources = {key: [file_record(path) for path in paths] for key, paths in self.frozen_sources().items()}
        seed = (self.hparams.get("network") or {}).get("seed")
        return {"saved": "lean", "sha256": self.frozen_digest(), "sources": sources, "network_seed": seed}

    def check_frozen_record(self, checkpoint: dict[str, Any]) -> None:
        """A lean checkpoint's frozen parts, rebuilt from this config, must hash to its record."""
        record = (checkpoint.get(RECORD_KEY) or {}).get(FROZEN_RECORD) or {}
        if "sha256" not in record:  # a lean checkpoint from before the record existed (train.mode=lora)
            warnings.warn("The checkpoint holds only what trains but no record of its frozen weights: they are "
                          "rebuilt from the config unchecked.", stacklevel=2)
            return
        if record["sha256"] != self.frozen_digest():
            raise ConfigurationError(frozen_mismatch(self._checkpoint_name(), record, self.frozen_digest()))

    def _checkpoint_name(self) -> str:
        path = self._trainer.ckpt_path if self._trainer is not None else None
        return f"Checkpoint (ckpt_path) {path}" if path else "The checkpoint"

    def _sharded(self) -> bool:
        return self._trainer is not None and getattr(self._trainer.strategy, "strategy_name", "") in SHARDED_STRATEGIES

    def setup(self, stage: str) -> None:
        if not self.save_frozen:
            self.frozen_digest()  # the weights as built: before precision plugins convert them

    # ------------------------------------------------------------------------------------ subclass hooks

    def losses(self, batch: dict[str, Any], generators: list[torch.Generator] | None) -> dict[str, torch.Tensor]:
        """{"loss": ..., other terms}; random draws from `generators` (one per story) when given. `self.training`
        tells training (dropouts on) from validation/test (off)."""
        raise NotImplementedError

    def sample_stories(self, batch: dict[str, Any], captions: list[list[str]] | None, num_candidates: int,
                       settings: dict[str, Any], generators: list[torch.Generator]) -> torch.Tensor:
        """uint8 [B, K, V, H, W, 3]; every random draw of story b from generators[b]."""
        raise NotImplementedError

    def tokenize(self, captions: list[str]):
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        return {}

    def load_checkpoint_extras(self, checkpoint: dict[str, Any]) -> None:
        """Restore what `checkpoint_extras` saved (before the weights are checked and loaded)."""

    # -------------------------------------------------------------------------------------------- seeding

    def story_generators(self, batch: dict[str, Any], seed: int | None = None) -> list[torch.Generator]:
        base = int(self.hparams.seed if seed is None else seed)
        return [torch.Generator(device=self.device).manual_seed(story_seed(base, str(sid))) for sid in batch["ids"]]

    def training_generators(self, batch: dict[str, Any]) -> list[torch.Generator]:
        """One generator per story for this optimizer step: fresh draws every step (as the originals' global RNG
        gave), but the same for a story whichever process, batch or resume it is trained in."""
        base, step = int(self.hparams.seed), int(self.global_step)
        return [torch.Generator(device=self.device).manual_seed(story_seed(base, f"{sid}/train/{step}"))
                for sid in batch["ids"]]

    def per_process_share(self, count: torch.Tensor) -> torch.Tensor:
        """A count summed over the training processes, divided by their number: the normaliser that makes a loss
        averaged over variable-sized terms (e.g. caption tokens) the global batch's mean under DDP. The count itself
        is the same on 1 process."""
        count = count.detach().to(torch.float64)
        if self._trainer is not None and self._trainer.world_size > 1:
            count = self._trainer.strategy.reduce(count, reduce_op="mean")
        return count

    # -------------------------------------------------------------------------------------------- steps

    def training_step(self, batch, batch_idx):
        self.set_lora_merged(False)  # a merged peft layer skips its adapter: no gradient would reach it
        out = self.losses(batch, self.training_generators(batch))
        for key, value in out.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=len(batch["ids"]))
        return out["loss"]

    def _eval_step(self, stage: str, batch) -> torch.Tensor:
        out = self.losses(batch, self.story_generators(batch))
        for key, value in out.items():
            name = f"{stage}/{key}"
            if name not in self._eval_means:  # story-weighted mean, summed across processes in float64
                self._eval_means[name] = MeanMetric().set_dtype(torch.float64).to(self.device)
            mean = self._eval_means[name]
            mean.update(value.detach().double(), weight=len(batch["ids"]))
            self.log(name, mean, prog_bar=key == "loss", batch_size=len(batch["ids"]),
                     metric_attribute=f"_eval_means.{name}")
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        return self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        return self._eval_step("test", batch)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        k = int((self.hparams.get("sampler") or {}).get("num_candidates", 1))
        candidates = self.generate_candidates(batch, num_candidates=k)
        out = {"ids": batch["ids"], "index": batch["index"], "captions": batch["captions"],
               "generated": candidates[:, 0]}
        if k > 1:
            out["candidates"] = candidates
        return out

    # -------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], captions: list[list[str]] | None = None, seed: int | None = None,
                 **sampler_overrides) -> torch.Tensor:
        """Sample whole stories: uint8 [B, V, H, W, 3], one candidate per story. `captions` replaces the batch's
        (the caption-shuffling baseline); `seed` replaces the run's."""
        return self.generate_candidates(batch, captions=captions, seed=seed, num_candidates=1,
                                        **sampler_overrides)[:, 0]

    @torch.no_grad()
    def generate_candidates(self, batch: dict[str, Any], captions: list[list[str]] | None = None,
                            seed: int | None = None, num_candidates: int = 1, **sampler_overrides) -> torch.Tensor:
        """uint8 [B, K, V, H, W, 3]: K independent stories per input story (no re-ranking), each story drawn
        from its own generator (`story_seed`)."""
        settings = {**(self.hparams.get("sampler") or {}), **sampler_overrides}
        if int(num_candidates) < 1:
            raise ConfigurationError(f"num_candidates must be >= 1, got {num_candidates}")
        with self.sampling_mode():
            return self.sample_stories(batch, captions, int(num_candidates), settings,
                                       self.story_generators(batch, seed))

    # ------------------------------------------------------------------------------------ per-frame reports

    def report_frames(self, first: int, frames: torch.Tensor) -> None:
        """Called by a system's sampling code as target frames come into being: `frames` uint8 [B, K, n, H, W, 3]
        are target frames first..first+n-1 of every story and candidate. A no-op unless `stream_story` listens."""
        listener = getattr(self, "_frame_listener", None)
        if listener is not None:
            listener(int(first), frames)

    @property
    def reporting(self) -> bool:
        """Whether anyone listens to `report_frames` (sampling code may skip preparing reports otherwise)."""
        return getattr(self, "_frame_listener", None) is not None

    def codes_reporter(self, rows: tuple[int, int], decode: Callable[[torch.Tensor], torch.Tensor]
                       ) -> Callable[[int, torch.Tensor], None] | None:
        """The `on_frames` callback of the token samplers (`storyexp.models.story_frames`, both StoryDALL-E backbones)
        while `stream_story` listens, else None (so sampling without a listener is untouched): each group of codes
        [B*K, n, T] (rows = (B, K), candidates of a story adjacent) is decoded by `decode` ([N, T] -> uint8
        [N, H, W, 3]) and reported as target frames first..first+n-1 (`report_frames`)."""
        if not self.reporting:
            return None
        B, K = rows

        def on_frames(first: int, codes: torch.Tensor) -> None:
            pixels = decode(codes.reshape(-1, codes.shape[-1]))
            self.report_frames(first, pixels.view(B, K, codes.shape[1], *pixels.shape[1:]))

        return on_frames

    def stream_story(self, batch: dict[str, Any], captions: list[list[str]] | None = None, seed: int | None = None,
                     num_candidates: int = 1, **sampler_overrides) -> Iterator[FrameUpdate]:
        """Sample whole stories as `generate_candidates` does (the same frames), yielding each target frame as soon as
        the sampler has produced it (`FrameUpdate(j, uint8 [B, K, H, W, 3])`, in frame order), then
        `FrameUpdate(None, generate_candidates' output)`. Frames drawn together (StoryDALL-E's groups) arrive together.

        Sampling runs in a worker thread that reports into a queue (the models' loops cannot yield); closing the
        iterator early stops the sampling at its next report."""
        updates: queue.Queue = queue.Queue()
        closed = threading.Event()

        def listener(first: int, frames: torch.Tensor) -> None:
            if closed.is_set():
                raise _StreamClosed()
            updates.put(("frames", first, frames.detach().cpu()))

        def work() -> None:
            self._frame_listener = listener
            try:
                stories = self.generate_candidates(batch, captions=captions, seed=seed, num_candidates=num_candidates,
                                                   **sampler_overrides)
                updates.put(("done", stories.cpu()))
            except BaseException as err:  # handed to the consumer, which raises it
                updates.put(("error", err))
            finally:
                self._frame_listener = None

        worker = threading.Thread(target=work, name="storyexp-stream", daemon=True)
        worker.start()
        try:
            while True:
                kind, *payload = updates.get()
                if kind == "frames":
                    first, frames = payload
                    for n in range(frames.shape[2]):
                        yield FrameUpdate(first + n, frames[:, :, n])
                elif kind == "done":
                    yield FrameUpdate(None, payload[0])
                    return
                else:
                    error = payload[0]
                    if isinstance(error, _StreamClosed):
                        return
                    raise error
        finally:
            closed.set()
            worker.join()

    @contextmanager
    def sampling_mode(self):
        """Eval mode while sampling (no dropout), the previous mode restored afterwards."""
        was_training = self.training
        self.eval()
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if self.lora_merge_for_sampling and not fitting:  # merged once, kept merged (storyexp.systems.lora)
            self.set_lora_merged(True)
        try:
            yield
        finally:
            self.train(was_training)

    def warn_truncated(self, cut: list[str], limit: str) -> None:
        """The caption-truncation warning (the originals crashed on over-long captions), at most a few times."""
        if cut and self._warned_long < MAX_TRUNCATION_WARNINGS:
            self._warned_long += 1
            warnings.warn(f"{len(cut)} caption(s) were truncated to {limit}, e.g. {cut[0][:80]!r}.", stacklevel=3)

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.checkpoint_extras())
        if "state_dict" not in checkpoint or self._sharded():
            return  # FSDP / DeepSpeed: every rank writes its own shards of every key, kept whole
        if self._lora_merged and self.save_frozen:  # a full dump holds the base as built, not base + adapters
            self.set_lora_merged(False)
            current = self.state_dict()
            checkpoint["state_dict"] = {k: current[k] for k in checkpoint["state_dict"]}
        keys = self.saved_state_keys()
        if keys is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        # a new dict: the model record callback's own dict (written before this hook) is not altered
        record = self.frozen_record(lean=keys is not None)
        checkpoint[RECORD_KEY] = {**(checkpoint.get(RECORD_KEY) or {}), FROZEN_RECORD: record}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The frozen weights a lean checkpoint lacks are the config's, not missing: they are left out of the reported
        missing keys (Lightning's `load_from_checkpoint` would warn about every one of them); the rest strictly."""
        lean = self.lean_state_keys()
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in lean]
        if strict and (missing or result.unexpected_keys):
            check_state_dict({k: v for k, v in self.state_dict().items() if k in lean}, state_dict, "State dict")
        return type(result)(missing, result.unexpected_keys)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_checkpoint_extras(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:  # FSDP / DeepSpeed load their shards themselves, strictly
            return
        self.set_lora_merged(False)  # loaded weights must not land on top of merged adapters
        frozen = self.frozen_state_keys()
        target = self.state_dict()
        what = "Checkpoint (ckpt_path)"
        # one line naming the problems, before Lightning's strict load would raise a long RuntimeError
        if any(key in state for key in frozen):  # a full dump: every key, and its frozen weights replace the built ones
            check_state_dict(target, state, what, hint=LOAD_HINT)
            self._frozen_digest = tensors_sha256((k, state[k].to(target[k].dtype)) for k in frozen)
            return
        frozen_set = set(frozen)
        check_state_dict({k: v for k, v in target.items() if k not in frozen_set}, state, what, hint=LOAD_HINT)
        self.check_frozen_record(checkpoint)

    # ------------------------------------------------------------------------------------ scaling

    def block_modules(self) -> list[torch.nn.Module]:
        """The networks' repeated blocks, each one run through its own `forward`: the units FSDP gathers one at a
        time and activation checkpointing recomputes (`storyexp.tasks.strategies`). None: neither is available."""
        return []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The recipes clip by norm; under FSDP the norm must be taken over every rank's shards, which only the
        FSDP root's `clip_grad_norm_` does (Lightning's FSDP precision refuses `gradient_clip_algorithm=norm`)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel) and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        return configure_adamw(self, self.hparams.optimizer, self.hparams.lr_schedule,
                               defaults=self.optimizer_defaults, frozen_hint=self.frozen_hint)
