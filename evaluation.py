"""Embedding passes, identification by class centroids, and the figures of training and evaluation."""
import numpy as np
import torch
import torch.nn.functional as F

from data_utils import save_figure


@torch.inference_mode()
def embed(model, loader, device, autocast):
    """(embeddings (N, D) float32 on the CPU, labels (N,)) of every (image, label) batch of `loader`."""
    model.eval()
    embeddings, labels = [], []
    for images, y in loader:
        with autocast:
            embeddings.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embeddings), torch.cat(labels)


def class_centroids(embeddings, labels, num_classes):
    """(num_classes, D): per class, the mean of its L2-normalised embeddings, normalised again.
    A class without embeddings gets a zero row (cosine similarity 0 to everything)."""
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1]).index_add_(0, torch.as_tensor(labels), unit)
    return F.normalize(sums, dim=1)


def identify(probes, centroids):
    """(predicted class, cosine similarity) per probe: the centroid most similar to it. One matrix product."""
    scores, predicted = (F.normalize(probes.float(), dim=1) @ centroids.T).max(dim=1)
    return predicted, scores


def relabel(labels, classes, target_classes):
    """`labels` (indices into `classes`) as indices into `target_classes`, -1 where the name is absent."""
    index = {name: i for i, name in enumerate(target_classes)}
    lookup = torch.tensor([index.get(name, -1) for name in classes])
    return lookup[torch.as_tensor(labels)]


def identification_accuracy(gallery, gallery_labels, gallery_classes, probes, probe_labels, probe_classes):
    """Top-1 accuracy by centroids over the probes whose identity is in the gallery, with the details:
    dict(accuracy, predicted, truth (gallery indices, -1 = identity not in the gallery), scores)."""
    centroids = class_centroids(gallery, gallery_labels, len(gallery_classes))
    predicted, scores = identify(probes, centroids)
    truth = relabel(probe_labels, probe_classes, gallery_classes)
    known = truth >= 0
    accuracy = (predicted[known] == truth[known]).float().mean().item() if known.any() else float("nan")
    return dict(accuracy=accuracy, predicted=predicted, truth=truth, scores=scores)


def triplet_accuracy(embeddings, triplets):
    """Fraction of (anchor, positive, negative) index rows with d(a, p) < d(a, n)."""
    a, p, n = (embeddings[torch.as_tensor(triplets[:, i])] for i in range(3))
    return ((a - p).pow(2).sum(1) < (a - n).pow(2).sum(1)).float().mean().item()


# -----------------------------------------------------------------------------
# figures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, x="epoch"):
    """Loss and accuracy against epochs or optimiser steps (x='step'); the untrained network at 0, the best
    epoch marked."""
    plt = _pyplot()
    xs = [h[x] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [h for h in history if h.get("train_loss") is not None]
    if trained:
        loss_ax.plot([h[x] for h in trained], [h["train_loss"] for h in trained], "o-", label="train")
    loss_ax.plot(xs, [h["valid_loss"] for h in history], "s-", label="valid")
    loss_ax.set(xlabel=x, ylabel="loss", title="training loss")
    for key, label in (("valid_identification", "valid identification (top-1)"),
                       ("valid_triplet_accuracy", "valid triplets d(a,p) < d(a,n)"),
                       ("valid_pair_f1", "valid pair F1"), ("train_accuracy", "train batch accuracy")):
        points = [(h[x], 100 * h[key]) for h in history if h.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points), "o-", label=label)
    best = max(history, key=lambda h: h["valid_identification"])
    acc_ax.axvline(best[x], color="grey", linestyle=":", label=f"best: epoch {best['epoch']}")
    acc_ax.set(xlabel=x, ylabel="%", title="accuracy", ylim=(0, 101))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, path)


def plot_confusion_matrix(matrix, classes, path, title="confusion matrix"):
    """Row-normalised confusion matrix (rows: true identity, columns: predicted). The figure grows with the
    number of identities; counts are printed in the cells while they stay legible."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    n = len(classes)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(max(6.0, 0.28 * n + 2), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true identity's probes")
    step = max(1, n // 100)  # label at most 100 ticks
    ticks = np.arange(0, n, step)
    fontsize = 8 if n <= 40 else 6
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=fontsize)
    if n <= 60:
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if shares[i, j] > 0.5 else ("tab:red" if i != j else "black"))
    correct = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set(xlabel="predicted identity", ylabel="true identity", title=f"{title} (top-1 {100 * correct:.1f} %)")
    save_figure(fig, path)
