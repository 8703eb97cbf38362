"""The embedding speed of face networks (students) against dlib's descriptor on the same photos, on the CPU."""
import contextlib
import os
import time

import torch

from benchmarks.publish import Table, cell
from data_utils import FaceFolder, make_transform
from inference import embed_batch
from pretrained import load_face_network


def student_table(specs, folder, batches=4, batch=32):
    """The student_speed table: each network of `specs` and dlib's descriptor embedding the same first
    batches x batch photos of `folder` (identity folders of aligned faces), each photo decoded and resized for each
    network beforehand, timed batch by batch in alternation."""
    faces = FaceFolder(folder)
    count = min(len(faces), batches * batch)
    networks = {spec: load_face_network(spec) for spec in ["dlib", *specs]}
    inputs = {spec: torch.stack([make_transform(state["image_size"], train=False, pixels=True)(faces.read(i))
                                 for i in range(count)]) for spec, (_, state) in networks.items()}
    seconds = dict.fromkeys(networks, 0.0)
    for start in range(0, count, batch):
        for spec, (model, _) in networks.items():
            started = time.perf_counter()
            embed_batch(model, inputs[spec][start:start + batch], "cpu", contextlib.nullcontext())
            seconds[spec] += time.perf_counter() - started
    rows = [[state.get("network", spec), "x".join(map(str, state["image_size"])), cell(1000 * seconds[spec] / count,
             "", 1), cell(count / seconds[spec]), cell(seconds["dlib"] / seconds[spec], " x", 1)]
            for spec, (_, state) in networks.items()]
    title = (f"Embedding {count} aligned photos of {folder} on {os.cpu_count()} CPU cores (torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads), batches of {batch}, decoding excluded")
    return Table("student_speed", title, ["network", "input", "ms/photo", "photos/s", "faster than dlib"], rows)
