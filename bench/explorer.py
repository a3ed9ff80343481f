"""Explorer speed on this CPU: start-up, click and latent-switch latency, cost of encoding.

Setup: a ViT-B/16-sized CLIP (``CLIPConfig()`` vision defaults, random weights, a small text
tower) saved to a folder, a ReLU SAE with 49,152 latents on block 10 (encoder bias set so that
each latent fires on ~1% of the tokens, ~490 active per token), and an atlas of it
computed by ``patchsae stats`` over ``--images`` generated pictures (the array sizes of a
49,152-latent atlas; the number of images only changes the thumbnails).

- ``startup_s``: wall time from starting ``python -m patchsae explore --atlas ...`` to the first
  answer of ``/api/info`` (imports, atlas, SAE and backbone loading included);
- ``click_ms_p95``: after one upload is encoded, the 95th percentile latency over HTTP of
  ``--clicks`` patch clicks and as many latent switches (``/api/latent`` with the mask on the
  upload), interleaved; ``click_ms_p50``, ``switch_ms_p95``, ``thumb_ms_p95`` (a reference
  thumbnail with its mask) are printed too;
- ``encode_vs_bare``: ``Explorer.encode`` of a 640x480 JPEG upload (decoding, preprocessing,
  forward, SAE, image-level activations, sparse codes, display copy) / the bare
  ``Backbone.encode`` to block 10 + ``SAE.encode`` on the same image with the same model objects
  (preprocessing included): the median over interleaved rounds of the per-round ratio.

Run: ``python bench/explorer.py``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from patchsae.backbones import load_backbone
from patchsae.data import DataConfig
from patchsae.explore.core import open_model
from patchsae.explore.explorer import Explorer
from patchsae.sae import SAEConfig, make_sae, save
from patchsae.stats import StatsConfig, compute_stats
from timing import interleaved_times, medians

D_SAE = 49_152
LAYER = 10


def write_images(folder: Path, n: int) -> None:
    """``n`` 320x240 pictures in two class folders: smooth gradients plus noise."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:240, 0:320]
        base = np.stack([xx * 0.7, yy, (xx + yy) * 0.4], -1) * (i + 1) / n
        noise = rng.integers(0, 40, size=(240, 320, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(sub / f"{i}.png")


def upload_bytes() -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=90
    )
    return buffer.getvalue()


def build(root: Path, n_images: int) -> Path:
    """Model folder, SAE and atlas under ``root``; returns the atlas folder."""
    cfg = CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
        vision_config={"patch_size": 16},
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root / "model")
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(root / "model")
    write_images(root / "images", n_images)
    sae = make_sae(SAEConfig(arch="relu", d_in=768, d_sae=D_SAE))
    pictures = [Image.open(p).convert("RGB") for p in sorted((root / "images").rglob("*.png"))]
    upload = Image.open(io.BytesIO(upload_bytes())).convert("RGB")
    calibrate_sparsity(sae, load_backbone(root / "model"), [pictures[0], upload])
    save(sae, root / "sae")
    compute_stats(
        StatsConfig(
            sae=str(root / "sae"),
            out=str(root / "atlas"),
            model=str(root / "model"),
            data=DataConfig(str(root / "images")),
            layer=LAYER,
            batch_images=8,
        )
    )
    return root / "atlas"


@torch.no_grad()
def calibrate_sparsity(sae, backbone, pictures: list[Image.Image], fire: float = 0.01) -> None:
    """Set ``b_enc`` so each latent fires on about ``fire`` of the tokens of ``pictures`` (about
    490 active latents per token, like a trained PatchSAE), not half of them as a randomly
    initialised SAE would."""
    acts = backbone.encode(backbone.preprocess(pictures), LAYER).reshape(-1, 768)
    pre = sae.pre_acts(acts)
    sae.b_enc.sub_(torch.quantile(pre, 1 - fire, dim=0))


def get(url: str, data: bytes | None = None) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=120) as answer:
        body = answer.read()
    return time.perf_counter() - start, body


def start_server(atlas: Path, port: int) -> tuple[subprocess.Popen, float]:
    """Start ``patchsae explore``; returns the process and the seconds until /api/info answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchsae", "explore", "--atlas", str(atlas), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    while True:
        try:
            get(f"http://127.0.0.1:{port}/api/info")
            return proc, time.perf_counter() - start
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("patchsae explore exited during start-up") from None
            time.sleep(0.05)


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images in the atlas")
    parser.add_argument("--clicks", type=int, default=60, help="clicks (and latent switches)")
    parser.add_argument("--repeats", type=int, default=11, help="encode timing rounds")
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = upload_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        atlas = build(Path(tmp), args.images)

        proc, startup_s = start_server(atlas, args.port)
        try:
            url = f"http://127.0.0.1:{args.port}"
            encode_s, body = get(f"{url}/api/encode", data)
            answer = json.loads(body)
            session = answer["session"]
            left, top, right, bottom = answer["box"]
            rng = np.random.default_rng(0)
            clicks, switches, thumbs = [], [], []
            latents = [e["latent"] for e in answer["top"]["base"]] or [0]
            dataset = json.loads(get(f"{url}/api/info")[1])["models"][0]["datasets"][0]
            for i in range(args.clicks):
                fx, fy = rng.uniform(left, right), rng.uniform(top, bottom)
                clicks.append(get(f"{url}/api/click?session={session}&x={fx}&y={fy}")[0])
                j = latents[i % len(latents)]
                seconds, view = get(f"{url}/api/latent/{j}?session={session}")
                switches.append(seconds)
                refs = json.loads(view)["models"][0]["datasets"][0]["references"]
                if refs:
                    slot = refs[i % len(refs)]["slot"]
                    thumbs.append(get(f"{url}/api/thumb/base/{dataset}/{j}/{slot}?mask=heat")[0])
        finally:
            proc.terminate()
            proc.wait(30)

        model = open_model(atlas)
        explorer = Explorer([model])
        backbone, sae = model.backbone, model.sae  # the same weights in memory
        image = Image.open(io.BytesIO(data)).convert("RGB")

        def bare() -> None:
            with torch.no_grad():
                sae.encode(backbone.encode(backbone.preprocess([image]), LAYER)[0])

        times = interleaved_times(
            {"bare": bare, "explorer": lambda: explorer.encode(data)}, args.repeats
        )
        codes = explorer.sessions.get(explorer.encode(data)["session"]).codes["base"]
        active = len(codes.val) / codes.shape[0]
    seconds = medians(times)
    ratios = np.asarray(times["explorer"]) / np.asarray(times["bare"])
    encode_vs_bare = float(np.median(ratios))  # per round: robust to load changing between rounds
    both = clicks + switches
    result = {
        "bench": "explorer",
        "startup_s": round(startup_s, 3),
        "click_ms_p95": round(p(both, 95), 2),
        "click_ms_p50": round(p(clicks, 50), 2),
        "patch_click_ms_p95": round(p(clicks, 95), 2),
        "switch_ms_p95": round(p(switches, 95), 2),
        "thumb_ms_p95": round(p(thumbs, 95), 2) if thumbs else None,
        "encode_vs_bare": round(encode_vs_bare, 3),
        "encode_ms": round(seconds["explorer"] * 1000, 1),
        "bare_ms": round(seconds["bare"] * 1000, 1),
        "first_encode_http_ms": round(encode_s * 1000, 1),
        "d_sae": D_SAE,
        "active_per_token": round(active, 1),
        "threads": torch.get_num_threads(),
    }
    print(f"\n{D_SAE}-latent atlas of {args.images} images, CLIP ViT-B/16 shape, block {LAYER}")
    print(f"{'what':44s} {'value':>10s}")
    print(f"{'start-up to first /api/info (s)':44s} {startup_s:10.2f}")
    print(f"{'patch click p50 / p95 (ms)':44s} {p(clicks, 50):5.1f} / {p(clicks, 95):5.1f}")
    print(
        f"{'latent switch with mask p50 / p95 (ms)':44s} "
        f"{p(switches, 50):5.1f} / {p(switches, 95):5.1f}"
    )
    if thumbs:
        print(f"{'reference thumbnail with mask p95 (ms)':44s} {p(thumbs, 95):10.1f}")
    print(f"{'click or switch p95 (ms)':44s} {p(both, 95):10.1f}")
    print(f"{'Explorer.encode (ms)':44s} {seconds['explorer'] * 1000:10.1f}")
    print(f"{'bare preprocess + forward + SAE encode (ms)':44s} {seconds['bare'] * 1000:10.1f}")
    print(f"{'encode / bare':44s} {encode_vs_bare:10.3f}")
    print(f"{'active latents per token of the upload':44s} {active:10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
