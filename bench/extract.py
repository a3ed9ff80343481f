"""Extraction speed on this CPU: stop-at-hook encoding vs the full CLIP forward, pipeline overhead.

A ViT-B/16-sized ``CLIPModel`` with random weights (``CLIPConfig()`` defaults, vision patch 16):

(a) the full ``CLIPModel`` forward with pixel values and a batch of tokenised prompts, which is
    what a forward hook on one block costs in the original code;
(b) a vision-only full forward (``get_image_features``: all 12 blocks and the projection), the
    fair baseline of a stop-at-hook encoder;
(c) ``Backbone.encode`` stopping after block 10 and after block 5;
(d) the real ``extract()`` pipeline on generated 224 px JPEG/PNG files: the share of the shard
    loop's wall time spent outside the model forward (decoding, preprocessing, writing).

Keys of the last line (one JSON object): ``speedup_vs_original_layer10`` ((a) / block 10),
``speedup_layer10``, ``speedup_layer5`` ((b) / block i), ``frac_of_ideal_layer10``,
``frac_of_ideal_layer5`` (speed-up vs (b) over the ideal 12 / (i + 1), at most about 1),
``overhead_share``, ``images_per_s``.

Run: ``python bench/extract.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from patchsae.backbones import backbone_from_hf
from patchsae.data.images import DataConfig
from patchsae.extract import ExtractConfig, extract
from timing import interleaved_times, medians

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "clip-tokenizer"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_BLOCKS = 12


def prompt_ids(n_prompts: int, vocab: int) -> dict[str, torch.Tensor]:
    """Tokenised "a photo of a {class}." prompts (random ids of that length without tokenizer)."""
    prompts = [f"a photo of a {CLASSES[i % len(CLASSES)]}." for i in range(n_prompts)]
    if TOKENIZER.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        return dict(tok(prompts, padding=True, return_tensors="pt"))
    ids = torch.randint(0, vocab, (n_prompts, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def write_images(folder: Path, n: int) -> None:
    """``n`` 224 x 224 images, alternately JPEG and PNG, smooth gradients plus noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:224, 0:224]
    for i in range(n):
        base = (xx * (i + 1) + yy * 3) % 256
        pixels = np.stack([base, base[::-1], base.T], axis=-1) + rng.integers(0, 40, (224, 224, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:04d}.{'jpg' if i % 2 else 'png'}", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-images", type=int, default=32)
    args = parser.parse_args()
    bs = args.batch_size

    torch.manual_seed(0)
    config = CLIPConfig(vision_config={"patch_size": 16})
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor()
    backbone = backbone_from_hf(model, processor, name="clip-vit-b16-random")
    pixels = torch.randn(bs, 3, 224, 224)
    text = prompt_ids(len(CLASSES), config.text_config.vocab_size)

    fns = {
        "full": lambda x: model(pixel_values=x, **text),
        "vision": lambda x: model.get_image_features(pixel_values=x),
        "block10": lambda x: backbone.encode(x, 10),
        "block5": lambda x: backbone.encode(x, 5),
    }
    with torch.inference_mode():
        for fn in fns.values():
            fn(pixels[:2])  # warm-up on 2 images
        times = interleaved_times(
            {name: lambda fn=fn: fn(pixels) for name, fn in fns.items()},
            args.repeats,
            warmup=False,
        )
    seconds = medians(times)
    full_s, vision_s = seconds["full"], seconds["vision"]
    rows = [
        ("full CLIPModel forward (+ text)", full_s, vision_s / full_s, None),
        ("vision-only full forward", vision_s, 1.0, None),
    ]
    result: dict[str, float | str] = {"bench": "extract"}
    result["speedup_vs_original_layer10"] = round(full_s / seconds["block10"], 3)
    for index in (10, 5):
        s = seconds[f"block{index}"]
        speedup = vision_s / s
        frac = speedup / (N_BLOCKS / (index + 1))
        rows.append((f"Backbone.encode, block {index}", s, speedup, frac))
        result[f"speedup_layer{index}"] = round(speedup, 3)
        result[f"frac_of_ideal_layer{index}"] = round(frac, 3)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = Path(tmp) / "model", Path(tmp) / "images"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        write_images(data_dir, args.pipeline_images)
        cfg = ExtractConfig(
            model=str(model_dir),
            data=DataConfig(source=str(data_dir)),
            layers=(10,),
            out=str(Path(tmp) / "store"),
            batch_size=bs,
            shard_images=bs * 2,
            num_workers=0,
        )
        timings: dict[str, float] = {}
        extract(cfg, timings=timings)
    loop = timings["loop"]
    overhead = (loop - timings["forward"]) / loop
    images_per_s = args.pipeline_images / loop
    result["overhead_share"] = round(overhead, 4)
    result["images_per_s"] = round(images_per_s, 3)

    print(f"\nbatch {bs}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(
        f"speed-ups against the vision-only forward; vs the original (full CLIPModel) at block "
        f"10: {result['speedup_vs_original_layer10']:.3f}"
    )
    print(f"{'what':36s} {'s/batch':>9s} {'img/s':>8s} {'speedup':>8s} {'of ideal':>9s}")
    for name, s, speedup, frac in rows:
        ideal = "" if frac is None else f"{frac:9.3f}"
        print(f"{name:36s} {s:9.3f} {bs / s:8.2f} {speedup:8.3f} {ideal}")
    print(
        f"\nextract() on {args.pipeline_images} JPEG/PNG files (block 10, fp16, no workers): "
        f"{images_per_s:.2f} img/s; loop {loop:.2f} s = forward {timings['forward']:.2f} + "
        f"load {timings['load']:.2f} + write {timings['write']:.2f} + rest "
        f"{loop - timings['forward'] - timings['load'] - timings['write']:.2f}; "
        f"outside forward {overhead:.1%}; setup {timings['setup']:.2f} s "
        f"(model load, folder hash), finalize {timings['finalize']:.2f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
