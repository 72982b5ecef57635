"""The KEEP encoder (Zhou et al. 2024, ``Astaxanthin/KEEP`` on Hugging Face) without its
remote code: the architecture its ``load_keep.py`` defines, built here from the folder's
``config.json``, with the weights loaded strictly (safetensors, or a plain state dict
through ``torch.load(weights_only=True)``): a timm ViT-L/16 (LayerScale 1e-5, no
classifier), a two-layer GELU projection head to ``projection_dim``, and a BERT text tower
whose pooled output is the text embedding; the tokenizer is the folder's ``vocab.txt``
(lower-cased, padded to 256 tokens)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import WeightsError

if TYPE_CHECKING:
    from .adapters import LoadedEncoder
    from .registry import EncoderEntry
    from .weights import ResolvedWeights

__all__ = ["KeepModel", "load_keep"]


class KeepModel(nn.Module):
    """KEEP's modules under KEEP's names (``visual``, ``visual_head``, ``text``,
    ``logit_scale``), so its state dict loads as it is."""

    def __init__(self, config: dict[str, Any], *, architecture: str = "vit_large_patch16_224") -> None:
        super().__init__()
        import timm
        from transformers import BertConfig, BertModel

        proj = int(config.get("projection_dim", 768))
        vision = dict(config.get("vision_config") or {})
        self.visual = timm.create_model(
            vision.get("architecture", architecture),
            pretrained=False,
            img_size=int(vision.get("img_size", 224)),
            patch_size=int(vision.get("patch_size", 16)),
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=True,
            **{k: v for k, v in vision.items() if k in ("embed_dim", "depth", "num_heads")},
        )
        self.visual_head = nn.Sequential(
            nn.Linear(int(self.visual.num_features), proj),  # type: ignore[arg-type]
            nn.GELU(),
            nn.Linear(proj, proj),
        )
        self.text = BertModel(BertConfig(**(config.get("text_config") or {})))
        self.logit_scale = nn.Parameter(torch.ones([]) * float(torch.log(torch.tensor(1 / 0.04))))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_head(self.visual(x))

    def encode_text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text(**inputs).pooler_output


def load_keep(entry: EncoderEntry, w: ResolvedWeights, device: torch.device) -> LoadedEncoder:
    """The KEEP encoder of a local folder (``config.json``, the weights, ``vocab.txt``)."""
    from transformers import BertTokenizer

    from .adapters import LoadedEncoder, _token_counter
    from .weights import load_state_dict

    folder = w.path if w.path.is_dir() else w.path.parent
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"encoder {entry.name!r}: {str(folder)!r} has no readable config.json ({exc})"
        ) from exc
    model = KeepModel(config, architecture=entry.architecture or "vit_large_patch16_224")
    try:
        model.load_state_dict(load_state_dict(w.weight_file, encoder=entry.name), strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"encoder {entry.name!r}: weights {str(w.weight_file)!r} do not fit KEEP's architecture: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if not (folder / "vocab.txt").is_file():
        raise WeightsError(f"encoder {entry.name!r}: {str(folder)!r} has no vocab.txt (KEEP's tokenizer)")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    ctx = int(entry.text.get("context_length", 256))
    model.eval().to(device)

    def text_fn(texts: Sequence[str]) -> torch.Tensor:
        enc = tok(list(texts), max_length=ctx, padding="max_length", truncation=True, return_tensors="pt")
        return model.encode_text({k: v.to(device) for k, v in enc.items()})

    scale = float(model.logit_scale.exp().item())
    return LoadedEncoder(
        entry, model, model.encode_image, text_fn, w.sha256, scale, device, _token_counter(tok), ctx
    )
