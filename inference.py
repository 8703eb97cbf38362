"""Embedding passes: image batches to the device, and a model's embeddings of one batch, of a loader's batches or of
image files; the network exported for other runtimes (ONNX)."""
import sys

import torch
import torch.nn.functional as F

from data_utils import UNREADABLE_IMAGE, as_hw, load_image, normalize
from files import atomic_write


def device_batch(images, device, memory_format=torch.channels_last):
    """An image batch (N, 3, H, W) on `device`, copied without waiting (from pinned memory, where the DataLoader put
    it), in `memory_format`: by default channels_last, in which every backbone here infers 1.2 to 1.7 times faster
    on the CPU (the same numbers to float rounding), and which tensor cores want on GPUs. uint8 pixels
    (make_transform's `pixels`) travel as such, a quarter of float32's bytes to collate, pin and copy, and are
    normalised on arrival."""
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return normalize(images) if images.dtype == torch.uint8 else images


@torch.inference_mode()
def embed_batch(model, images, device, autocast, flip=False):
    """Embeddings (N, D) float32 on the CPU of one image batch (N, 3, H, W), uint8 or float, through device_batch
    and `model` (a model.Embedder) under `autocast`. With `flip`, the unnormalised embeddings of each image and of
    its mirror image are added, then L2-normalised (insightface's flip test): a photo and its mirror then embed
    alike. The model's mode is the caller's (embed puts it in eval mode)."""
    images = device_batch(images, device)
    with autocast:
        if flip:
            return F.normalize(model.unnormalised(images).float() + model.unnormalised(images.flip(3)).float(),
                               dim=1).cpu()
        return model(images).float().cpu()


@torch.inference_mode()
def embed(model, loader, device, autocast, flip=False):
    """(embeddings (N, D) float32 on the CPU, labels (N,)) of every (image, label) batch of `loader`, with
    embed_batch's `flip`."""
    model.eval()
    embeddings, labels = [], []
    for images, y in loader:
        embeddings.append(embed_batch(model, images, device, autocast, flip))
        labels.append(torch.as_tensor(y))
    return torch.cat(embeddings), torch.cat(labels)


def embed_files(model, paths, transform, device, autocast, batch_size=64, flip=False):
    """(embeddings (M, D) float32 on the CPU, or None when M = 0; the indices into `paths` of those M files) of
    image files given by path. A file that cannot be read as an image gets a one-line error on stderr and is
    left out; the others are embedded in batches."""
    embeddings, kept = [], []
    for start in range(0, len(paths), batch_size):
        images, indices = [], []
        for i, path in enumerate(paths[start:start + batch_size], start):
            try:
                images.append(transform(load_image(path)))
                indices.append(i)
            except UNREADABLE_IMAGE as err:
                print(f"error: {path}: cannot be read as an image ({err})", file=sys.stderr)
        if images:
            embeddings.append(embed(model, [(torch.stack(images), torch.tensor(indices))], device, autocast,
                                    flip)[0])
            kept += indices
    return (torch.cat(embeddings) if embeddings else None), kept


def export_onnx(model, image_size, path):
    """Write `model` (on the CPU, in eval mode) as ONNX through torch's exporter, batch size dynamic: input
    'images' (N, 3, H, W) normalised as make_transform does, output 'embeddings' (N, D), L2-normalised."""
    example = torch.zeros(2, 3, *as_hw(image_size))  # 2, not 1: a batch of 1 would be specialised as a constant
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                output_names=["embeddings"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))  # one file, weights inside
