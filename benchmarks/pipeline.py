"""The pipeline's efficiency: train.py's and test.py's speed against the same work on random tensors. The bare
training step (engine.TrainingStep: forward, ArcFace loss, backward, Adam update) on tensors already on the device,
and test.py's embedding pass (its files read and decoded) against inference.embed_batch on random tensors."""
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader

from checkpoint import load_checkpoint, model_from_checkpoint
from data_utils import FaceFolder, as_hw, make_transform
from engine import TrainingStep, build_optimizer, build_schedule, deterministic_kernels
from inference import embed_batch
from losses import build_objective
from model import EmbeddingNet, select_device


def steady_speed(history):
    """The median images/s of train.py's training epochs, the first left out: it warms up (allocations, thread
    pools, cuDNN's kernel timing, DataLoader workers starting)."""
    trained = [h for h in history if h["epoch"] > 0]
    return statistics.median(h["images_per_second"] for h in trained[1:] or trained)



def bare_train_speed(model_config, image_size, batch, seconds=4.0, device="cpu", amp=False, channels_last=False,
                     compile=False, read_loss=False, num_classes=40):
    """Images/s of train.py's whole training step (engine.TrainingStep: forward, ArcFace loss in float32 over
    `num_classes` identities, backward, fused Adam update, schedule) of EmbeddingNet(**model_config) on random uint8
    images (batch, 3, *image_size) already on `device`, normalised by the step as in training, and random labels.
    With train.py's autocast (`amp`), kernels (deterministic on the CPU), memory format and compiler options; with
    `read_loss` the loss read on the CPU after each step, as train.py does (on a GPU the CPU then waits for the step
    to finish before it queues the next). Two warm-up steps (and the compilation), then steps until `seconds` have
    passed (at least three)."""
    torch.manual_seed(0)
    device, autocast, fp16_scaling = select_device(device, amp)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = EmbeddingNet(**model_config).to(device, memory_format=memory_format).train()
    objective = build_objective("arcface", embedding_dim=model_config["embedding_dim"], num_classes=num_classes)
    objective = objective.to(device)
    optimizer = build_optimizer("adam", [*model.parameters(), *objective.parameters()], lr=2e-3, weight_decay=0.0)
    # train.py's default schedule (the learning rate does not change the cost of a step)
    scheduler = build_schedule("onecycle", optimizer, steps_per_epoch=1000, epochs=1)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
    step = TrainingStep(torch.compile(model) if compile else model, objective, optimizer, scheduler, scaler, device,
                        autocast, memory_format)
    images = torch.randint(0, 256, (batch, 3, *as_hw(image_size)), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    torch.backends.cudnn.benchmark = device.startswith("cuda")  # as train.py: time the kernels for fixed shapes

    def one_step():
        loss = step((images, labels))[0]
        if read_loss:
            loss.item()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    deterministic_kernels(device)  # as train.py, for these steps only
    try:
        for _ in range(2):
            one_step()
        synchronize()
        count, started = 0, time.perf_counter()
        while count < 3 or time.perf_counter() - started < seconds:
            one_step()
            count += 1
        synchronize()  # the GPU runs behind: the time counts until its last step is done
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return count * batch / (time.perf_counter() - started)


@torch.inference_mode()
def embedding_speeds(checkpoint, data_dir, passes=2, device="cpu", amp=True, num_workers=0):
    """Images/s of test.py's embedding pass over data_dir's train/ and valid/ (its transform, FaceFolder and
    DataLoader: files read, decoded and transformed, then inference.embed_batch in batches of 64, on `device` with
    test.py's autocast; with `num_workers` DataLoader workers), and of embed_batch on random uint8 tensors of each
    batch's shape already on the device. Without workers, timed in pairs, a bare batch right after each real one,
    so that a change in the machine's load falls on both alike (unpaired runs on 2 cores move the ratio by 15-20
    points); with workers, the bare batches after the real passes. Returns test_speed, bare_test_speed, images."""
    device, autocast, _ = select_device(device, amp)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device).eval()
    transform = make_transform(state["image_size"], train=False, pixels=True)
    loaders = [DataLoader(FaceFolder(os.path.join(data_dir, part), transform), batch_size=64, num_workers=num_workers,
                          pin_memory=device.startswith("cuda")) for part in ("train", "valid")]
    noise = torch.randint(0, 256, (64, 3, *as_hw(state["image_size"])), dtype=torch.uint8, device=device)
    embed_batch(model, noise[:2], device, autocast)  # warm-up: allocations, thread pool
    real = bare = 0.0
    sizes = []
    for _ in range(passes):
        for loader in loaders:
            started = time.perf_counter()  # each real batch's time includes reading it
            for batch, _labels in loader:
                embed_batch(model, batch, device, autocast)  # (.cpu(): it waits for the device)
                sizes.append(len(batch))
                middle = time.perf_counter()
                if not num_workers:
                    embed_batch(model, noise[:len(batch)], device, autocast)
                    bare += time.perf_counter() - middle
                real += middle - started
                started = time.perf_counter()
    if num_workers:  # workers load while the main process infers: a bare batch in between would lend them its time
        started = time.perf_counter()
        for size in sizes:
            embed_batch(model, noise[:size], device, autocast)
        bare = time.perf_counter() - started
    return dict(test_speed=sum(sizes) / real, bare_test_speed=sum(sizes) / bare, images=sum(sizes))
