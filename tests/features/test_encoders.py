"""Encoder registry and adapters: every loading path round-trips a small random model
saved in the exact format real weights come in."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histoalign_wsi.cli import main
from histoalign_wsi.errors import EncoderError, WeightsError
from histoalign_wsi.features import (
    EncoderEntry,
    availability,
    get_entry,
    load_registry,
)
from histoalign_wsi.features.adapters import build_open_clip_from_cfg, load_encoder
from histoalign_wsi.features.encode import preprocess_on_device

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PRE = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}
TEXTS = ["a tumour", "fibrous stroma", "lymphocytes"]


def _entry(name: str, **kw: object) -> EncoderEntry:
    raw = {"kind": "open_clip", "embed_dim": 32, "preprocess": PRE} | kw
    return EncoderEntry.parse(name, raw)


def _reference(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    with torch.no_grad():
        model.eval()
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(TEXTS)), dim=-1)
    return img, txt


def _check(enc: object, model: torch.nn.Module) -> None:
    img, txt = _reference(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc.encode_image(x), img, atol=1e-5, rtol=1e-4)  # type: ignore[attr-defined]
    torch.testing.assert_close(enc.encode_text(TEXTS), txt, atol=1e-5, rtol=1e-4)  # type: ignore[attr-defined]


@pytest.fixture()
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_open_clip_from_cfg(TINY)


def test_registry_has_the_required_entries() -> None:
    reg = load_registry()
    for name in (
        "demo",
        "plip",
        "quiltnet-b32",
        "quiltnet-b16",
        "biomedclip",
        "openai-vit-b16",
        "openai-vit-b32",
        "conch",
    ):
        assert name in reg
    assert reg["plip"].weights["hf_hub"] == "vinid/plip" and reg["plip"].kind == "hf_clip"
    assert reg["quiltnet-b32"].weights["hf_hub"] == "wisdomik/QuiltNet-B-32"
    assert reg["openai-vit-b16"].weights["pretrained"] == "openai"
    assert reg["demo"].untrained and not reg["plip"].untrained


def test_unknown_encoder_lists_known_ones() -> None:
    with pytest.raises(EncoderError, match=r"unknown encoder 'nope'.*demo.*plip"):
        get_entry("nope", load_registry())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_state_dict_file(tiny_model: torch.nn.Module, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".bin":
        torch.save(tiny_model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    enc = load_encoder(_entry("mine", model_cfg=TINY, weights={"path": str(path)}))
    _check(enc, tiny_model)
    assert enc.weights_sha256 and len(enc.weights_sha256) == 64


def test_user_entry_from_registry_file(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "reg.yaml").write_text(
        json.dumps(
            {
                "mine": {
                    "kind": "open_clip",
                    "embed_dim": 32,
                    "model_cfg": TINY,
                    "preprocess": PRE,
                    "weights": {"path": "w.pt"},
                }
            }
        )
    )
    reg = load_registry(tmp_path / "reg.yaml")
    _check(load_encoder(reg["mine"]), tiny_model)


def _hub_folder(model: torch.nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": PRE}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def test_hf_hub_style_folder(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    folder = _hub_folder(tiny_model, tmp_path / "QuiltNet-tiny")
    enc = load_encoder(_entry("quilt-local", weights={"path": str(folder)}))
    _check(enc, tiny_model)


def test_hf_hub_id_resolved_from_local_cache(
    tiny_model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-quilt" / "snapshots" / ("0" * 40)
    _hub_folder(tiny_model, snap)
    (cache / "models--someone--tiny-quilt" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-quilt" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(_entry("quilt-hub", weights={"hf_hub": "hf-hub:someone/tiny-quilt"}))
    _check(enc, tiny_model)


def test_hf_clipmodel_folder(tmp_path: Path) -> None:
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": 49407,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "plip-tiny")
    enc = load_encoder(
        EncoderEntry.parse(
            "plip-tiny",
            {
                "kind": "hf_clip",
                "embed_dim": 32,
                "preprocess": PRE,
                "weights": {"path": str(tmp_path / "plip-tiny")},
            },
        )
    )
    x = torch.randn(2, 3, 64, 64)
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=77)(TEXTS)

    def pooled(out: object) -> torch.Tensor:  # transformers 5 returns an output object
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]

    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(pooled(model.get_image_features(pixel_values=x)), dim=-1)
        ref_txt = torch.nn.functional.normalize(
            pooled(model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())), dim=-1
        )
    torch.testing.assert_close(enc.encode_image(x), ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.encode_text(TEXTS), ref_txt, atol=1e-5, rtol=1e-4)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    with path.open("wb") as fh:
        pickle.dump({"weight": _Evil()}, fh)
    with pytest.raises(WeightsError, match=r"refused.*unpickling"):
        load_encoder(_entry("evil", model_cfg=TINY, weights={"path": str(path)}))


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="corrupt"):
        load_encoder(_entry("bad", model_cfg=TINY, weights={"path": str(tmp_path / "bad.safetensors")}))


def test_missing_weights_offline_names_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = load_registry()["quiltnet-b32"]
    with pytest.raises(WeightsError) as err:
        load_encoder(entry, offline=True)
    msg = str(err.value)
    assert (
        "quiltnet-b32" in msg
        and "wisdomik/QuiltNet-B-32" in msg
        and "offline" in msg
        and "weights.path" in msg
    )


def test_dimension_mismatch(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    torch.save(tiny_model.state_dict(), tmp_path / "w.bin")
    e = EncoderEntry.parse(
        "wrong",
        {
            "kind": "open_clip",
            "embed_dim": 512,
            "model_cfg": TINY,
            "preprocess": PRE,
            "weights": {"path": str(tmp_path / "w.bin")},
        },
    )
    with pytest.raises(EncoderError, match=r"embed_dim 512.*32-dimensional"):
        load_encoder(e)


def test_conch_without_package_is_a_clear_message() -> None:
    entry = load_registry()["conch"]
    assert "conch" in availability(entry)
    with pytest.raises(EncoderError, match="'conch' package"):
        load_encoder(entry)


def test_demo_is_seeded_and_untrained() -> None:
    a = load_encoder(load_registry()["demo"])
    b = load_encoder(load_registry()["demo"])
    assert a.weights_sha256 == b.weights_sha256 and a.weights_sha256.startswith("demo-untrained-")
    torch.testing.assert_close(a.encode_text(TEXTS), b.encode_text(TEXTS))
    assert a.attrs()["untrained"] is True


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_cpu_encoder_loads_without_triton() -> None:
    """In a fresh process, loading an encoder on the CPU leaves triton (a GPU compiler
    torch._dynamo would load, ~75 MB) unloaded, and the block is lifted afterwards."""
    code = (
        "import sys\n"
        "from histoalign_wsi.features import load_registry\n"
        "from histoalign_wsi.features.adapters import load_encoder\n"
        "enc = load_encoder(load_registry()['demo'], device='cpu')\n"
        "assert enc.encode_text(['tumour']).shape == (1, 64)\n"
        "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)\n"
        "import triton\n"
        "print(sys.modules['triton'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]


def test_device_preprocessing_matches_pil_transform() -> None:
    enc = load_encoder(load_registry()["demo"])
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tile = np.asarray(Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC))  # smooth content
    ref = enc.pil_transform()(Image.fromarray(tile)).unsqueeze(0)
    dev = preprocess_on_device(torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0).float(), enc)
    assert ref.shape == dev.shape == (1, 3, 224, 224)
    assert (ref - dev).abs().mean() < 0.02
    cos = torch.nn.functional.cosine_similarity(enc.encode_image(ref), enc.encode_image(dev))
    assert cos.item() > 0.999
    # at the model's own size there is no resize: the input must not be normalised in place
    # (a batch retried after running out of memory would be normalised twice)
    at_size = torch.from_numpy(tile[:224, :224]).permute(2, 0, 1).unsqueeze(0).float()
    before = at_size.clone()
    once = preprocess_on_device(at_size, enc)
    assert torch.equal(at_size, before)
    assert torch.equal(preprocess_on_device(at_size, enc), once)
    # uint8 input gives the same as float input
    u8 = preprocess_on_device(torch.from_numpy(tile[:224, :224]).permute(2, 0, 1).unsqueeze(0), enc)
    assert torch.allclose(u8, once)
    # a reused buffer (the CPU path): the same values, written into the buffer's rows
    buf = torch.full((3, 3, 224, 224), 7.0)
    batch = torch.from_numpy(np.stack([tile[:224, :224], tile[32:256, 32:256]])).permute(0, 3, 1, 2)
    fresh = preprocess_on_device(batch, enc)
    into = preprocess_on_device(batch, enc, out=buf)
    assert into.data_ptr() == buf.data_ptr() and into.shape == (2, 3, 224, 224)
    assert torch.equal(into, fresh) and torch.allclose(fresh[:1], once)
    assert torch.equal(buf[2], torch.full((3, 224, 224), 7.0))  # rows beyond the batch untouched
    # tiles needing a resize never go through the buffer
    resized = preprocess_on_device(torch.from_numpy(tile).permute(2, 0, 1).unsqueeze(0), enc, out=buf)
    assert resized.data_ptr() != buf.data_ptr() and torch.allclose(resized, dev)


def test_encoders_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["demo"]["status"].startswith("available")
    assert rows["plip"]["status"].startswith("not found; looked in: Hugging Face cache")
    assert rows["conch"]["status"].startswith("unavailable")
