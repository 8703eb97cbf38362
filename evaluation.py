"""Metrics of embeddings: identification by class centroids (closed set, and open set with a threshold calibrated
for a false-accept rate); verification of image pairs (ROC, EER, TAR@FAR, LFW-protocol 10-fold accuracy, and
insightface's own for its .bin sets) and precision / recall / F1 of same-person decisions; retrieval (P@1,
R-precision, MAP@R). Embedding passes are in inference.py, figures in figures.py."""
import os

import numpy as np
import torch
import torch.nn.functional as F


def class_centroids(embeddings, labels, num_classes):
    """(num_classes, D): per class, the mean of its L2-normalised embeddings, normalised again.
    A class without embeddings gets a zero row (cosine similarity 0 to everything)."""
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1]).index_add_(0, torch.as_tensor(labels), unit)
    return F.normalize(sums, dim=1)


def centroid_similarities(probes, centroids):
    """(P, C): cosine similarity of every probe to every (unit-length) centroid. One matrix product."""
    return F.normalize(probes.float(), dim=1) @ centroids.T


def identify(probes, centroids):
    """(predicted class, cosine similarity) per probe: the centroid most similar to it. One matrix product."""
    scores, predicted = centroid_similarities(probes, centroids).max(dim=1)
    return predicted, scores


def relabel(labels, classes, target_classes):
    """`labels` (indices into `classes`) as indices into `target_classes`, -1 where the name is absent."""
    index = {name: i for i, name in enumerate(target_classes)}
    lookup = torch.tensor([index.get(name, -1) for name in classes])
    return lookup[torch.as_tensor(labels)]


def identification_accuracy(gallery, gallery_labels, gallery_classes, probes, probe_labels, probe_classes):
    """Top-1 and top-k accuracy by centroids over the probes whose identity is in the gallery, with the details:
    dict(accuracy (top-1), top5 (share whose true identity is among the top_k most similar centroids),
    top_k = min(5, number of gallery classes), predicted, truth (gallery indices, -1 = identity not in the
    gallery), scores (cosine similarity to the predicted centroid), similarities (P, C) to every centroid,
    centroids (C, D)). Accuracies are NaN without known probes."""
    centroids = class_centroids(gallery, gallery_labels, len(gallery_classes))
    similarities = centroid_similarities(probes, centroids)
    scores, predicted = similarities.max(dim=1)
    truth = relabel(probe_labels, probe_classes, gallery_classes)
    known = truth >= 0
    top_k = min(5, len(gallery_classes))
    if known.any():
        accuracy = (predicted[known] == truth[known]).float().mean().item()
        top_k_hits = (similarities[known].topk(top_k, dim=1).indices == truth[known, None]).any(dim=1)
        top5 = top_k_hits.float().mean().item()
    else:
        accuracy = top5 = float("nan")
    return dict(accuracy=accuracy, top5=top5, top_k=top_k, predicted=predicted, truth=truth, scores=scores,
                similarities=similarities, centroids=centroids)


def triplet_accuracy(embeddings, triplets):
    """Fraction of (anchor, positive, negative) index rows with d(a, p) < d(a, n)."""
    a, p, n = (embeddings[torch.as_tensor(triplets[:, i])] for i in range(3))
    return ((a - p).pow(2).sum(1) < (a - n).pow(2).sum(1)).float().mean().item()


# -----------------------------------------------------------------------------
# verification: are two images of the same identity?

def _label_runs(labels):
    """(order, starts, counts): a stable sort of `labels`, and where each distinct label's run starts in it and
    how long it is. Stable, so each run lists its indices in increasing order."""
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    return order, starts, counts


def same_identity_pairs(labels):
    """(S, 2) int64 numpy: every pair i < j of indices into `labels` with labels[i] == labels[j].
    Enumerated: there are sum(c * (c - 1) / 2) over the identities' image counts c, few next to all pairs."""
    order, starts, counts = _label_runs(np.asarray(labels))
    pairs = [np.empty((0, 2), dtype=np.int64)]
    for start, count in zip(starts, counts):
        members = order[start:start + count]
        first, second = np.triu_indices(count, 1)
        pairs.append(np.stack([members[first], members[second]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def different_identity_pairs(labels):
    """(D, 2) int64 numpy: every pair i < j of indices into `labels` with labels[i] != labels[j]. Memory grows
    with D (about N² / 2): for few images, or when most pairs are wanted."""
    order, starts, counts = _label_runs(np.asarray(labels))
    run_ends = np.repeat(starts + counts, counts)  # per sorted position: where its identity's run ends
    partners = len(order) - run_ends  # each sorted position pairs with every position after its run
    first = np.repeat(np.arange(len(order)), partners)
    second = np.repeat(run_ends, partners) + np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners,
                                                                                  partners)
    return np.sort(np.stack([order[first], order[second]], axis=1), axis=1).astype(np.int64)


def sample_different_pairs(labels, count, rng):
    """(count, 2) int64 numpy: `count` distinct pairs i < j with labels[i] != labels[j], a uniform random subset
    of all of them drawn with the numpy Generator `rng`, sorted. Needs count <= half of all such pairs, so that
    redrawing duplicates stays cheap; different_identity_pairs otherwise."""
    labels = np.asarray(labels)
    n = len(labels)
    order, starts, counts = _label_runs(labels)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    run_start, run_length = np.repeat(starts, counts)[position], np.repeat(counts, counts)[position]
    others = n - run_length
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < count:
        # i with probability proportional to its number of partners, then a uniform partner: every unordered
        # pair {i, j} is drawn with the same probability 2 / sum(others)
        first = rng.choice(n, 2 * (count - len(keys)), p=others / others.sum())
        skip = rng.integers(0, others[first])
        second = order[np.where(skip >= run_start[first], skip + run_length[first], skip)]  # jump over i's run
        keys = np.concatenate([keys, np.minimum(first, second) * n + np.maximum(first, second)])
        _, first_seen = np.unique(keys, return_index=True)
        keys = keys[np.sort(first_seen)]  # first draw of each pair, in draw order: truncating keeps it uniform
    keys = np.sort(keys[:count])
    return np.stack([keys // n, keys % n], axis=1)


def verification_pairs(labels, rng, max_same=None):
    """(M, 3) int64 numpy rows (i, j, same), i < j indices into `labels` (N identity labels, numpy or torch):
    first every same-identity pair (same = 1), or a random `max_same` of them when there are more, then as many
    distinct different-identity pairs (same = 0) drawn at random, or all of them when there are no more than that.
    `rng` is a numpy Generator: the same seed gives the same pairs. (0, 3) when no identity has two images."""
    labels = np.asarray(labels)
    same = same_identity_pairs(labels)
    n_same = len(same)
    if max_same is not None and n_same > max_same:
        same = same[np.sort(rng.choice(n_same, max_same, replace=False))]
    if not len(same):
        return np.empty((0, 3), dtype=np.int64)
    n_different = len(labels) * (len(labels) - 1) // 2 - n_same
    if 2 * len(same) < n_different:
        different = sample_different_pairs(labels, len(same), rng)
    else:  # most different pairs are wanted: list them all rather than redraw duplicates
        different = different_identity_pairs(labels)
        if len(different) > len(same):
            different = different[np.sort(rng.choice(len(different), len(same), replace=False))]
    return np.concatenate([np.column_stack([same, np.ones(len(same), dtype=np.int64)]),
                           np.column_stack([different, np.zeros(len(different), dtype=np.int64)])])


def evaluation_protocol(probes, trained_classes, trained_data_dir, alignment, probe_split):
    """What a test.py metric measures, as plain JSON: the probe folder (`probes`, a FaceFolder) and its split
    name, how many of its people the checkpoint trained on (`trained_classes`), whether it is the valid/ of the data
    the checkpoint was trained on (`trained_data_dir`), which chose the checkpoint, and whether the network was
    trained on aligned faces (`alignment`, the checkpoint's record or None); `summary` says it in one line."""
    trained = set(trained_classes)
    seen = sum(name in trained for name in probes.classes)
    chose = bool(trained_data_dir) and os.path.realpath(probes.root) == os.path.realpath(
        os.path.join(trained_data_dir, "valid"))
    people = (f"{seen} people trained on" if seen == len(probes.classes) else
              f"{len(probes.classes)} people never trained on" if seen == 0 else
              f"{seen} people trained on and {len(probes.classes) - seen} never trained on")
    summary = (f"{probe_split}/ probes of {people}; "
               + ("they chose the checkpoint (optimistic)" if chose else "they did not choose the checkpoint")
               + ("; aligned faces" if alignment else "; unaligned"))
    return dict(probes=os.path.abspath(probes.root), split=probe_split, probe_people=len(probes.classes),
                probe_people_trained_on=seen, probes_chose_checkpoint=chose, aligned=bool(alignment),
                summary=summary)


def held_out_pairs(targets, classes, train_classes, rng, max_same=5000):
    """verification_pairs among the images of identities absent from `train_classes` (people never trained on),
    as (M, 3) rows (i, j, same) of indices into `targets` (labels into `classes`); (0, 3) unless such people give
    both kinds of pair. At most `max_same` same pairs, drawn with `rng`, and as many different ones."""
    targets = np.asarray(targets)
    trained = set(train_classes)
    where = np.flatnonzero([classes[t] not in trained for t in targets])
    rows = verification_pairs(targets[where], rng, max_same)
    if not len(rows) or rows[:, 2].all():
        return np.empty((0, 3), dtype=np.int64)
    return np.column_stack([where[rows[:, 0]], where[rows[:, 1]], rows[:, 2]])


def cosine_similarity_pairs(embeddings, pairs):
    """(M,) float32 numpy: cosine similarity of embeddings[pairs[:, 0]] and embeddings[pairs[:, 1]], for
    (N, D) embeddings (torch or numpy) and (M, >= 2) index rows such as verification_pairs'."""
    unit = F.normalize(torch.as_tensor(np.asarray(embeddings)).float(), dim=1)
    pairs = torch.as_tensor(np.asarray(pairs, dtype=np.int64))
    return (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(dim=1).numpy()


def best_threshold(scores, same):
    """The threshold t for which 'same iff score >= t' is right most often on these (scores, same) pairs.
    Candidates: the midpoints between consecutive distinct scores, one below the lowest and one above the highest
    (accept all, accept none); the lowest of equally good ones."""
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1]])
    positives, negatives = np.sort(scores[same]), np.sort(scores[~same])
    correct = len(positives) - np.searchsorted(positives, candidates) + np.searchsorted(negatives, candidates)
    return float(candidates[np.argmax(correct)])


def kfold_accuracy(scores, same, fold_ids):
    """(accuracies, thresholds), one per distinct value of `fold_ids` in increasing order: the accuracy on the
    pairs of that fold of the best_threshold of all the OTHER pairs, and that threshold. scores: (M,) floats,
    same: (M,) bools. Raises ValueError for fewer than two folds (no pairs left to choose a threshold on)."""
    folds = np.unique(fold_ids)
    if len(folds) < 2:
        raise ValueError(f"cross-validated accuracy needs at least two folds, got {len(folds)}")
    accuracies, thresholds = [], []
    for fold in folds:
        test = fold_ids == fold
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(float(np.mean((scores[test] >= threshold) == same[test])))
        thresholds.append(threshold)
    return accuracies, thresholds


def stratified_folds(same, folds, seed=0):
    """(M,) int64 numpy fold index in [0, k) per pair, k = min(folds, M): a random partition (numpy seed `seed`)
    whose folds differ by at most one in size and in their numbers of same and of different pairs."""
    same = np.asarray(same, dtype=bool)
    folds = min(folds, len(same))
    if folds < 2:
        raise ValueError(f"cross-validated accuracy needs at least two folds and two pairs, got folds={folds} "
                         f"for {len(same)} pairs")
    rng = np.random.default_rng(seed)
    fold_ids = np.empty(len(same), dtype=np.int64)
    dealt = 0
    for group in (np.flatnonzero(same), np.flatnonzero(~same)):
        # deal each class round-robin, the second one continuing where the first stopped: sizes stay balanced
        fold_ids[rng.permutation(group)] = (dealt + np.arange(len(group))) % folds
        dealt += len(group)
    return fold_ids


def equal_error_rate(fpr, tpr, thresholds):
    """(EER, threshold) of a ROC curve (roc_curve's fpr, tpr, thresholds): the rate at which the false positive
    rate equals the false negative rate 1 - TPR, linearly interpolated between the two ROC points that enclose
    the crossing, and the score threshold interpolated alike (from the finite thresholds)."""
    gap = fpr - (1 - tpr)  # FPR - FNR: -1 at the first ROC point (nothing accepted), never decreasing, +1 at the end
    k = int(np.argmax(gap >= 0))
    weight = -gap[k - 1] / (gap[k] - gap[k - 1])
    upper = thresholds[k - 1] if np.isfinite(thresholds[k - 1]) else thresholds[k]  # roc_curve's first one is inf
    return (float(fpr[k - 1] + weight * (fpr[k] - fpr[k - 1])),
            float(upper + weight * (thresholds[k] - upper)))


def verification_metrics(scores, same, folds=10, seed=0, fold_ids=None, fars=(1e-3, 1e-2)):
    """Verification quality of similarity scores (higher = more likely the same identity) of pairs with truth
    `same` (1 = same identity, 0 = different), both (M,) arrays. Returns a plain-JSON dict:
    pairs, same_pairs, different_pairs; auc (ROC area); eer, eer_threshold (equal_error_rate); tar_at_far
    {f"{far:g}": highest TPR with FPR <= far} for each of `fars`, and far_floor = 1 / different pairs (FARs below it
    cannot be resolved by these pairs); accuracy_mean, accuracy_std (population std), threshold_mean,
    fold_accuracies, folds: LFW-protocol cross-validated accuracy (kfold_accuracy) over `fold_ids` (an int per
    pair, e.g. the ten sets of LFW's pairs.txt) or else stratified_folds(same, folds, seed), that is
    min(folds, M) folds when there are fewer pairs than folds; roc: dict(fpr, tpr) lists, the ROC points to plot
    (one per distinct score, after (0, 0); pop it before printing). ValueError without both same and different
    pairs, or with fewer than two folds."""
    from sklearn.metrics import roc_auc_score, roc_curve
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and same {same.shape} must be matching 1-d arrays")
    if not np.isin(same, (0, 1)).all():
        raise ValueError("same must hold 0 (different identities) or 1 (same identity) per pair")
    same = same.astype(bool)
    if same.all() or not same.any():
        raise ValueError(f"verification needs both same and different pairs, got {int(same.sum())} same and "
                         f"{int((~same).sum())} different")
    # every threshold: the default drops points on a straight stretch of the curve, and with tied scores such a
    # point can be the highest TPR within a FAR
    fpr, tpr, thresholds = roc_curve(same, scores, drop_intermediate=False)
    eer, eer_threshold = equal_error_rate(fpr, tpr, thresholds)
    if fold_ids is None:
        fold_ids = stratified_folds(same, folds, seed)
    fold_ids = np.asarray(fold_ids)
    if fold_ids.shape != scores.shape:
        raise ValueError(f"fold_ids {fold_ids.shape} must give one fold per pair {scores.shape}")
    accuracies, fold_thresholds = kfold_accuracy(scores, same, fold_ids)
    return dict(
        pairs=len(scores), same_pairs=int(same.sum()), different_pairs=int((~same).sum()),
        auc=float(roc_auc_score(same, scores)), eer=eer, eer_threshold=eer_threshold,
        tar_at_far={f"{far:g}": float(tpr[fpr <= far].max()) for far in fars},
        far_floor=1 / int((~same).sum()),
        accuracy_mean=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)),
        threshold_mean=float(np.mean(fold_thresholds)), fold_accuracies=accuracies, folds=len(accuracies),
        roc=dict(fpr=fpr.tolist(), tpr=tpr.tolist()))


def verifiable(same):
    """Whether pairs with truth `same` give verification metrics: 4 pairs or more, same-identity and different."""
    same = np.asarray(same, dtype=bool)
    return len(same) >= 4 and bool(same.any()) and not same.all()


def readable_pairs(readable, pair_rows):
    """((K, 3) int64 rows (row of i, row of j, same) into the embeddings of an embedding pass that read the sources
    listed in `readable`, one row each in that order; the indices into `pair_rows` of those K pairs (i, j, same)
    whose two images were read)."""
    row_of = {i: row for row, i in enumerate(readable)}
    scored = [k for k, (i, j, _) in enumerate(pair_rows) if i in row_of and j in row_of]
    index_rows = np.array([(row_of[i], row_of[j], same) for i, j, same in (pair_rows[k] for k in scored)],
                          dtype=np.int64).reshape(-1, 3)
    return index_rows, scored


def score_pairs(embeddings, readable, pair_rows, fold_ids, seed=0):
    """(verification_metrics of the pairs (i, j, same) of `pair_rows` whose two images were read, or None unless
    they are verifiable; the indices into `pair_rows` of those pairs). i and j index the sources of an embedding
    pass of which those listed in `readable` were read, one row of `embeddings` each in that order
    (inference.embed_files'). The pairs scored keep their `fold_ids`; fewer than two folds among them (a pairs file
    of one set, or none) fall back to stratified random folds of `seed`."""
    index_rows, scored = readable_pairs(readable, pair_rows)
    if not verifiable(index_rows[:, 2]):
        return None, scored
    folds = np.asarray(fold_ids)[scored]
    return verification_metrics(cosine_similarity_pairs(embeddings, index_rows), index_rows[:, 2], seed=seed,
                                fold_ids=folds if len(np.unique(folds)) >= 2 else None), scored


# insightface's accuracy (arcface_torch's eval/verification.py), to the number: "same" iff the squared L2 distance of
# the two normalised embeddings (in [0, 4]) is below a threshold of this grid
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)


def contiguous_folds(count, folds=10):
    """(count,) int64 fold of each of `count` items: min(folds, count) consecutive blocks, the first count % folds
    of them one item larger, as scikit-learn's KFold(folds, shuffle=False) splits (insightface's folds)."""
    folds = min(folds, count)
    sizes = count // folds + (np.arange(folds) < count % folds)
    return np.repeat(np.arange(folds), sizes)


def _grid_correct(distances, same, thresholds):
    """(T,): how many of the pairs `distances` (with truth `same`) 'same iff distance < t' decides right, per t."""
    positives, negatives = np.sort(distances[same]), np.sort(distances[~same])
    # searchsorted (side "left") counts the distances below t
    return np.searchsorted(positives, thresholds) + len(negatives) - np.searchsorted(negatives, thresholds)


def grid_kfold_accuracy(distances, same, fold_ids, thresholds=INSIGHTFACE_THRESHOLDS):
    """(accuracies, thresholds), one per distinct value of `fold_ids` in increasing order: the accuracy on that
    fold's pairs of 'same iff distance < t', t the threshold of `thresholds` right most often on all the OTHER
    pairs (the first of equally good ones), and that t. insightface's calculate_roc accuracy: distances (M,),
    same (M,) bools."""
    folds = np.unique(fold_ids)
    correct = np.array([_grid_correct(distances[fold_ids == f], same[fold_ids == f], thresholds) for f in folds])
    accuracies, chosen = [], []
    for k, fold in enumerate(folds):
        best = int(np.argmax(correct.sum(axis=0) - correct[k]))
        accuracies.append(float(correct[k, best] / np.sum(fold_ids == fold)))
        chosen.append(float(thresholds[best]))
    return accuracies, chosen


def score_pairs_as_insightface(embeddings, readable, pair_rows, fold_ids, seed=0):
    """score_pairs' (metrics, scored), the metrics' 10-fold accuracy that of insightface's evaluation
    (grid_kfold_accuracy of the squared L2 distances of the normalised embeddings, in float64, over the pairs'
    `fold_ids`): accuracy_mean, accuracy_std, fold_accuracies, and threshold_mean a squared distance. Those of exact
    thresholds on the cosine similarity (kfold_accuracy's) go under "exact_thresholds"; the ROC metrics are
    score_pairs'. None for metrics with fewer than two folds among the pairs scored."""
    metrics, scored = score_pairs(embeddings, readable, pair_rows, fold_ids, seed)
    folds = np.asarray(fold_ids)[scored]
    if metrics is None or len(np.unique(folds)) < 2:
        return None, scored
    index_rows, _ = readable_pairs(readable, pair_rows)
    unit = np.asarray(embeddings, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    distances = np.sum((unit[index_rows[:, 0]] - unit[index_rows[:, 1]]) ** 2, axis=1)
    accuracies, thresholds = grid_kfold_accuracy(distances, index_rows[:, 2].astype(bool), folds)
    exact = {key: metrics.pop(key) for key in ("accuracy_mean", "accuracy_std", "threshold_mean", "fold_accuracies")}
    return dict(metrics, accuracy_mean=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)),
                threshold_mean=float(np.mean(thresholds)), fold_accuracies=accuracies, exact_thresholds=exact), scored


def bin_pairs(same, folds=10):
    """(pair rows (2k, 2k + 1, same[k]), fold of each pair) of an insightface verification set of len(same) pairs
    (pairs.read_verification_bin's): its images two a pair, its folds insightface's contiguous_folds."""
    return [(2 * k, 2 * k + 1, bool(s)) for k, s in enumerate(same)], contiguous_folds(len(same), folds)


def _ratio(numerator, denominator):
    """numerator / denominator as a float; 0.0 when the denominator is 0 (nothing to count)."""
    return float(numerator / denominator) if denominator else 0.0


def pair_decisions(same, decided_same):
    """Precision, recall and F1 of yes/no decisions `decided_same` on pairs with truth `same` (both (M,), bools or
    0/1; 1 = same identity, the positive class), as scikit-learn's precision_recall_fscore_support(average=
    "binary", zero_division=0): a ratio with nothing to count is 0.0. Returns dict(precision, recall, f1)."""
    same, decided = np.asarray(same).astype(bool), np.asarray(decided_same).astype(bool)
    if same.shape != decided.shape:
        raise ValueError(f"same {same.shape} and decided_same {decided.shape} must have one value per pair")
    hits, accepted, positives = int((same & decided).sum()), int(decided.sum()), int(same.sum())
    return dict(precision=_ratio(hits, accepted), recall=_ratio(hits, positives),
                f1=_ratio(2 * hits, accepted + positives))  # 2 TP / (2 TP + FP + FN)


def calibrate_threshold(impostor_scores, far):
    """The smallest threshold t among the impostor scores (and the float just above the highest, when even that
    one would accept too many) such that the share of impostor scores >= t is at most `far`: accepting scores
    >= t then falsely accepts at most that share of these impostors. Any t' in (the next lower score, t] accepts
    the same ones. Tied scores are accepted or rejected together, so the share may fall below `far`.
    ValueError unless 0 < far < 1 and there are scores."""
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    scores = np.sort(np.asarray(impostor_scores, dtype=np.float64).ravel())
    if not len(scores):
        raise ValueError("calibrate_threshold needs at least one impostor score")
    distinct = np.unique(scores)
    accepted_share = (len(scores) - np.searchsorted(scores, distinct)) / len(scores)  # scores >= each candidate
    within = accepted_share <= far
    return float(distinct[np.argmax(within)]) if within.any() else float(np.nextafter(scores[-1], np.inf))


def _share(mask):
    """Mean of a boolean array as a float, None when it is empty."""
    return float(mask.mean()) if mask.size else None


def open_set_metrics(best_scores, predicted, truth, threshold):
    """Open-set identification at `threshold`, from per-probe (P,) arrays (numpy or torch): best_scores (the
    highest gallery similarity), predicted (its gallery index) and truth (the true gallery index, -1 = identity
    not in the gallery; identification_accuracy's scores, predicted and truth). A probe is accepted when its score
    >= threshold. Returns dict(threshold, known_probes, unknown_probes, detection_identification_rate (known
    probes accepted AND rightly identified / known probes), false_accept_rate (unknown probes accepted / unknown
    probes), rejected_known (known probes rejected / known probes)); a rate is None without probes to count."""
    scores, predicted, truth = (np.asarray(a).ravel() for a in (best_scores, predicted, truth))
    known, accepted = truth >= 0, scores >= threshold
    return dict(threshold=float(threshold), known_probes=int(known.sum()), unknown_probes=int((~known).sum()),
                detection_identification_rate=_share((accepted & (predicted == truth))[known]),
                false_accept_rate=_share(accepted[~known]), rejected_known=_share(~accepted[known]))


def open_set_evaluation(found, target_far, stranger_scores=None):
    """Open-set identification with a threshold calibrated for `target_far`. found: identification_accuracy's
    dict (truth, predicted, scores, similarities). The known probes (truth >= 0) calibrate it, each as if it were
    a stranger: its best similarity to any OTHER identity's centroid is the score an impostor would get. The
    strangers check it: `stranger_scores` ((S,), each one's best similarity to the gallery's centroids: people
    absent from the gallery), or else the scores of the probes of `found` whose identity is absent from it.
    Returns dict(open_set_metrics(...) of the known probes and the strangers, target_far, strangers = S); None
    when the gallery has fewer than two identities (no other identity to calibrate on) or there is no known probe."""
    truth, predicted, scores = (np.asarray(found[k]) for k in ("truth", "predicted", "scores"))
    similarities, known = np.asarray(found["similarities"]), truth >= 0
    if similarities.shape[1] < 2 or not known.any():
        return None
    impostors = similarities[known]  # a copy (boolean indexing): the true identities' columns are set aside below
    impostors[np.arange(len(impostors)), truth[known]] = -np.inf
    threshold = calibrate_threshold(impostors.max(axis=1), target_far)
    strangers = scores[~known] if stranger_scores is None else np.asarray(stranger_scores).ravel()
    unknown = np.full(len(strangers), -1)  # truth -1: not in the gallery (their predictions do not count)
    metrics = open_set_metrics(np.concatenate([scores[known], strangers]), np.concatenate([predicted[known], unknown]),
                               np.concatenate([truth[known], unknown]), threshold)
    return dict(metrics, target_far=target_far, strangers=len(strangers))


# -----------------------------------------------------------------------------
# retrieval: rank every reference by similarity to each query

def retrieval_metrics(queries, query_labels, references, reference_labels, exclude_self=False, chunk_size=1024):
    """Ranking quality of cosine similarity, as defined by Musgrave et al. (A Metric Learning Reality Check,
    2020). queries (Q, D), references (N, D) embeddings, numpy or torch; labels (Q,), (N,) integers in one
    index space. For each query, R = references of its label; precision@1 = is the most similar reference of its
    label; R-precision = those of its label among the R most similar / R; MAP@R = sum over i <= R of
    (precision@i if the i-th is of its label else 0) / R. exclude_self: queries are the references (same order),
    each query's own row is left out. Similarities are computed `chunk_size` queries at a time (memory
    chunk_size x N). Returns dict(precision_at_1, r_precision, map_at_r (means over the queries with R >= 1,
    None when none has), queries, queries_without_references)."""
    queries = F.normalize(torch.as_tensor(np.asarray(queries)).float(), dim=1)
    references = F.normalize(torch.as_tensor(np.asarray(references)).float(), dim=1)
    query_labels = torch.as_tensor(np.asarray(query_labels))
    reference_labels = torch.as_tensor(np.asarray(reference_labels))
    if exclude_self and len(queries) != len(references):
        raise ValueError(f"exclude_self needs the queries to be the references, got {len(queries)} queries "
                         f"and {len(references)} references")
    totals, scored = torch.zeros(3, dtype=torch.float64), 0
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start:start + chunk_size] @ references.T
        relevant = reference_labels[None, :] == query_labels[start:start + chunk_size, None]
        if exclude_self:
            rows = torch.arange(len(similarity))
            similarity[rows, start + rows] = -float("inf")
            relevant[rows, start + rows] = False
        r = relevant.sum(dim=1)
        keep = r > 0
        if not keep.any():
            continue
        similarity, relevant, r = similarity[keep], relevant[keep], r[keep]
        k = int(r.max())
        ranked = relevant.gather(1, similarity.topk(k, dim=1).indices)  # relevance of the k most similar
        hits = ranked & (torch.arange(k) < r[:, None])  # only the first R count
        precision_at_i = hits.cumsum(dim=1) / torch.arange(1, k + 1)
        totals += torch.stack([ranked[:, 0].double().sum(), (hits.sum(dim=1) / r).double().sum(),
                               ((precision_at_i * hits).sum(dim=1) / r).double().sum()])
        scored += len(r)
    means = (totals / scored).tolist() if scored else [None] * 3
    return dict(precision_at_1=means[0], r_precision=means[1], map_at_r=means[2], queries=len(queries),
                queries_without_references=len(queries) - scored)
