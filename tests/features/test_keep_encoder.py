"""The KEEP loader, tested as every loader is: a small random model saved in KEEP's
folder format (config.json, the weights, vocab.txt) and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from histoalign_wsi.errors import WeightsError
from histoalign_wsi.features.adapters import load_encoder
from histoalign_wsi.features.keep_model import KeepModel
from histoalign_wsi.features.registry import EncoderEntry, load_registry

CONFIG = {
    "projection_dim": 32,
    "vision_config": {
        "architecture": "vit_base_patch16_224",
        "img_size": 64,
        "embed_dim": 48,
        "depth": 1,
        "num_heads": 2,
    },
    "text_config": {
        "vocab_size": 40,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "tumour",
    "stroma",
    "normal",
    "tissue",
    "carcinoma",
    ".",
]


def _folder(tmp: Path, suffix: str) -> tuple[Path, KeepModel]:
    torch.manual_seed(0)
    model = KeepModel(CONFIG).eval()
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    (tmp / "vocab.txt").write_text("\n".join(WORDS + [f"w{i}" for i in range(40 - len(WORDS))]) + "\n")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp / "model.safetensors"))
    else:
        torch.save(sd, tmp / "pytorch_model.bin")
    return tmp, model


def _entry(folder: Path) -> EncoderEntry:
    keep = load_registry()["keep"]
    raw = {
        "kind": "keep",
        "embed_dim": 32,
        "weights": {"path": str(folder)},
        "preprocess": {
            "size": 64,
            "mean": list(keep.preprocess.mean),
            "std": list(keep.preprocess.std),
            "interpolation": "bicubic",
        },
        "text": {"tokenizer": "bert", "context_length": 16},
    }
    return EncoderEntry.parse("keep-small", raw)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_a_keep_folder_loads_back_with_its_weights(tmp_path: Path, suffix: str) -> None:
    folder, model = _folder(tmp_path / suffix, suffix)
    enc = load_encoder(_entry(folder))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    torch.testing.assert_close(enc.encode_image(x), want, atol=1e-5, rtol=1e-5)
    t = enc.encode_text(["normal tissue.", "carcinoma."])
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert enc.attrs()["space"]["dim"] == 32 and len(enc.weights_sha256) == 64
    assert enc.logit_scale == pytest.approx(25.0, rel=1e-4)


def test_a_keep_folder_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path / "k", "safetensors")
    cfg = dict(CONFIG) | {"projection_dim": 16}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="do not fit KEEP's architecture"):
        load_encoder(_entry(folder))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "vocab.txt").unlink()
    with pytest.raises(WeightsError, match=r"no vocab\.txt"):
        load_encoder(_entry(folder))


def test_the_registry_has_keep() -> None:
    keep = load_registry()["keep"]
    assert keep.kind == "keep" and keep.weights["hf_hub"] == "Astaxanthin/KEEP" and keep.embed_dim == 768
