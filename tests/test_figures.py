"""Figures: each plot writes a real PNG (atomically, leaving no temporary file and no open figure) for typical
inputs and for the edge cases (few points, many identities, epochs without evaluation)."""
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from evaluation import verification_metrics
from figures import (plot_confusion_matrix, plot_embeddings_2d, plot_history, plot_roc, save_annotated, save_figure,
                     save_triplet_grid)


def image_size(path):
    """(width, height) of a PNG file; fails for anything else."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "out" / "line.png")
    assert image_size(tmp_path / "out" / "line.png")[0] > 100
    assert not plt.fignum_exists(fig.number) and os.listdir(tmp_path / "out") == ["line.png"]


def test_triplet_grid_is_written(tmp_path):
    anchor, positive, negative = torch.randn(3, 5, 3, 24, 20).unbind()  # normalised images, as the network sees them
    anchor_labels, negative_labels = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 2, 0, 2, 0])
    save_triplet_grid(anchor, positive, negative, anchor_labels, negative_labels, ["ann", "bob", "cy"],
                      str(tmp_path / "triplets.png"), rows=4)
    assert image_size(tmp_path / "triplets.png")[1] > 100


def test_plot_history_by_epoch_and_by_step(tmp_path):
    history = [dict(epoch=0, step=0, train_loss=None, valid_loss=0.9, valid_identification=0.3,
                    valid_triplet_accuracy=0.6),  # the untrained network
               dict(epoch=1, step=10, train_loss=0.5, train_accuracy=0.7),  # not evaluated (eval_every)
               dict(epoch=2, step=20, train_loss=0.4, train_accuracy=0.8, valid_loss=0.5,
                    valid_identification=0.8, valid_triplet_accuracy=0.9, valid_pair_f1=0.85),
               dict(epoch=3, step=30, train_loss=0.3, train_accuracy=0.9, valid_loss=0.6,
                    valid_identification=0.7, valid_triplet_accuracy=0.85, valid_pair_f1=None)]
    for x in ("epoch", "step"):
        plot_history(history, tmp_path / f"{x}.png", x=x)
        width, height = image_size(tmp_path / f"{x}.png")
        assert width > 800 and height > 300


def test_plot_confusion_matrix_few_and_many_identities(tmp_path):
    few = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])  # the last identity has no probe: a row of zeros
    plot_confusion_matrix(few, ["ann", "bob", "cy"], tmp_path / "few.png")
    rng = np.random.default_rng(15)
    many = np.diag(rng.integers(1, 5, 70)) + (rng.random((70, 70)) < 0.01)  # too many to print counts in cells
    plot_confusion_matrix(many, [f"s{i}" for i in range(70)], tmp_path / "many.png", title="test")
    assert image_size(tmp_path / "many.png")[0] > image_size(tmp_path / "few.png")[0] > 400  # grows with identities


def test_plot_roc_writes_a_png(tmp_path):
    rng = np.random.default_rng(10)
    same = np.repeat([1, 0], 500)
    curves = []
    for label, separation in (("model A", 2.0), ("model B", 0.5)):
        result = verification_metrics(rng.normal(size=1000) + separation * same, same)
        curves.append((label, result["roc"]["fpr"], result["roc"]["tpr"], result["auc"], result["eer"]))
    plot_roc(curves, tmp_path / "roc.png", title="test ROC")
    width, height = image_size(tmp_path / "roc.png")
    assert width > 500 and height > 400


def test_plot_embeddings_2d_pca_for_few_points_tsne_for_many(tmp_path):
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(4), 10)
    embeddings = np.eye(8)[labels] + 0.1 * rng.normal(size=(40, 8))
    classes = ["ann", "bob", "cy", "dee"]
    assert plot_embeddings_2d(embeddings, labels, classes, tmp_path / "tsne.png") == "t-SNE"
    assert plot_embeddings_2d(embeddings[::4], labels[::4], classes, tmp_path / "pca.png") == "PCA"
    for name in ("tsne.png", "pca.png"):
        width, height = image_size(tmp_path / name)
        assert width > 400 and height > 400


def test_plot_embeddings_2d_many_identities_and_edge_cases(tmp_path):
    many = np.arange(25)  # more than 20 identities: names at the points instead of a legend
    assert plot_embeddings_2d(np.random.default_rng(12).normal(size=(25, 6)), many,
                              [f"person {i}" for i in many], tmp_path / "many.png") == "PCA"
    assert image_size(tmp_path / "many.png")[0] > 400
    for i, embeddings in enumerate([np.ones((1, 4)), np.array([[1.0], [-1.0], [2.0]]), np.eye(2)]):
        labels = np.arange(len(embeddings))
        assert plot_embeddings_2d(embeddings, labels, ["a", "b", "c"], tmp_path / f"edge{i}.png") == "PCA"
        assert image_size(tmp_path / f"edge{i}.png")[0] > 0


def test_annotated_photo_has_a_box_per_face_in_the_colour_of_its_answer(tmp_path):
    photo = Image.new("L", (200, 100), 128)
    answers = [dict(box=[10, 20, 60, 80], name="ann", score=0.9), dict(box=[120, 20, 170, 80], name="unknown",
                                                                        score=0.3)]
    save_annotated(photo, answers, str(tmp_path / "a.png"))
    pixels = Image.open(tmp_path / "a.png").convert("RGB").load()
    assert pixels[10, 50][1] > 200 > pixels[10, 50][0]  # the known face: a green left edge
    assert pixels[120, 50][0] > 200 > pixels[120, 50][1]  # the unknown one: red
    assert pixels[100, 50] == (128, 128, 128)  # the photo itself, untouched between them
