"""Masked-LM scorers: anything with a `tokenizer` and `mask_logits(texts, image_embeds) -> (N, V)` logits at the single
[MASK] of each text. The probes (`memory_colors`, `visual_property_norms`) only talk to this interface.

Implementations:
* `HFMaskedLMScorer`: a HF `BertForMaskedLM` from a local dir. `"minilm"` (the packaged 6-layer BERT) has no MLM
  head weights, so its head is randomly initialised (logged as missing keys): fine for tests, meaningless numbers.
* `CheckpointScorer`: a `vl` checkpoint whose system has an `mlm` objective, rebuilt from its run config (objectives
  and `data_info` from the checkpoint's saved hyper-parameters, else from the run's data module). The text goes
  through `system.encoder`, then `objectives["mlm"].logits` at the mask. `image_embeds` (N, D) are passed as
  `clip_feats` (N,1,D) (CLIP-BERT's image token); `accepts_image` (hence the probes' "-explicit" variant) is True only
  where the encoder really reads a CLIP image (`encoder.use_image` and `visual_input == "global"`: not `model=bert`,
  not CLIP-BERT built on text-only data, not region/grid models). Models that cannot run without a visual input (region models) get a
  single all-zero region with `visual_mask` 0, i.e. no visual input where the model honours the mask.
* `ReleasedClipBertScorer`: a released CLIP-BERT / BERT-baseline state dict (the study's DeepSpeed
  `mp_rank_00_model_states.pt`, weights under `"module"`, keys of the seed's `BertImageForMaskedLM`), loaded as the
  seed's notebooks do (`BertImageForMaskedLM(BertConfig.from_pretrained("bert-base-uncased"))`, non-strict): a
  `ClipBertSystem` at bert-base sizes (or those of a given BERT config dir) with the 512-d image projection, through
  `ClipBertSystem.load_original_state_dict` (read with `weights_only=True`; every missing / unused key logged).
* `LxmertTextOnlyScorer` / `VisualBertTextOnlyScorer`: `vl.models.text_only` wrappers (no visual input).
* `RandomScorer`: `torch.rand` logits (the random baseline).

`build_scorer(spec)` turns a CLI/config string into one of these: "random", "minilm", a `.ckpt` file, a HF dir
(`model_type` bert / lxmert / visual_bert picks the wrapper), "lxmert:DIR" / "visual_bert:DIR" / "bert:DIR", or a
released state file: "clip_bert:FILE[@BERT_CONFIG_DIR]" (CLIP-BERT; takes the "-explicit" image) /
"bert:FILE[@BERT_CONFIG_DIR]" (the BERT baselines, trained with the same class on text: probed without an image, as
the seed's notebooks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MASK = "[MASK]"


@runtime_checkable
class MaskedLMScorer(Protocol):
    """`tokenizer` (a BERT tokenizer) + `mask_logits(texts, image_embeds=None) -> (N, V)` float logits (CPU)."""

    name: str
    tokenizer: Any

    def mask_logits(self, texts: list[str], image_embeds: torch.Tensor | None = None) -> torch.Tensor: ...


def encode_masked(tokenizer: Any, texts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenise (padded) and find each text's mask position. Exactly one [MASK] per text (DataError otherwise)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    is_mask = enc["input_ids"] == tokenizer.mask_token_id
    counts = is_mask.sum(1)
    for text, n in zip(texts, counts.tolist()):
        if n != 1:
            raise DataError(f"query {text!r}: expected exactly one {MASK} token, found {n}")
    positions = is_mask.long().argmax(1)
    if "token_type_ids" not in enc:
        enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return dict(enc), positions


class _BatchedScorer:
    """Chunks texts into batches; subclasses implement `_logits(enc, positions, image_embeds) -> (B, V)`."""

    name = "scorer"
    tokenizer: Any
    batch_size: int = 32
    device: torch.device = torch.device("cpu")
    accepts_image = False

    def _logits(
        self, enc: dict[str, torch.Tensor], positions: torch.Tensor, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def mask_logits(self, texts: list[str], image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        texts = list(texts)
        if image_embeds is not None:
            if not self.accepts_image:
                raise ConfigError(f"scorer '{self.name}': this model takes no image embeddings")
            if image_embeds.shape[0] != len(texts):
                raise ValueError(f"image_embeds has {image_embeds.shape[0]} rows for {len(texts)} texts")
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc, pos = encode_masked(self.tokenizer, chunk)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            img = None
            if image_embeds is not None:
                img = image_embeds[start : start + self.batch_size].to(self.device)
            out.append(self._logits(enc, pos.to(self.device), img).float().cpu())
        if not out:
            return torch.zeros(0, len(self.tokenizer))
        return torch.cat(out)


def _at(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,T,X) -> (B,X) at one position per row."""
    return states[torch.arange(states.shape[0], device=states.device), positions]


class HFMaskedLMScorer(_BatchedScorer):
    """A HF `BertForMaskedLM` from a local dir (or "minilm": its MLM head is random-init)."""

    def __init__(self, model_dir: str = "minilm", *, name: str | None = None, device: str = "cpu") -> None:
        from transformers import BertForMaskedLM

        from vl.data.collate import load_tokenizer
        from vl.pretrained import log_key_report, resolve_model_dir

        path = resolve_model_dir(model_dir)
        self.model, info = BertForMaskedLM.from_pretrained(str(path), output_loading_info=True)
        log_key_report(f"BertForMaskedLM from {path}", info["missing_keys"], info["unexpected_keys"])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.name = name or Path(str(model_dir)).name

    def _logits(self, enc, positions, image_embeds):
        out = self.model(**enc, return_dict=True)
        return _at(out.logits, positions)


class CheckpointScorer(_BatchedScorer):
    """A `vl` checkpoint with an `mlm` objective (see the module docstring for visual inputs)."""

    @property
    def accepts_image(self) -> bool:  # type: ignore[override]
        """True only where the encoder reads a global CLIP image (`clip_feats`): CLIP-BERT built with its image
        projection. `model=bert` (`use_image=False`), CLIP-BERT on text-only data and region/grid models ignore
        `clip_feats`, so an "explicit" run of theirs would only repeat the implicit numbers under another name."""
        encoder = self.system.encoder
        return bool(getattr(encoder, "use_image", False)) and getattr(encoder, "visual_input", None) == "global"

    def __init__(
        self,
        ckpt_path: str | Path,
        run_cfg: Any = None,
        *,
        name: str | None = None,
        device: str = "cpu",
    ) -> None:
        from vl.build import build_datamodule, build_model, instantiate_node, load_run_config
        from vl.data.collate import load_tokenizer

        ckpt_path = Path(ckpt_path)
        if run_cfg is None:
            run_cfg, _ = load_run_config(ckpt_path)
        from vl.checkpoint import check_architecture, read_checkpoint

        state = read_checkpoint(ckpt_path, "ckpt_path")  # weights_only: a file that would run code is refused
        hparams = state.get("hyper_parameters") or {}
        if "objectives" in hparams and "data_info" in hparams:
            kwargs: dict[str, Any] = {
                "objectives": list(hparams["objectives"]),
                "data_info": dict(hparams["data_info"]),
                "init_from": None,
            }
            if "state_dict_path" in run_cfg.model:
                kwargs["state_dict_path"] = None
            system = instantiate_node(run_cfg.model, **kwargs)
        else:  # no saved hyper-parameters: the data module supplies objectives and data_info
            system = build_model(run_cfg, build_datamodule(run_cfg))
        check_architecture(state, system, ckpt_path)
        system.load_state_dict(state["state_dict"])
        if "mlm" not in system.objectives:
            raise ConfigError(
                f"ckpt_path: '{ckpt_path}' has no 'mlm' objective (objectives: {list(system.objectives)}); "
                "the masked-LM probes need an MLM head"
            )
        self.system = system.to(device).eval()
        self.device = torch.device(device)
        self.data_info = dict(getattr(system, "data_info", {}) or {})
        self.tokenizer = load_tokenizer(str(run_cfg.data.get("tokenizer", "minilm")))
        self.name = name or ckpt_path.parent.parent.name
        self._needs_visual: bool | None = None

    def _zero_visual(self, batch: dict[str, Any]) -> None:
        bsz = batch["input_ids"].shape[0]
        dim = int(self.data_info.get("visual_dim", 2048))
        batch["visual_feats"] = torch.zeros(bsz, 1, dim, device=self.device)
        batch["visual_boxes"] = torch.zeros(bsz, 1, 4, device=self.device)
        batch["visual_mask"] = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)

    def _encode(self, batch: dict[str, Any]) -> Any:
        if self._needs_visual:
            self._zero_visual(batch)
            return self.system.encoder(batch)
        try:
            out = self.system.encoder(batch)
            self._needs_visual = False
            return out
        except KeyError as err:
            if self._needs_visual is False or not str(err).strip("'\"").startswith("visual_"):
                raise
            log.info("%s: the encoder needs visual input; passing one zero region with visual_mask 0", self.name)
            self._needs_visual = True
            self._zero_visual(batch)
            return self.system.encoder(batch)

    def _logits(self, enc, positions, image_embeds):
        batch: dict[str, Any] = dict(enc)
        if image_embeds is not None:
            batch["clip_feats"] = image_embeds.reshape(image_embeds.shape[0], 1, -1)
        out = self._encode(batch)
        return self.system.objectives["mlm"].logits(_at(out.text, positions))


#: the seed's `BertConfig.from_pretrained("bert-base-uncased")` sizes, in `build_bert`'s names
BERT_BASE_SIZES: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
}
#: `BertConfig` fields `build_bert` cannot set: a config dir must hold bert-base-uncased's values
_FIXED_BERT_FIELDS: dict[str, Any] = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
}
#: the seed's `CLIP_EMBED_DIM` (`models/src/clip_bert/modeling_bert.py`): the image projection's input size
CLIP_EMBED_DIM = 512


def bert_sizes_from_config_dir(config_dir: str | Path) -> dict[str, Any]:
    """`build_bert` size arguments from a HF BERT dir's config.json (e.g. a local bert-base-uncased); a field this
    model cannot reproduce (`_FIXED_BERT_FIELDS`) with another value is a `ConfigError` naming the file and field."""
    path = Path(config_dir).expanduser() / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model: cannot read the BERT config '{path}' ({e})") from None
    names = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "initializer_range": "initializer_range",
    }
    for field, value in _FIXED_BERT_FIELDS.items():
        if field in cfg and cfg[field] != value:
            raise ConfigError(f"{path}: {field}={cfg[field]!r}; the CLIP-BERT model supports {value!r} only")
    return {ours: cfg.get(theirs, BERT_BASE_SIZES[ours]) for ours, theirs in names.items()}


class ReleasedClipBertScorer(CheckpointScorer):
    """A released CLIP-BERT or BERT-baseline state dict (see the module docstring), probed as the seed's notebooks.

    `config_dir`: a HF BERT dir whose config.json gives the sizes (None: bert-base-uncased's, as the seed) and whose
    tokenizer files, where present, give the tokenizer (else the packaged bert-base-uncased vocab, "minilm").
    `image=False` (the BERT baselines, `bert:FILE`): the same model, probed without an image and with no
    "-explicit" row (`accepts_image` False), as the seed probed them."""

    def __init__(
        self,
        state_path: str | Path,
        *,
        config_dir: str | Path | None = None,
        image: bool = True,
        name: str | None = None,
        device: str = "cpu",
    ) -> None:
        from vl.data.collate import load_tokenizer
        from vl.models.clip_bert import ClipBertSystem

        state_path = Path(state_path).expanduser()
        if not state_path.is_file():
            raise ConfigError(f"model: released state dict '{state_path}' is not a file")
        sizes = dict(BERT_BASE_SIZES) if config_dir is None else bert_sizes_from_config_dir(config_dir)
        system = ClipBertSystem(
            encoder={
                "_target_": "vl.models.clip_bert.ClipBertEncoder",
                "text_encoder": {**sizes, "dropout": 0.1},  # eval mode: dropout off
                "image_dim": CLIP_EMBED_DIM,
            },
            objectives=["mlm"],
            data_info={"clip_dim": CLIP_EMBED_DIM},
            optimizer={"_target_": "torch.optim.Adam", "_partial_": True},
            state_dict_path=str(state_path),  # weights_only read, non-strict, keys logged (load_original_state_dict)
        )
        self.system = system.to(device).eval()
        self.device = torch.device(device)
        self.data_info = dict(system.data_info)
        self.image = bool(image)
        tokenizer_dir = "minilm"
        if config_dir is not None and any(
            (Path(config_dir).expanduser() / f).is_file() for f in ("vocab.txt", "tokenizer.json")
        ):
            tokenizer_dir = str(Path(config_dir).expanduser())
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.name = name or state_path.parent.name
        self._needs_visual = False

    @property
    def accepts_image(self) -> bool:  # type: ignore[override]
        """CLIP-BERT (`clip_bert:FILE`) only; the BERT baselines (`bert:FILE`) are probed text-only."""
        return self.image


class _TextOnlyScorer(_BatchedScorer):
    """A `vl.models.text_only` wrapper: `model(input_ids, attention_mask, token_type_ids) -> (B, T, V)` logits."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "model", device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)

    def _logits(self, enc, positions, image_embeds):
        logits = self.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        return _at(logits, positions)


class LxmertTextOnlyScorer(_TextOnlyScorer):
    """`vl.models.text_only.LxmertTextOnly` (dummy visual input; it cannot affect the logits).

    `set_cross_dropout(True, seed=s)`: the language-only cross-modality layers score with dropout on, as the seed's
    Visual Property Norms notebook ran them (`LxmertTextOnly.cross_layer_dropout`), reproducibly: batch i of the
    scorer's calls runs with torch's generators seeded to s + i inside `torch.random.fork_rng` (the caller's random
    state is left as it was). `run_probes(lxmert_dropout="seed")` turns it on for that probe only."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "lxmert", device: str = "cpu") -> None:
        super().__init__(model, tokenizer, name=name, device=device)
        self.cross_dropout = False
        self.dropout_seed = 0
        self._batches = 0

    def set_cross_dropout(self, on: bool, *, seed: int = 0) -> None:
        self.model.eval()
        self.model.cross_layer_dropout(on)
        self.cross_dropout, self.dropout_seed, self._batches = bool(on), int(seed), 0

    def _logits(self, enc, positions, image_embeds):
        if not self.cross_dropout:
            return super()._logits(enc, positions, image_embeds)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.dropout_seed + self._batches)
            self._batches += 1
            return super()._logits(enc, positions, image_embeds)


class VisualBertTextOnlyScorer(_TextOnlyScorer):
    """`vl.models.text_only.VisualBertTextOnly` (no visual embeddings)."""


class RandomScorer:
    """Random baseline: `torch.rand` logits over the vocabulary (seeded)."""

    def __init__(self, tokenizer: Any = None, *, name: str = "random", seed: int = 0) -> None:
        if tokenizer is None:
            from vl.data.collate import load_tokenizer

            tokenizer = load_tokenizer("minilm")
        self.tokenizer = tokenizer
        self.name = name
        self.generator = torch.Generator().manual_seed(seed)

    def mask_logits(self, texts: list[str], image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        encode_masked(self.tokenizer, list(texts)) if texts else None  # same one-[MASK] check as the models
        return torch.rand(len(texts), len(self.tokenizer), generator=self.generator)


def _model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", "bert"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model: cannot read {path}/config.json ({e})") from None


def build_scorer(spec: str, *, name: str | None = None, device: str = "cpu") -> MaskedLMScorer:
    """ "random" | "minilm" | path/to.ckpt | HF dir (bert/lxmert/visual_bert by config.json) | "<kind>:DIR" |
    "clip_bert:FILE[@BERT_CONFIG_DIR]" / "bert:FILE[@BERT_CONFIG_DIR]" (a released state dict: `ReleasedClipBertScorer`)."""
    from vl.models.text_only import load_text_only_tokenizer, lxmert_text_only, visual_bert_text_only

    kind, _, rest = spec.partition(":")
    if rest and kind in ("bert", "clip_bert", "lxmert", "visual_bert", "ckpt"):
        target = rest
    else:
        kind, target = "", spec
    if kind in ("bert", "clip_bert"):
        state, config_dir = _state_and_config_dir(target)
        if kind == "clip_bert" or state is not None:
            if state is None:
                raise ConfigError(f"model '{spec}': '{target}' is not a state-dict file (clip_bert:FILE[@BERT_DIR])")
            return ReleasedClipBertScorer(
                state, config_dir=config_dir, image=kind == "clip_bert", name=name, device=device
            )
    if target == "random":
        return RandomScorer(name=name or "random")
    if target == "minilm":
        return HFMaskedLMScorer("minilm", name=name or "minilm", device=device)
    path = Path(target).expanduser()
    if kind == "ckpt" or (not kind and path.is_file()):
        return CheckpointScorer(path, name=name, device=device)
    if not path.is_dir():
        raise ConfigError(f"model '{spec}': not 'random', 'minilm', a .ckpt file or a local model dir")
    kind = kind or _model_type(path)
    if kind == "lxmert":
        return LxmertTextOnlyScorer(
            lxmert_text_only(path), load_text_only_tokenizer(path), name=name or path.name, device=device
        )
    if kind in ("visual_bert", "visualbert"):
        return VisualBertTextOnlyScorer(
            visual_bert_text_only(path), load_text_only_tokenizer(path), name=name or path.name, device=device
        )
    if kind == "bert":
        return HFMaskedLMScorer(str(path), name=name, device=device)
    raise ConfigError(f"model '{spec}': unsupported model_type '{kind}' (bert, lxmert, visual_bert)")


def _state_and_config_dir(target: str) -> tuple[Path | None, Path | None]:
    """ "FILE" or "FILE@BERT_CONFIG_DIR" -> (state file, config dir); (None, None) when FILE is not a file."""
    path = Path(target).expanduser()
    if path.is_file():
        return path, None
    head, at, tail = target.rpartition("@")
    if not at or not Path(head).expanduser().is_file():
        return None, None
    config_dir = Path(tail).expanduser()
    if not (config_dir / "config.json").is_file():
        raise ConfigError(f"model '{target}': '{config_dir}' is not a BERT config dir (no config.json)")
    return Path(head).expanduser(), config_dir


class ClipTextEmbedder:
    """CLIP text features (`CLIPModel.get_text_features`, not normalised) of query sentences, from a local CLIP dir:
    the "imagined image" of the CLIP-BERT-explicit variant."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoTokenizer, CLIPModel

        model_dir = Path(model_dir).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"clip_model: '{model_dir}' is not a local CLIP model dir (no config.json)")
        self.model = CLIPModel.from_pretrained(str(model_dir)).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
            )
            if not isinstance(feats, torch.Tensor):
                feats = feats.pooler_output
            out.append(feats.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, int(self.model.config.projection_dim))
