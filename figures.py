"""Every figure of training and evaluation, written as PNG files (atomically, with files.atomic_write): training
triplets as the network sees them, the training history, confusion matrix, ROC curves and 2-D embedding maps."""
import numpy as np
import torch
import torch.nn.functional as F

from data_utils import denormalize, normalize
from files import atomic_write


def _pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120):
    """`fig` as a PNG at `path` (atomically), then closed."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    _pyplot().close(fig)


def save_annotated(image, answers, path):
    """A copy of the photo `image` with a box around each face of `answers` (gallery.face_answer's) and its name
    and score above it (red: unknown), written atomically at `path` (PNG)."""
    from PIL import ImageDraw
    annotated = image.convert("RGB")
    draw = ImageDraw.Draw(annotated)
    width = max(2, round(min(annotated.size) / 150))
    for answer in answers:
        left, top, right, bottom = answer["box"]
        colour = "red" if answer["name"] == "unknown" else "lime"
        draw.rectangle((left, top, right, bottom), outline=colour, width=width)
        label = f"{answer['name']} {answer['score']:.2f}"
        draw.text((left, max(0, top - 12)), label, fill=colour, stroke_width=1, stroke_fill="black")
    atomic_write(path, lambda f: annotated.save(f, format="PNG"))


def save_alignment_grid(examples, path):
    """A PNG to check alignment by eye: per row, an original photo with every face found (boxes; the main one in
    red with its five points) beside its aligned crop. `examples`: [(title, PIL image, faces, main index, aligned
    PIL image)] as align.FaceAligner.align gives them."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(examples), 2, figsize=(5.2, 2.5 * len(examples)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1.6, 1]))
    for (title, image, faces, main, aligned), (left, right) in zip(examples, axes):
        left.imshow(image, cmap="gray")
        for i, (box, points) in enumerate(faces):
            colour = "tab:red" if i == main else "tab:orange"
            left.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color=colour, lw=1.5))
            if i == main:
                left.plot(points[:, 0], points[:, 1], "o", ms=3, color="tab:cyan")
        right.imshow(aligned, cmap="gray")
        left.set_title(title, fontsize=7)
        right.set_title("aligned", fontsize=7)
        for ax in (left, right):
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def save_triplet_examples(triplets, path, rows=8):
    """triplets.png: `rows` items of a TripletFaceDataset of uint8 pixels (random augmentation included, as training
    sees them), spread evenly over it, drawn by save_triplet_grid."""
    shown = [triplets[int(i)] for i in np.linspace(0, len(triplets) - 1, min(rows, len(triplets)))]
    (a, p, n), (la, _, ln) = ([torch.stack([torch.as_tensor(item[part][k]) for item in shown]) for k in range(3)]
                              for part in range(2))
    save_triplet_grid(normalize(a), normalize(p), normalize(n), la, ln, triplets.faces.classes, path, rows)


def save_triplet_grid(anchor, positive, negative, anchor_labels, negative_labels, classes, path, rows=8):
    """A PNG with one (anchor, positive, negative) row per triplet, un-normalised, for checking augmentation
    and triplet construction by eye."""
    plt = _pyplot()
    rows = min(rows, len(anchor))
    columns = [("anchor", anchor, anchor_labels), ("positive", positive, anchor_labels),
               ("negative", negative, negative_labels)]
    h, w = anchor.shape[-2:]
    fig, axes = plt.subplots(rows, 3, figsize=(3 * 1.6 * w / h + 0.4, rows * 1.75), squeeze=False)
    for col, (title, images, labels) in enumerate(columns):
        images = denormalize(images[:rows]).permute(0, 2, 3, 1).numpy()
        for row in range(rows):
            ax = axes[row, col]
            ax.imshow(images[row])
            ax.set_title(f"{title}: {classes[int(labels[row])]}", fontsize=8,
                         color="tab:red" if col == 2 else "black")
            ax.axis("off")
    fig.suptitle("training triplets, as the network sees them", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_history(history, path, x="epoch", best_by="valid_identification"):
    """Loss and accuracy against epochs or optimiser steps (x='step'); the untrained network at 0, the best
    epoch by `best_by` marked. Epochs without an evaluation (train.py's eval_every) have training figures only;
    the accuracy of each .bin verification set (bin_<name>_accuracy) is drawn beside the valid images' figures."""
    plt = _pyplot()
    evaluated = [h for h in history if h.get(best_by) is not None]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [h for h in history if h.get("train_loss") is not None]
    if trained:
        loss_ax.plot([h[x] for h in trained], [h["train_loss"] for h in trained], "o-", label="train")
    valid = [h for h in history if h.get("valid_loss") is not None]
    if valid:
        loss_ax.plot([h[x] for h in valid], [h["valid_loss"] for h in valid], "s-", label="valid")
    loss_ax.set(xlabel=x, ylabel="loss", title="training loss")
    curves = [("valid_identification", "valid identification (top-1)"),
              ("valid_triplet_accuracy", "valid triplets d(a,p) < d(a,n)"), ("valid_pair_f1", "valid pair F1"),
              ("train_accuracy", "train batch accuracy"), ("valid_pairs_accuracy", "held-out people: pair accuracy")]
    sets = dict.fromkeys(k for h in history for k in h if k.startswith("bin_") and k.endswith("_accuracy"))
    curves += [(key, f"{key[len('bin_'):-len('_accuracy')]}.bin: 10-fold accuracy") for key in sets]
    if len(sets) > 1:
        curves.append(("bins_accuracy", ".bin sets: mean accuracy"))
    for key, label in curves:
        points = [(h[x], 100 * h[key]) for h in history if h.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points), "o-", label=label)
    best = max(evaluated, key=lambda h: h[best_by] if h[best_by] == h[best_by] else -1)
    acc_ax.axvline(best[x], color="grey", linestyle=":", label=f"best: epoch {best['epoch']}")
    acc_ax.set(xlabel=x, ylabel="%", title="accuracy", ylim=(0, 101))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (no loss to draw before the first epoch without valid images)
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


def plot_roc(curves, path, title="verification ROC"):
    """ROC curves, one per (label, fpr, tpr, auc, eer) of `curves` (verification_metrics' roc, auc and eer):
    true accept rate against false accept rate on a log axis (FAR 0 drawn at a floor below the smallest
    resolved FAR), dotted lines at FAR 1e-3 and 1e-2, each curve's equal-error point ringed, AUC and EER in the
    legend. Saved as a PNG at `path`."""
    plt = _pyplot()
    resolved = np.concatenate([np.asarray(fpr, dtype=float) for _, fpr, *_ in curves] + [np.ones(1)])
    # a log axis cannot draw FAR 0: a decade below the smallest resolved FAR (at most 1e-4) stands in for it
    floor = 10 ** np.floor(np.log10(min(1e-4, resolved[resolved > 0].min() / 2)))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    chance = np.logspace(np.log10(floor), 0, 200)
    ax.plot(chance, chance, "--", color="0.7", lw=1, label="chance (TAR = FAR)")
    for label, fpr, tpr, auc, eer in curves:
        (line,) = ax.plot(np.maximum(fpr, floor), tpr, lw=2, label=f"{label}: AUC {auc:.4f}, EER {100 * eer:.2f} %")
        ax.plot(max(eer, floor), 1 - eer, "o", ms=8, mfc="white", mew=2, color=line.get_color())
    ax.plot([], [], "o", ms=8, mfc="white", mew=2, color="0.3", label="equal error rate (FAR = 1 − TAR)")
    for far in (1e-3, 1e-2):
        ax.axvline(far, color="0.3", ls=":", lw=1.2)
        ax.text(far, 0.03, f" FAR {far:g}", rotation=90, va="bottom", ha="right", fontsize=9, color="0.3")
    ax.set(xscale="log", xlim=(floor, 1), ylim=(0, 1.01), title=title,
           xlabel="false accept rate (FAR): different identities accepted, log scale",
           ylabel="true accept rate (TAR): same identity accepted")
    ax.grid(which="major", alpha=0.4)
    ax.grid(which="minor", alpha=0.12)
    ax.legend(loc="best", fontsize=9)
    save_figure(fig, path)


def embedding_map(embeddings, seed=0):
    """((N, 2) numpy coordinates, method) of (N, D) embeddings, L2-normalised first as they are compared by
    cosine: "t-SNE" (init="pca", perplexity min(30, (N - 1) / 3) as t-SNE needs fewer than N / 3 neighbours,
    random_state=seed) from 30 points up, else "PCA"; zeros along what a single point or dimension cannot span."""
    points = F.normalize(torch.as_tensor(np.asarray(embeddings)).float().reshape(len(embeddings), -1), dim=1).numpy()
    n, d = points.shape
    if n >= 30 and d >= 2:
        from sklearn.manifold import TSNE
        tsne = TSNE(n_components=2, init="pca", perplexity=min(30.0, (n - 1) / 3), random_state=seed)
        return tsne.fit_transform(points), "t-SNE"
    from sklearn.decomposition import PCA
    coords = np.zeros((n, 2))
    components = min(2, n - 1, d)  # n points span at most n - 1 directions
    if components:
        coords[:, :components] = PCA(n_components=components).fit_transform(points)
    return coords, "PCA"


def plot_embeddings_2d(embeddings, labels, classes, path, seed=0, max_points=3000):
    """2-D map (embedding_map) of (N, D) embeddings, one colour per identity; `labels` (N,) index `classes`
    (names). Up to 20 identities get a legend, more get their name written at the mean of their points. Beyond
    `max_points`, a seeded random subset (t-SNE's time grows fast with N). Saved as a PNG at `path`; returns the
    method, "t-SNE" or "PCA"."""
    plt = _pyplot()
    labels = np.asarray(labels)
    if len(labels) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), max_points, replace=False))
        embeddings, labels = np.asarray(embeddings)[keep], labels[keep]
    coords, method = embedding_map(embeddings, seed)
    present = np.unique(labels)
    few = len(present) <= 20
    colours = (plt.get_cmap("tab10" if len(present) <= 10 else "tab20").colors if few
               else plt.get_cmap("turbo")(np.linspace(0.05, 0.95, len(present))))
    fig, ax = plt.subplots(figsize=(9, 7.5) if few else (11, 10))
    for colour, label in zip(colours, present):
        points = coords[labels == label]
        ax.scatter(points[:, 0], points[:, 1], s=36, color=colour, alpha=0.9, edgecolors="black", linewidths=0.4,
                   label=str(classes[label]), zorder=3)
        if not few:  # the name just above the points, which stay visible on top
            ax.annotate(str(classes[label]), (points[:, 0].mean(), points[:, 1].max()), xytext=(0, 5),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, zorder=2,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colour, alpha=0.6))
    if few:
        ax.legend(title="identity", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=1.3)
    axis = "PC" if method == "PCA" else method
    ax.set(xticks=[], yticks=[], xlabel=f"{axis} 1", ylabel=f"{axis} 2",
           title=f"{method} map of {len(labels)} embeddings, {len(present)} identities\n" + (
               "(neighbours are similar embeddings; distances between clusters mean little)" if method == "t-SNE"
               else "(the two directions in which the embeddings vary most)"))
    ax.set_aspect("equal", adjustable="datalim")
    save_figure(fig, path)
    return method
