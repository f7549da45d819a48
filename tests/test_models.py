"""Model specs, loading (tiny local open_clip configs + real checkpoints), the offline error,
devices and OOM back-off, and multi-model inference against open_clip's own preprocessing."""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from curate.errors import CurateError, UsageError
from curate.models import loader
from curate.models.loader import load_model, load_models, load_state_dict_file
from curate.models.specs import ALIASES, CONFIG_DIR, ensure_configs_registered, parse_spec, parse_specs
from curate.score.decode import decode_image
from curate.score.device import (AdaptiveBatchSize, autocast, autocast_dtype, partition_shards, precision_name,
                                 resolve_device, worker_devices)
from curate.score.infer import MultiScorer
from curate.score.preprocess import make_loader, stock_preprocess

torch.set_num_threads(1)
ensure_configs_registered()
NO_CUDA = not torch.cuda.is_available()


def _new_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(arch).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    tiny = _new_model("curate-tiny-vit", 0)
    torch.save(tiny.state_dict(), d / "tiny.pt")
    tiny96 = _new_model("curate-tiny-vit-96", 1)
    torch.save(tiny96.state_dict(), d / "tiny96.pt")
    return dict(dir=d, tiny=d / "tiny.pt", tiny_model=tiny, tiny96=d / "tiny96.pt", tiny96_model=tiny96)


def _jpeg(w, h, seed=0, fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt, quality=92)
    return buf.getvalue()


# ---- specs ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind,arch,tag,name", [
    ("ViT-L-14:datacomp_xl_s13b_b90k", "open_clip", "ViT-L-14", "datacomp_xl_s13b_b90k", "vit-l-14-datacomp_xl_s13b_b90k"),
    ("ViT-B-32:openai", "open_clip", "ViT-B-32-quickgelu", "openai", "vit-b-32-openai"),
    ("ViT-H-14-quickgelu:dfn5b", "open_clip", "ViT-H-14-quickgelu", "dfn5b", "vit-h-14-dfn5b"),
    ("ViT-H-14-378-quickgelu:dfn5b", "open_clip", "ViT-H-14-378-quickgelu", "dfn5b", "vit-h-14-378-dfn5b"),
    ("ViT-L-14-quickgelu:dfn2b", "open_clip", "ViT-L-14-quickgelu", "dfn2b", "vit-l-14-dfn2b"),
    ("ViT-B-16-quickgelu:dfn2b", "open_clip", "ViT-B-16-quickgelu", "dfn2b", "vit-b-16-dfn2b"),
    ("ViT-L-14:dfn2b_s39b", "open_clip", "ViT-L-14", "dfn2b_s39b", "vit-l-14-dfn2b_s39b"),
    ("vit-b/32:OpenAI", "open_clip", "ViT-B-32-quickgelu", "openai", "vit-b-32-openai"),
    ("dfn", "open_clip", "ViT-L-14-quickgelu", "dfn2b", "vit-l-14-dfn2b"),
    ("dfn5b-378", "open_clip", "ViT-H-14-378-quickgelu", "dfn5b", "vit-h-14-378-dfn5b"),
    ("l14", "open_clip", "ViT-L-14-quickgelu", "openai", "vit-l-14-openai"),
    ("b32", "open_clip", "ViT-B-32-quickgelu", "openai", "vit-b-32-openai"),
    ("hf-hub:apple/DFN2B-CLIP-ViT-L-14", "hf_hub", None, None, "apple-dfn2b-clip-vit-l-14"),
    ("hf-hub:apple/DFN5B-CLIP-ViT-H-14", "hf_hub", None, None, "apple-dfn5b-clip-vit-h-14"),
    ("hf-hub:apple/DFN-public", "hf_hub", None, None, "apple-dfn-public"),
])
def test_parse_spec_kinds(text, kind, arch, tag, name):
    s = parse_spec(text)
    assert (s.kind, s.arch, s.pretrained, s.name) == (kind, arch, tag, name)
    again = parse_spec(s.canonical)  # canonical strings parse back to the same model
    assert (again.kind, again.arch, again.pretrained, again.hub_id, again.name, again.force_quick_gelu) == \
        (s.kind, s.arch, s.pretrained, s.hub_id, s.name, s.force_quick_gelu)


def test_quickgelu_pinned_both_ways_with_a_note():
    s = parse_spec("ViT-L-14:dfn2b")
    assert s.arch == "ViT-L-14-quickgelu" and "QuickGELU" in s.notes[0]
    s = parse_spec("ViT-H-14-378:dfn5b")
    assert s.arch == "ViT-H-14-378-quickgelu"
    s = parse_spec("ViT-L-14-quickgelu:dfn2b_s39b")  # GELU weights asked for with QuickGELU
    assert s.arch == "ViT-L-14" and s.notes
    # hub repos open_clip knows to be QuickGELU are forced even if a config forgot it
    assert parse_spec("hf-hub:apple/DFN2B-CLIP-ViT-L-14").force_quick_gelu
    assert parse_spec("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378").force_quick_gelu
    assert not parse_spec("hf-hub:apple/DFN2B-CLIP-ViT-L-14-39B").force_quick_gelu


def test_every_open_clip_pretrained_pair_resolves_to_matching_activation():
    from open_clip.pretrained import get_pretrained_cfg

    for arch, tag in open_clip.list_pretrained():
        s = parse_spec(f"{arch}:{tag}")
        own = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
        tag_qg = bool(get_pretrained_cfg(arch, tag).get("quick_gelu", own))
        model_qg = bool((open_clip.get_model_config(s.arch) or {}).get("quick_gelu", False)) or s.force_quick_gelu
        assert model_qg == tag_qg, (arch, tag, s.arch)
        assert (s.arch, s.pretrained) in set(open_clip.list_pretrained()) or s.force_quick_gelu


def test_aliases_resolve_to_pairs_open_clip_ships():
    pairs = set(open_clip.list_pretrained())
    for alias, target in ALIASES.items():
        s = parse_spec(alias)
        if s.kind == "open_clip":
            assert (s.arch, s.pretrained) in pairs and not s.force_quick_gelu, alias
        assert s.name == s.default_name and parse_spec(s.canonical).name == s.name


@pytest.mark.parametrize("text,needle", [
    ("ViT-Q-99:openai", "unknown open_clip architecture"),
    ("ViT-L-14:nope", "unknown pretrained tag"),
    ("ViT-L-14", "needs weights"),
    ("nonsense-model", "cannot resolve"),
    ("b32,name=Has Space", "not file-name safe"),
    ("b32,colour=red", "bad model option"),
    ("b32,resize_mode=stretch", "resize_mode must be one of"),
    ("b32,mean=1:2", "three numbers"),
    ("/nonexistent/ckpt.pt", "does not exist"),
    ("ViT-B-32@/nonexistent/ckpt.pt", "does not exist"),
    ("some/config.json", "needs weights"),
    ("hf-hub:notarepo", "bad hub name"),
    ("ViT-B-32:openai,quick_gelu=false", "quick_gelu= applies to local checkpoints"),
])
def test_parse_spec_errors_are_one_clear_line(text, needle):
    with pytest.raises(UsageError) as e:
        parse_spec(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_options_and_name(ckpts):
    s = parse_spec("b32,name=my-b32,resize_mode=squash,interpolation=bilinear,mean=0.5:0.5:0.5,std=0.5")
    assert s.name == "my-b32" and s.preprocess_overrides == dict(
        resize_mode="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert parse_spec(s.canonical).preprocess == s.preprocess
    with pytest.raises(UsageError, match="two --model specs"):
        parse_specs(["b32", "ViT-B-32:openai"])
    with pytest.raises(UsageError, match="single --model"):
        parse_specs(["b32", "l14"], name="x")
    s = parse_spec(str(ckpts["tiny"]), arch="curate-tiny-vit")
    assert s.kind == "checkpoint" and s.arch == "curate-tiny-vit" and s.name == "curate-tiny-vit-tiny"
    with pytest.raises(UsageError, match="needs an architecture"):
        parse_spec(str(ckpts["tiny"]))


def test_open_clip_train_layout_params_txt(ckpts, tmp_path):
    run = tmp_path / "logs" / "run-7"
    (run / "checkpoints").mkdir(parents=True)
    sd = ckpts["tiny_model"].state_dict()
    torch.save({"epoch": 2, "name": "run-7", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}, run / "checkpoints" / "epoch_2.pt")
    (run / "params.txt").write_text("batch_size: 64\nforce_quick_gelu: True\nmodel: curate-tiny-vit\n")
    s = parse_spec(str(run / "checkpoints" / "epoch_2.pt"))  # arch from params.txt
    assert s.arch == "curate-tiny-vit-quickgelu" and s.name == "curate-tiny-vit-run-7-epoch_2"
    assert any("params.txt" in n for n in s.notes)
    s2 = parse_spec(f"curate-tiny-vit@{run / 'checkpoints' / 'epoch_2.pt'}")  # pinned to the trained activation
    assert s2.arch == "curate-tiny-vit-quickgelu"
    lm = load_model(s2)
    assert lm.describe()["quick_gelu"] is True


# ---- loading ----------------------------------------------------------------------------

def test_tiny_checkpoint_loads_and_embeds(ckpts):
    lm = load_model(f"curate-tiny-vit@{ckpts['tiny']}")
    assert lm.embed_dim == 64 and lm.image_size == (64, 64) and lm.context_length == 77
    assert lm.preprocess.resize_mode == "shortest" and lm.weights == str(ckpts["tiny"])
    assert not lm.model.training and lm.describe()["quick_gelu"] is False
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        ours = lm.model.encode_image(x)
        ref = ckpts["tiny_model"].encode_image(x)
        t = lm.model.encode_text(lm.tokenizer(["a cat", "a dog", ""]))
    assert torch.allclose(ours, ref) and t.shape == (3, 64)


def test_train_style_and_safetensors_checkpoints(ckpts, tmp_path):
    from safetensors.torch import save_file

    sd = ckpts["tiny_model"].state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "e1.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 64, 64)
    for p in ("e1.pt", "w.safetensors"):
        lm = load_model(f"curate-tiny-vit@{tmp_path / p}")
        with torch.inference_mode():
            assert torch.allclose(lm.model.encode_image(x), ckpts["tiny_model"].encode_image(x)), p
    assert set(load_state_dict_file(tmp_path / "e1.pt")) == set(sd)


def test_checkpoint_refusals(ckpts, tmp_path):
    with pytest.raises(UsageError, match="does not fit curate-tiny-vit-96"):
        load_model(f"curate-tiny-vit-96@{ckpts['tiny']}")
    torch.save({"state_dict": ckpts["tiny_model"].state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "p.pt")
    with pytest.raises(UsageError, match="weights_only=True"):
        load_model(f"curate-tiny-vit@{tmp_path / 'p.pt'}")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(UsageError, match="state dict"):
        load_model(f"curate-tiny-vit@{tmp_path / 'empty.pt'}")


def test_custom_config_json_with_checkpoint(tmp_path):
    cfg = json.loads((CONFIG_DIR / "curate-tiny-vit.json").read_text())
    cfg["embed_dim"] = 32
    (tmp_path / "my.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"resize_mode": "squash"}}))
    torch.manual_seed(3)
    model = open_clip.CLIP(**cfg).eval()
    torch.save(model.state_dict(), tmp_path / "my.pt")
    lm = load_model(f"{tmp_path / 'my.json'}@{tmp_path / 'my.pt'}")
    assert lm.embed_dim == 32 and lm.preprocess.resize_mode == "squash" and lm.name == "my-my"
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(lm.model.encode_image(x), model.encode_image(x))
    # spec preprocess options override the config's
    lm2 = load_model(f"{tmp_path / 'my.json'}@{tmp_path / 'my.pt'},resize_mode=longest,name=m2")
    assert lm2.preprocess.resize_mode == "longest"


def _fake_hub_cache(root, repo: str, cfg: dict, sd: dict, pp: dict | None = None):
    """The Hugging Face cache layout hf_hub_download itself writes: refs/main → snapshots/<rev>/."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp or {}}))
    torch.save(sd, snap / "open_clip_pytorch_model.bin")


def test_cached_hub_model_loads_without_network(ckpts, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(loader, "_probe_cache", {})
    cfg = json.loads((CONFIG_DIR / "curate-tiny-vit-quickgelu.json").read_text())
    qg = _new_model("curate-tiny-vit-quickgelu", 5)
    _fake_hub_cache(tmp_path, "curate-test/tiny-clip", cfg, qg.state_dict(), {"resize_mode": "squash"})
    before = constants.HF_HUB_OFFLINE
    t0 = time.perf_counter()
    lm = load_model("hf-hub:curate-test/tiny-clip", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    assert constants.HF_HUB_OFFLINE == before and os.environ.get("HF_HUB_OFFLINE") == (
        None if not before else os.environ.get("HF_HUB_OFFLINE"))
    assert lm.preprocess.resize_mode == "squash" and lm.describe()["quick_gelu"] is True
    assert lm.weights.endswith("open_clip_pytorch_model.bin")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(lm.model.encode_image(x), qg.encode_image(x))
    # the same files as an open_clip local directory
    snap = next((tmp_path / "models--curate-test--tiny-clip" / "snapshots").iterdir())
    ld = load_model(f"local-dir:{snap}")
    assert ld.spec.kind == "local_dir" and ld.preprocess.resize_mode == "squash"
    with torch.inference_mode():
        assert torch.allclose(ld.model.encode_image(x), qg.encode_image(x))


def _assert_offline_error(e, where: str, hint: str):
    msg = str(e.value)
    assert "\n" not in msg and "not in the cache" in msg and where in msg and hint in msg, msg


def test_offline_error_for_real_pretrained_name_is_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_probe_cache", {})
    if loader.hub_reachable(timeout=2):
        pytest.skip("the hub is reachable here; this test is about machines without network")
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as e:
        load_model("ViT-B-32:openai", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 8
    _assert_offline_error(e, str(tmp_path), "create_model('ViT-B-32-quickgelu', pretrained='openai')")


def test_offline_error_with_hf_hub_offline_and_dead_endpoint(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as e:
        load_models([parse_spec("dfn")], cache_dir=tmp_path)
    _assert_offline_error(e, "HF_HUB_OFFLINE", "pretrained='dfn2b'")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(loader, "_probe_cache", {})
    with pytest.raises(UsageError) as e:
        load_model("hf-hub:apple/DFN2B-CLIP-ViT-L-14", cache_dir=tmp_path)
    _assert_offline_error(e, "127.0.0.1:9", "hf download apple/DFN2B-CLIP-ViT-L-14")
    assert time.perf_counter() - t0 < 8


# ---- devices ----------------------------------------------------------------------------

def test_device_parsing():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu")) is None and precision_name(torch.device("cpu")) == "fp32"
    with autocast(torch.device("cpu")):
        pass
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(UsageError):
            resolve_device(bad)
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu") and worker_devices("auto") == [torch.device("cpu")]
        for asked in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(UsageError, match="no CUDA GPU"):
                resolve_device(asked)


def test_adaptive_batch_size_halves_retries_and_remembers():
    seen, cleared = [], []

    def fn(a, b):
        if b - a > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append((a, b))
        return list(range(a, b))

    bs = AdaptiveBatchSize(16, on_oom=lambda: cleared.append(1))
    out = bs.map(fn, 23)
    assert sum(out, []) == list(range(23))               # every row once, in order
    assert bs.size == 4 and bs.backoffs == [16, 8] and len(cleared) == 2
    assert seen[0] == (0, 4)                              # the failed rows were retried
    seen.clear()
    bs.map(fn, 9)
    assert seen == [(0, 4), (4, 8), (8, 9)] and bs.backoffs == [16, 8]   # no new OOMs
    bs2 = AdaptiveBatchSize(4, minimum=2)
    with pytest.raises(CurateError, match="even at batch size 2"):
        bs2.map(lambda a, b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), 10)
    other = AdaptiveBatchSize(8, oom_types=(MemoryError,))
    with pytest.raises(ValueError):                       # non-OOM errors pass through untouched
        other.map(lambda a, b: (_ for _ in ()).throw(ValueError("bug")), 3)


def test_partition_shards():
    ids = list(range(10, 0, -1))
    parts = partition_shards(ids, 3)
    assert parts == [[1, 4, 7, 10], [2, 5, 8], [3, 6, 9]]
    weights = [100, 1, 1, 1, 50, 50, 1, 1, 1, 1]
    parts = partition_shards(ids, 2, weights)
    flat = sorted(sum(parts, []))
    assert flat == sorted(ids) and not set(parts[0]) & set(parts[1])
    loads = [sum(w for i, w in zip(ids, weights) if i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 100
    assert partition_shards([], 4) == [[], [], [], []]
    with pytest.raises(ValueError):
        partition_shards([1, 1], 2)


# ---- inference --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(ckpts):
    a = load_model(f"curate-tiny-vit@{ckpts['tiny']}")
    b = load_model(f"curate-tiny-vit-96@{ckpts['tiny96']},name=t96,resize_mode=squash")
    return a, b


def _samples():
    sizes = [(160, 120), (90, 130), (200, 200), (300, 100)]
    s = [(f"k{i}", _jpeg(w, h, i), f"caption number {i}") for i, (w, h) in enumerate(sizes)]
    s.insert(2, ("bad", b"GIF89a-not-really", "a broken image"))
    s.append(("png", _jpeg(70, 50, 9, "PNG"), None))
    return s


def _reference_scores(m, samples, flip=False):
    """open_clip's own path: stock transform per image, encode, normalise, cosine."""
    out = []
    with torch.inference_mode():
        for _, data, cap in samples:
            d = decode_image(data)
            t = torch.nn.functional.normalize(m.model.encode_text(m.tokenizer([cap or ""])), dim=-1)
            if not d.ok:
                out.append(np.nan)
                continue
            img = d.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else d.image
            e = torch.nn.functional.normalize(m.model.encode_image(stock_preprocess(img, m.preprocess)[None]), dim=-1)
            out.append(float((e * t).sum()))
    return np.array(out)


@pytest.mark.parametrize("backend,atol", [("pil", 1e-5), ("torch", 2e-3)])
def test_multiscorer_matches_stock_open_clip(two_models, backend, atol):
    a, b = two_models
    scorer = MultiScorer([a, b], flip=True)
    assert len(scorer.geometries) == 2 and len(scorer.tokenizers) == 1
    samples = _samples()
    outs = [scorer.score(batch) for batch in make_loader(samples, scorer.collator(resize_backend=backend), batch_size=4)]
    for m in (a, b):
        score = np.concatenate([o[m.name].score for o in outs])
        img = np.concatenate([o[m.name].img for o in outs])
        txt = np.concatenate([o[m.name].txt for o in outs])
        assert img.dtype == np.float16 and txt.dtype == np.float16 and score.dtype == np.float32
        ref = _reference_scores(m, samples)
        assert np.isnan(score[2]) and np.isnan(img[2]).all() and np.isfinite(txt[2]).all()
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(score[ok], ref[ok], atol=atol)
        np.testing.assert_allclose(np.linalg.norm(img[ok].astype(np.float32), axis=1), 1, atol=2e-3)
        if m is b:  # squash geometry: flipping pixels == preprocessing the flipped image exactly
            flip = np.concatenate([o[m.name].score_flip for o in outs])
            np.testing.assert_allclose(flip[ok], _reference_scores(m, samples, flip=True)[ok], atol=atol)


def test_multiscorer_oom_backoff_gives_identical_results(two_models):
    a, _ = two_models
    samples = [(f"k{i}", _jpeg(100 + 7 * i, 90, i), f"c{i}") for i in range(7)]
    batch = make_loader(samples, MultiScorer([a]).collator(), batch_size=7).__iter__().__next__()
    expected = MultiScorer([a], chunk_size=64).score(batch)[a.name]

    def too_big(module, args):
        if args[0].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by a forward hook)")

    scorer = MultiScorer([a], chunk_size=8)
    handle = a.model.visual.register_forward_pre_hook(too_big)
    try:
        got = scorer.score(batch)[a.name]
    finally:
        handle.remove()
    assert scorer.sizers[a.name].size == 1 and scorer.sizers[a.name].backoffs == [7, 3]  # 7 → 3 → 1
    np.testing.assert_allclose(got.score, expected.score, atol=1e-6)
    np.testing.assert_allclose(got.img.astype(np.float32), expected.img.astype(np.float32), atol=1e-3)
