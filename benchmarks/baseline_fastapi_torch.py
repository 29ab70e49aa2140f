"""A straightforward FastAPI + PyTorch eager server, as the serving benchmark's baseline.

What a team would write first: one uvicorn worker, decode + torchvision transforms + model call
per request (batch 1), in FastAPI's thread pool, on the GPU when PyTorch sees one. Same model (the
bundled EfficientNet-Lite0) and same preprocessing as backbones.
Run: python benchmarks/baseline_fastapi_torch.py --port 3001
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from models import get_entry
from models.weights import build_pretrained


def create_app() -> FastAPI:
    entry = get_entry("efficientnet_lite0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_pretrained(entry).to(device)
    labels = entry.labels()
    pre = entry.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/classify")
    def classify(image: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008 - FastAPI's idiom
        img = Image.open(io.BytesIO(image.file.read())).convert("RGB")
        with torch.inference_mode():
            logits, _ = net(transform(img).unsqueeze(0).to(device))
        probs = logits.softmax(-1)[0].cpu()
        top = probs.topk(5)
        return {
            "predictions": [
                {"index": int(i), "label": labels[int(i)], "score": float(p)}
                for p, i in zip(top.values, top.indices, strict=True)
            ]
        }

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=3001)
    args = parser.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")
