"""Adapters: turn a registry entry plus resolved weights into a :class:`LoadedEncoder`
with ``encode_image`` (normalised float tensors) and ``encode_text`` (strings)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..errors import EncoderError, WeightsError
from .registry import EncoderEntry, conch_available, get_entry, load_registry
from .weights import ResolvedWeights, load_state_dict, resolve_weights

__all__ = ["LoadedEncoder", "build_open_clip_from_cfg", "load_encoder", "load_encoders", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    entry: EncoderEntry
    model: nn.Module
    image_fn: Callable[[torch.Tensor], torch.Tensor]
    text_fn: Callable[[Sequence[str]], torch.Tensor]
    weights_sha256: str
    logit_scale: float
    device: torch.device
    #: tokens each text takes in the text tower (special tokens included), before truncation
    token_count: Callable[[Sequence[str]], list[int]] | None = None
    context_length: int = 77
    #: an accelerator stand-in (:mod:`.fake_accelerator`): its preprocessing counts as
    #: device time, so the pipeline hands it the uint8 tiles as they are
    emulated_device: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @torch.inference_mode()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of normalised NCHW images, L2-normalised, float32."""
        out = self.image_fn(x).float()
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        out = self.text_fn(list(texts)).float()
        return torch.nn.functional.normalize(out, dim=-1)

    def attrs(self) -> dict[str, Any]:
        return self.entry.as_attrs() | {
            "weights_sha256": self.weights_sha256,
            "normalized": True,
            "logit_scale": self.logit_scale,
            # the joint image-text space the features live in (checked at load and at score)
            "space": {
                "projected": True,
                "dim": self.entry.embed_dim,
                "weights_sha256": self.weights_sha256,
                "unit_norm": True,
            },
        }

    def pil_transform(self) -> Callable[[Any], torch.Tensor]:
        """The encoder's own PIL preprocessing (reference for the GPU path)."""
        import open_clip

        p = self.entry.preprocess
        return open_clip.image_transform(
            p.size,
            is_train=False,
            mean=p.mean,
            std=p.std,
            interpolation=p.interpolation,
            resize_mode="shortest",
        )


def build_open_clip_from_cfg(model_cfg: dict[str, Any], *, quick_gelu: bool = False) -> nn.Module:
    """An open_clip ``CLIP`` (or ``CustomTextCLIP``) from a model config dict."""
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text", None)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        model: nn.Module = open_clip.CustomTextCLIP(**cfg, quick_gelu=quick_gelu)
    else:
        model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)
    return model


def _open_clip_tokenizer(
    model_cfg: dict[str, Any], entry: EncoderEntry
) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    ctx = int(entry.text.get("context_length", text_cfg.get("context_length", 77)))
    if text_cfg.get("hf_tokenizer_name"):
        tok: Any = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
    else:
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    return tok


def _finish_open_clip(
    entry: EncoderEntry, model: nn.Module, model_cfg: dict[str, Any], sha: str, device: torch.device
) -> LoadedEncoder:
    model.eval().to(device)
    tok = _open_clip_tokenizer(model_cfg, entry)

    clip: Any = model

    def text_fn(texts: Sequence[str]) -> torch.Tensor:
        return clip.encode_text(tok(texts).to(device))

    scale = float(clip.logit_scale.exp().item()) if hasattr(clip, "logit_scale") else 100.0
    ctx = int(getattr(tok, "context_length", 77))
    count = _token_counter(tok)
    return LoadedEncoder(entry, model, clip.encode_image, text_fn, sha, scale, device, count, ctx)


def _token_counter(tok: Any) -> Callable[[Sequence[str]], list[int]]:
    """Token counts (start and end tokens included) of open_clip's BPE or a Hugging Face
    tokenizer, without truncation: what tells a long report from one the tower sees whole."""
    if hasattr(tok, "byte_encoder"):  # open_clip's SimpleTokenizer (CLIP's BPE)
        clean = getattr(tok, "clean_fn", lambda t: t)
        return lambda texts: [len(tok.encode(clean(t))) + 2 for t in texts]
    hf = getattr(tok, "tokenizer", tok)  # open_clip's HFTokenizer wraps a Hugging Face one
    return lambda texts: [len(ids) for ids in hf(list(texts), truncation=False)["input_ids"]]


def _demo(entry: EncoderEntry, device: torch.device) -> LoadedEncoder:
    if entry.model_cfg is None:
        raise EncoderError(f"encoder {entry.name!r}: kind demo needs 'model_cfg'")
    cfg = dict(entry.model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        model = build_open_clip_from_cfg(cfg)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return _finish_open_clip(entry, model, cfg, "demo-untrained-" + h.hexdigest(), device)


def _open_clip(entry: EncoderEntry, w: ResolvedWeights, device: torch.device) -> LoadedEncoder:
    if w.path.is_dir() and (w.path / "open_clip_config.json").is_file():
        meta = json.loads((w.path / "open_clip_config.json").read_text())
        cfg = dict(meta["model_cfg"])
    elif entry.model_cfg is not None:
        cfg = dict(entry.model_cfg)
    elif entry.architecture:
        import open_clip

        got = open_clip.get_model_config(entry.architecture)
        if got is None:
            raise EncoderError(
                f"encoder {entry.name!r}: open_clip has no architecture {entry.architecture!r}"
            )
        cfg = dict(got)
    else:
        raise EncoderError(
            f"encoder {entry.name!r}: no architecture, model_cfg or open_clip_config.json to build the model"
        )
    model = build_open_clip_from_cfg(cfg, quick_gelu=entry.quick_gelu)
    sd = load_state_dict(w.weight_file, encoder=entry.name)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"encoder {entry.name!r}: weights {str(w.weight_file)!r} do not fit the architecture: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return _finish_open_clip(entry, model, cfg, w.sha256, device)


def _hf_clip(entry: EncoderEntry, w: ResolvedWeights, device: torch.device) -> LoadedEncoder:
    from transformers import CLIPModel

    folder = w.path if w.path.is_dir() else w.path.parent
    try:
        model = CLIPModel.from_pretrained(str(folder), use_safetensors=None)
    except Exception as exc:
        raise WeightsError(
            f"encoder {entry.name!r}: cannot load CLIPModel from {str(folder)!r}: {exc}"
        ) from exc
    model.eval().to(device)
    ctx = int(entry.text.get("context_length", 77))
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(folder))
        counter = _token_counter(hf_tok)

        def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            enc = hf_tok(
                list(texts), padding="max_length", truncation=True, max_length=ctx, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:
        # CLIP's BPE vocabulary is the one open_clip ships; PLIP uses it unchanged
        import open_clip

        simple = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        counter = _token_counter(simple)

        def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
            ids = simple(list(texts))
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        out = model.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def text_fn(texts: Sequence[str]) -> torch.Tensor:
        enc = {k: v.to(device) for k, v in tokenize(texts).items()}
        out = model.get_text_features(**enc)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    scale = float(model.logit_scale.exp().item())
    return LoadedEncoder(entry, model, image_fn, text_fn, w.sha256, scale, device, counter, ctx)


def _conch(entry: EncoderEntry, w: ResolvedWeights, device: torch.device) -> LoadedEncoder:
    from conch.open_clip_custom import create_model_from_pretrained, get_tokenizer, tokenize

    model, _ = create_model_from_pretrained(entry.architecture or "conch_ViT-B-16", str(w.weight_file))
    model.eval().to(device)
    tok = get_tokenizer()

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        return model.encode_image(x, proj_contrast=True, normalize=False)

    def text_fn(texts: Sequence[str]) -> torch.Tensor:
        return model.encode_text(tokenize(texts=list(texts), tokenizer=tok).to(device))

    scale = float(model.logit_scale.exp().item())
    ctx = int(entry.text.get("context_length", 128))
    return LoadedEncoder(entry, model, image_fn, text_fn, w.sha256, scale, device, _token_counter(tok), ctx)


def load_encoder(
    entry: EncoderEntry, *, offline: bool = True, device: str | torch.device = "cpu"
) -> LoadedEncoder:
    """Build the encoder of ``entry`` with its weights.

    Raises
    ------
    EncoderError, WeightsError
        Unavailable adapter, missing or unsafe weights, or an embedding size that
        differs from the registry's ``embed_dim``.
    """
    dev = torch.device(device)
    with _triton_hidden(dev):
        if entry.kind == "demo":
            enc = _demo(entry, dev)
        elif entry.kind == "conch" and not conch_available():
            raise EncoderError(
                f"encoder {entry.name!r} needs the 'conch' package (pip install "
                "git+https://github.com/mahmoodlab/CONCH) and access to the gated MahmoodLab/CONCH weights"
            )
        else:
            w = resolve_weights(entry, offline=offline)
            from .keep_model import load_keep

            loader = {"open_clip": _open_clip, "hf_clip": _hf_clip, "conch": _conch, "keep": load_keep}[
                entry.kind
            ]
            enc = loader(entry, w, dev)
    dim = _probe_dim(enc)
    if dim != entry.embed_dim:
        raise EncoderError(
            f"encoder {entry.name!r}: the registry says embed_dim {entry.embed_dim} but the "
            f"weights produce {dim}-dimensional embeddings"
        )
    img = _probe_image_dim(enc)
    if img != dim:
        raise EncoderError(
            f"encoder {entry.name!r}: image features have width {img} but text embeddings {dim}: "
            "the image projection head is not applied, so the features are not in the joint "
            "image-text space (the CONCH issue 16 pitfall); load the model with its projection"
        )
    return enc


@contextmanager
def _triton_hidden(dev: torch.device) -> Iterator[None]:
    """For an encoder on the CPU, import its libraries as if triton were not installed.

    open_clip imports torchvision, whose ``ops`` import torch._dynamo, which loads
    triton (a GPU kernel compiler, about 75 MB resident) whenever it is installed, as it
    is beside PyPI's CUDA build of torch. Nothing here compiles kernels, and torch treats
    a failed ``import triton`` as "not installed". The block lasts while the encoder
    loads; it changes nothing once torch._dynamo is loaded, or on an accelerator.
    """
    hide = dev.type == "cpu" and "triton" not in sys.modules and "torch._dynamo" not in sys.modules
    if hide:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        if hide and "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]


def _probe_dim(enc: LoadedEncoder) -> int:
    return int(enc.encode_text(["a"]).shape[-1])


def _probe_image_dim(enc: LoadedEncoder) -> int:
    """The width of the image tower's output on one grey image of the model's size."""
    size = enc.entry.preprocess.size
    with torch.inference_mode():
        return int(enc.image_fn(torch.zeros(1, 3, size, size, device=enc.device)).shape[-1])


def resolve_device(name: str) -> str:
    """``auto`` becomes ``cuda`` where a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_encoders(cfg: Config, *, device: str = "cpu") -> list[LoadedEncoder]:
    """The configured encoders, loaded (unknown names and missing weights are errors)."""
    registry = load_registry(cfg.encoder_registry)
    return [load_encoder(get_entry(n, registry), offline=cfg.offline, device=device) for n in cfg.encoders]
