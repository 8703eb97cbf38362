import itertools
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support, roc_curve

import evaluation
from conftest import insightface_accuracy
from evaluation import (best_threshold, bin_pairs, calibrate_threshold, contiguous_folds, cosine_similarity_pairs,
                        different_identity_pairs, identification_accuracy, kfold_accuracy, open_set_evaluation,
                        open_set_metrics, pair_decisions, retrieval_metrics, sample_different_pairs,
                        score_pairs_as_insightface, stratified_folds, verification_metrics, verification_pairs)


def unit_vectors(degrees):
    """(N, 2) unit vectors at the given angles: cosine similarity = cos(angle between them)."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# -----------------------------------------------------------------------------
# verification metrics

def test_perfectly_separated_scores_are_perfect_and_plain_json():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.6, 1.0, 100), rng.uniform(-1.0, 0.4, 100)])
    same = np.repeat([1, 0], 100)
    result = verification_metrics(scores, same)
    assert result["auc"] == 1.0 and result["eer"] == 0.0
    assert result["tar_at_far"] == {"0.001": 1.0, "0.01": 1.0}
    assert result["accuracy_mean"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["fold_accuracies"] == [1.0] * 10 and result["folds"] == 10
    assert 0.4 <= result["threshold_mean"] <= 0.6
    assert result["eer_threshold"] == scores[:100].min()  # the lowest same score: FAR = FRR = 0 from there
    assert (result["pairs"], result["same_pairs"], result["different_pairs"]) == (200, 100, 100)
    assert result["far_floor"] == pytest.approx(0.01)
    roc = result.pop("roc")
    assert len(roc["fpr"]) == len(roc["tpr"]) and roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    json.dumps(result, allow_nan=False)  # plain JSON: no numpy types, no NaN or inf


def test_random_scores_are_at_chance():
    rng = np.random.default_rng(1)
    scores, same = rng.normal(size=4000), rng.integers(0, 2, 4000)
    result = verification_metrics(scores, same)
    assert result["auc"] == pytest.approx(0.5, abs=0.05)
    assert result["eer"] == pytest.approx(0.5, abs=0.05)
    assert result["accuracy_mean"] == pytest.approx(0.5, abs=0.05)


def test_hand_computed_eer_and_tar():
    # same 0.9, 0.8, 0.4; different 0.7, 0.3, 0.2. Accepting >= 0.8: TAR 2/3 at FAR 0; >= 0.7: FAR 1/3 = FNR 1/3
    result = verification_metrics([0.9, 0.8, 0.4, 0.7, 0.3, 0.2], [1, 1, 1, 0, 0, 0], fars=(1e-3, 0.5))
    assert result["eer"] == pytest.approx(1 / 3) and result["eer_threshold"] == pytest.approx(0.7)
    assert result["tar_at_far"] == {"0.001": pytest.approx(2 / 3), "0.5": 1.0}
    assert result["far_floor"] == pytest.approx(1 / 3)
    assert result["auc"] == pytest.approx(8 / 9)  # 8 of the 9 (same, different) pairs are ordered right


def test_eer_is_interpolated_between_roc_points():
    # same 0.9, 0.5; different 0.5, 0.1. ROC (FPR, TPR): (0, 0) -> (0, 0.5) at 0.9 -> (0.5, 1) at the tie 0.5.
    # FPR - FNR goes from -0.5 to +0.5: it is 0 halfway, at FPR = FNR = 0.25, threshold 0.9 + (0.5 - 0.9) / 2
    result = verification_metrics([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert result["eer"] == pytest.approx(0.25) and result["eer_threshold"] == pytest.approx(0.7)
    assert result["tar_at_far"]["0.01"] == pytest.approx(0.5)


def best_tar_by_brute_force(scores, same, far):
    """The highest TPR of 'same iff score >= t' over every t (each score, and above all of them) with FPR <= far."""
    scores, same = np.asarray(scores), np.asarray(same, dtype=bool)
    best = 0.0
    for t in np.append(np.unique(scores), np.inf):
        accepted = scores >= t
        if accepted[~same].mean() <= far:
            best = max(best, accepted[same].mean())
    return best


def test_tar_at_far_keeps_a_point_on_a_straight_stretch_of_the_roc():
    # accepting >= 0.95: TPR 0.5 at FPR 0; >= 0.9: TPR 0.6 at FPR 0.1; >= 0.8: TPR 0.7 at FPR 0.2. The middle point
    # lies on the line between the other two, which roc_curve's default drops
    same = [1] * 10 + [0] * 10
    scores = [.95] * 5 + [.9, .8] + [.1] * 3 + [.9, .8] + [.1] * 8
    assert verification_metrics(scores, same, fars=(0.1,))["tar_at_far"] == {"0.1": pytest.approx(0.6)}


def test_tar_at_far_and_eer_with_many_ties_match_brute_force():
    rng = np.random.default_rng(13)
    same = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400) + same, 1)  # rounded: many ties between and within the classes
    fars = (0.01, 0.05, 0.1, 0.3)
    result = verification_metrics(scores, same, fars=fars)
    for far in fars:
        assert result["tar_at_far"][f"{far:g}"] == pytest.approx(best_tar_by_brute_force(scores, same, far))
    # the points the default drops are on straight stretches: the same curve, so the same EER
    fpr, tpr, thresholds = roc_curve(same, scores)
    assert result["eer"] == pytest.approx(evaluation.equal_error_rate(fpr, tpr, thresholds)[0])
    roc = result["roc"]
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert set(zip(fpr, tpr)) <= set(zip(roc["fpr"], roc["tpr"]))  # the default's points, and more


def test_best_threshold_is_the_midpoint_of_the_best_split():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    assert best_threshold(scores, np.array([False, False, True, True])) == pytest.approx(0.25)
    assert best_threshold(scores, np.array([True, True, True, True])) == pytest.approx(0.1 - 1)  # accept all
    assert best_threshold(scores, np.array([False, False, False, False])) == pytest.approx(0.4 + 1)  # none


def test_the_threshold_of_a_fold_never_sees_that_fold():
    # fold 1 alone puts the threshold at 0.5 (between 0.2 and 0.8); with fold 0's pairs the best would be 0.275.
    # Held out, fold 0 gets 0.5 and only its different pair right (1/4); fold 1 gets fold 0's 0.275: all right
    scores = np.array([0.3, 0.35, 0.4, 0.25, 0.8, 0.9, 0.1, 0.2])
    same = np.array([1, 1, 1, 0, 1, 1, 0, 0])
    fold_ids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert best_threshold(scores, same.astype(bool)) == pytest.approx(0.275)
    accuracies, thresholds = kfold_accuracy(scores, same.astype(bool), fold_ids)
    assert accuracies == [0.25, 1.0] and thresholds == pytest.approx([0.5, 0.275])
    result = verification_metrics(scores, same, fold_ids=fold_ids)
    assert result["fold_accuracies"] == [0.25, 1.0] and result["folds"] == 2
    assert result["accuracy_mean"] == pytest.approx(0.625) and result["threshold_mean"] == pytest.approx(0.3875)


# -----------------------------------------------------------------------------
# insightface's .bin accuracy

def bin_embeddings(pairs, seed, dim=32):
    """Unnormalised embeddings of `pairs` pairs (images 2k, 2k + 1), half of them of one person, of varied lengths;
    (embeddings (2 * pairs, dim), same (pairs,))."""
    rng = np.random.default_rng(seed)
    same = rng.permutation(np.arange(pairs) < pairs // 2)
    first = rng.normal(size=(pairs, dim))
    second = np.where(same[:, None], first + rng.normal(scale=2.0, size=(pairs, dim)), rng.normal(size=(pairs, dim)))
    embeddings = np.stack([first, second], axis=1).reshape(2 * pairs, dim)
    return (embeddings * rng.uniform(0.5, 3, (2 * pairs, 1))).astype(np.float32), same


def test_contiguous_folds_are_scikit_learns_unshuffled_kfold():
    from sklearn.model_selection import KFold
    for count in (605, 6000, 23, 4):
        folds = contiguous_folds(count)
        splits = KFold(n_splits=min(10, count), shuffle=False).split(np.arange(count))
        assert [np.flatnonzero(folds == f).tolist() for f in range(min(10, count))] == \
            [test.tolist() for _, test in splits]


@pytest.mark.parametrize("pairs,seed", [(6000, 0), (605, 1), (605, 2)])
def test_bin_accuracy_is_insightfaces_to_the_number(pairs, seed):
    embeddings, same = bin_embeddings(pairs, seed)
    metrics, scored = score_pairs_as_insightface(embeddings, list(range(2 * pairs)), *bin_pairs(same))
    reference = insightface_accuracy(embeddings, same)
    assert scored == list(range(pairs)) and metrics["folds"] == 10
    assert abs(metrics["accuracy_mean"] - reference) < 1e-6
    assert 0.6 < reference < 0.95  # thresholds matter: neither chance nor separated
    exact = metrics["exact_thresholds"]  # exact thresholds on the cosine, beside it
    assert exact["accuracy_mean"] != metrics["accuracy_mean"] and 0.6 < exact["accuracy_mean"] < 0.95
    assert 0 < metrics["threshold_mean"] < 4 and -1 < exact["threshold_mean"] < 1  # a squared distance; a cosine


def test_bin_accuracy_leaves_out_pairs_with_an_unreadable_image_and_keeps_their_folds():
    embeddings, same = bin_embeddings(605, 3)
    readable = [i for i in range(1210) if i not in (7, 500)]  # pairs 3 and 250 lose an image
    metrics, scored = score_pairs_as_insightface(embeddings[readable], readable, *bin_pairs(same))
    kept = [k for k in range(605) if k not in (3, 250)]
    assert scored == kept and metrics["pairs"] == 603
    folds = contiguous_folds(605)[kept]
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = np.sum((unit[0::2] - unit[1::2]) ** 2, axis=1)[kept]
    accuracies, _ = evaluation.grid_kfold_accuracy(distances.astype(np.float64), same[kept], folds)
    assert metrics["fold_accuracies"] == pytest.approx(accuracies, abs=1e-12)


def test_threshold_choice_receives_only_the_training_folds(monkeypatch):
    rng = np.random.default_rng(2)
    scores, same = rng.normal(size=300), rng.integers(0, 2, 300)
    seen = []
    original = evaluation.best_threshold
    monkeypatch.setattr(evaluation, "best_threshold",
                        lambda s, y: seen.append(np.sort(s)) or original(s, y))
    verification_metrics(scores, same, folds=5, seed=3)
    fold_ids = stratified_folds(same, 5, seed=3)
    assert len(seen) == 5
    for fold, training in enumerate(seen):
        np.testing.assert_array_equal(training, np.sort(scores[fold_ids != fold]))


def test_fold_ids_are_respected():
    rng = np.random.default_rng(4)
    scores, same = rng.normal(size=90), np.tile([0, 1], 45)
    fold_ids = np.repeat([7, 3, 5], 30)  # any labels, e.g. the sets of LFW's pairs.txt
    result = verification_metrics(scores, same, folds=10, fold_ids=fold_ids)
    assert result["folds"] == 3
    expected, _ = kfold_accuracy(scores, same.astype(bool), fold_ids)  # folds in increasing label order: 3, 5, 7
    assert result["fold_accuracies"] == expected
    with pytest.raises(ValueError):
        verification_metrics(scores, same, fold_ids=fold_ids[:-1])
    with pytest.raises(ValueError):
        verification_metrics(scores, same, fold_ids=np.zeros(90, dtype=int))


def test_stratified_folds_are_balanced_and_seeded():
    same = np.array([1] * 23 + [0] * 34, dtype=bool)
    fold_ids = stratified_folds(same, 10, seed=5)
    sizes = np.bincount(fold_ids, minlength=10)
    positives = np.bincount(fold_ids[same], minlength=10)
    assert sizes.max() - sizes.min() <= 1 and positives.max() - positives.min() <= 1
    np.testing.assert_array_equal(fold_ids, stratified_folds(same, 10, seed=5))
    assert not np.array_equal(fold_ids, stratified_folds(same, 10, seed=6))


def test_fewer_pairs_than_folds_uses_one_fold_per_pair():
    result = verification_metrics([0.9, 0.7, 0.2], [1, 1, 0], folds=10)
    assert result["folds"] == 3 and len(result["fold_accuracies"]) == 3
    with pytest.raises(ValueError):
        verification_metrics([0.9, 0.7, 0.2], [1, 1, 0], folds=1)


def test_verification_metrics_rejects_one_class_and_bad_labels():
    with pytest.raises(ValueError):
        verification_metrics([0.9, 0.7], [1, 1])
    with pytest.raises(ValueError):
        verification_metrics([0.9, 0.7], [1, 2])


def test_pair_decisions_match_scikit_learn_on_random_decisions():
    rng = np.random.default_rng(14)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        same, decided = rng.random(n) < rng.random(), rng.random(n) < rng.random()  # rates of 0 to 1: edge cases too
        precision, recall, f1, _ = precision_recall_fscore_support(same, decided, average="binary", zero_division=0)
        assert pair_decisions(same.astype(int), decided) == dict(
            precision=pytest.approx(precision), recall=pytest.approx(recall), f1=pytest.approx(f1))


@pytest.mark.parametrize("same,decided,expected", [
    ([1, 1, 0, 0], [1, 0, 1, 0], (0.5, 0.5, 0.5)),
    ([1, 1, 1, 0], [1, 1, 0, 0], (1.0, 2 / 3, 0.8)),
    ([1, 1, 0, 0], [1, 1, 0, 0], (1.0, 1.0, 1.0)),  # all right
    ([1, 1, 0, 0], [0, 0, 1, 1], (0.0, 0.0, 0.0)),  # all wrong
    ([1, 1, 0, 0], [0, 0, 0, 0], (0.0, 0.0, 0.0)),  # nothing accepted: precision has nothing to count
    ([0, 0, 0], [1, 0, 1], (0.0, 0.0, 0.0)),  # no same pair: recall has nothing to count
    ([0, 0, 0], [0, 0, 0], (0.0, 0.0, 0.0)),  # nothing to count at all
])
def test_pair_decisions_edge_cases(same, decided, expected):
    result = pair_decisions(np.array(same), np.array(decided, dtype=bool))
    assert result == dict(zip(("precision", "recall", "f1"), map(pytest.approx, expected)))
    precision, recall, f1, _ = precision_recall_fscore_support(same, decided, average="binary", zero_division=0)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((precision, recall, f1))
    assert all(type(value) is float for value in result.values())  # plain JSON


def test_pair_decisions_needs_one_decision_per_pair():
    with pytest.raises(ValueError):
        pair_decisions([1, 0, 1], [True, False])


# -----------------------------------------------------------------------------
# thresholds and open-set identification

def test_calibrate_threshold_hits_the_target_far():
    impostors = np.random.default_rng(6).normal(size=10_000)
    threshold = calibrate_threshold(impostors, 1e-2)
    assert 0.009 <= np.mean(impostors >= threshold) <= 0.01
    below = impostors[impostors < threshold].max()  # the next lower score would accept too many
    assert np.mean(impostors >= below) > 0.01


def test_calibrate_threshold_with_ties_and_bad_far():
    tied = np.array([0.1] * 50 + [0.5] * 30 + [0.9] * 20)
    assert calibrate_threshold(tied, 0.5) == 0.5  # exactly half accepted
    assert calibrate_threshold(tied, 0.45) == 0.9  # 0.5 would accept half: the tie moves it up to 0.9 (20 %)
    above = calibrate_threshold(tied, 0.1)  # even the top score alone is 20 %: accept none
    assert above > 0.9 and np.mean(tied >= above) == 0.0
    for far in (0, -0.1, 1, 1.5):
        with pytest.raises(ValueError):
            calibrate_threshold(tied, far)
    with pytest.raises(ValueError):
        calibrate_threshold([], 0.1)


def test_open_set_metrics_hand_made():
    scores = [0.9, 0.8, 0.3, 0.7, 0.2]
    predicted = [0, 1, 2, 0, 1]
    truth = [0, 2, 2, -1, -1]
    # known: right and accepted, wrong and accepted, right but rejected; unknown: accepted, rejected
    result = open_set_metrics(torch.tensor(scores), torch.tensor(predicted), torch.tensor(truth), 0.5)
    assert result == dict(threshold=0.5, known_probes=3, unknown_probes=2,
                          detection_identification_rate=pytest.approx(1 / 3), false_accept_rate=0.5,
                          rejected_known=pytest.approx(1 / 3))
    known_only = open_set_metrics(np.array(scores[:3]), predicted[:3], truth[:3], 0.1)
    assert known_only["false_accept_rate"] is None and known_only["detection_identification_rate"] == 2 / 3
    assert open_set_metrics([0.4], [0], [-1], 0.5)["detection_identification_rate"] is None


def found_from(similarities, truth):
    """identification_accuracy's dict for hand-made (P, C) probe-to-centroid similarities and true indices."""
    similarities = torch.tensor(similarities)
    scores, predicted = similarities.max(dim=1)
    return dict(similarities=similarities, truth=torch.tensor(truth), predicted=predicted, scores=scores)


OPEN_SET = found_from([[0.9, 0.3, 0.1],  # identity 0, right: its best impostor score (another identity's) 0.3
                       [0.2, 0.8, 0.6],  # 1, right: 0.6
                       [0.7, 0.1, 0.5],  # 2, taken for 0: 0.7
                       [0.1, 0.4, 0.95],  # 2, right: 0.4
                       [0.65, 0.2, 0.1]],  # absent from the gallery: a stranger scoring 0.65
                      [0, 1, 2, 2, -1])


def test_open_set_evaluation_calibrates_on_the_best_other_identity():
    # impostor scores 0.3, 0.6, 0.7, 0.4: a FAR of 1/4 accepts >= 0.7 (the stranger is rejected), 1/2 >= 0.6
    strict = open_set_evaluation(OPEN_SET, 0.25)
    assert strict == dict(threshold=pytest.approx(0.7), known_probes=4, unknown_probes=1,
                          detection_identification_rate=0.75, false_accept_rate=0.0, rejected_known=0.0,
                          target_far=0.25, strangers=1)
    loose = open_set_evaluation(OPEN_SET, 0.5)
    assert loose["threshold"] == pytest.approx(0.6) and loose["false_accept_rate"] == 1.0
    json.dumps(strict, allow_nan=False)


def test_open_set_evaluation_checks_on_given_strangers():
    result = open_set_evaluation(OPEN_SET, 0.25, stranger_scores=torch.tensor([0.75, 0.5, 0.1]))
    assert result["threshold"] == pytest.approx(0.7) and result["false_accept_rate"] == pytest.approx(1 / 3)
    assert result["strangers"] == result["unknown_probes"] == 3 and result["known_probes"] == 4
    assert result["detection_identification_rate"] == 0.75  # the gallery-absent probe of found is not counted
    nobody = open_set_evaluation(OPEN_SET, 0.25, stranger_scores=np.empty(0))
    assert nobody["strangers"] == 0 and nobody["false_accept_rate"] is None


def test_open_set_evaluation_needs_two_identities_and_a_known_probe():
    assert open_set_evaluation(found_from([[0.9], [0.2]], [0, -1]), 0.1) is None  # no other identity
    assert open_set_evaluation(found_from([[0.9, 0.1], [0.2, 0.3]], [-1, -1]), 0.1) is None  # no known probe
    assert OPEN_SET["similarities"][1, 1] == 0.8  # found is left as it was


def test_open_set_evaluation_of_identification_accuracy():
    gallery, gallery_labels = torch.eye(3).repeat(2, 1), torch.arange(3).repeat(2)
    probes = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.5, 1.0], [0.6, 0.6, 0.6]])
    found = identification_accuracy(gallery, gallery_labels, ["a", "b", "c"], probes, torch.arange(4),
                                    ["a", "b", "c", "stranger"])
    result = open_set_evaluation(found, 0.5)
    unit = torch.nn.functional.normalize(probes, dim=1)
    impostors = [unit[0, 1], unit[1, 2], unit[2, 1]]
    assert result["threshold"] == pytest.approx(float(max(impostors)))  # the next lower one accepts 2/3 > 0.5
    assert (result["known_probes"], result["strangers"], result["false_accept_rate"]) == (3, 1, 1.0)


# -----------------------------------------------------------------------------
# pairs

def check_pairs(pairs, labels):
    i, j, same = pairs.T
    assert pairs.dtype == np.int64 and (i < j).all()
    np.testing.assert_array_equal(labels[i] == labels[j], same == 1)
    assert len({(a, b) for a, b in zip(i, j)}) == len(pairs)  # no duplicates
    assert (same == 1).sum() == (same == 0).sum()


def test_verification_pairs_counts_and_seed():
    labels = np.repeat(np.arange(20), 10)  # 20 identities x 10 images: 900 same pairs
    pairs = verification_pairs(labels, np.random.default_rng(0))
    check_pairs(pairs, labels)
    assert (pairs[:, 2] == 1).sum() == 20 * 45
    np.testing.assert_array_equal(pairs, verification_pairs(labels, np.random.default_rng(0)))
    assert not np.array_equal(pairs, verification_pairs(labels, np.random.default_rng(1)))
    capped = verification_pairs(torch.as_tensor(labels), np.random.default_rng(0), max_same=5)
    check_pairs(capped, labels)
    assert len(capped) == 10


def test_verification_pairs_small_cases():
    labels = np.array([0, 0, 0, 1, 1, 2, 3])  # 4 same pairs of 21
    pairs = verification_pairs(labels, np.random.default_rng(0))
    check_pairs(pairs, labels)
    assert {tuple(p) for p in pairs[pairs[:, 2] == 1, :2]} == {(0, 1), (0, 2), (1, 2), (3, 4)}
    mostly_one = np.array([5, 5, 5, 5, 9])  # 6 same pairs, only 4 different: all of them
    pairs = verification_pairs(mostly_one, np.random.default_rng(0))
    assert sorted(map(tuple, pairs[pairs[:, 2] == 0, :2])) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert len(pairs) == 10
    assert verification_pairs(np.arange(5), np.random.default_rng(0)).shape == (0, 3)  # no same pair


def test_different_identity_pairs_are_all_of_them():
    labels = np.random.default_rng(7).integers(0, 4, 15)
    expected = [(i, j) for i, j in itertools.combinations(range(15), 2) if labels[i] != labels[j]]
    assert sorted(map(tuple, different_identity_pairs(labels))) == expected


def test_sampled_different_pairs_are_uniform():
    labels = np.array([0, 0, 0, 1, 2])  # 7 different pairs: 6 with identity 0, and (3, 4)
    rng, counts = np.random.default_rng(8), {}
    for _ in range(1500):
        for pair in map(tuple, sample_different_pairs(labels, 3, rng)):
            counts[pair] = counts.get(pair, 0) + 1
    assert len(counts) == 7
    for count in counts.values():  # each of the 7 pairs is in 3 / 7 of the draws
        assert count / 1500 == pytest.approx(3 / 7, abs=0.05)  # about 4 standard deviations


def test_cosine_similarity_pairs():
    embeddings = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = np.array([[0, 1, 0], [0, 2, 1], [1, 1, 1]])
    np.testing.assert_allclose(cosine_similarity_pairs(embeddings, pairs), [0, math.sqrt(0.5), 1], atol=1e-6)
    np.testing.assert_allclose(cosine_similarity_pairs(torch.tensor(embeddings), pairs[:, :2]),
                               [0, math.sqrt(0.5), 1], atol=1e-6)
    assert cosine_similarity_pairs(embeddings, np.empty((0, 3), dtype=np.int64)).shape == (0,)


# -----------------------------------------------------------------------------
# retrieval and identification

def test_retrieval_metrics_hand_made_ranking():
    references = unit_vectors([0, 10, 20, 30, 40])
    reference_labels = [7, 8, 7, 7, 9]
    queries = unit_vectors([0, 40, 90])
    query_labels = [7, 8, 5]
    # query 0 (label 7, R = 3) ranks 0, 10, 20, 30, 40: relevance 1 0 1 | 1 0
    #   P@1 = 1, R-precision = 2/3, MAP@R = (1/1 + 2/3) / 3 = 5/9
    # query 1 (label 8, R = 1) ranks 40, 30, 20, 10, 0: relevance 0 | 0 0 1 0 -> all 0
    # query 2 (label 5) has no reference: left out of the means
    for chunk_size in (1, 1024):
        result = retrieval_metrics(queries, query_labels, references, reference_labels, chunk_size=chunk_size)
        assert result == dict(precision_at_1=0.5, r_precision=pytest.approx(1 / 3), map_at_r=pytest.approx(5 / 18),
                              queries=3, queries_without_references=1)


def test_retrieval_metrics_perfect_embeddings():
    labels = np.repeat(np.arange(5), 4)
    embeddings = np.eye(5)[labels] + 0.01 * np.random.default_rng(9).normal(size=(20, 5))
    result = retrieval_metrics(embeddings, labels, embeddings, labels, exclude_self=True, chunk_size=7)
    assert result == dict(precision_at_1=1.0, r_precision=1.0, map_at_r=1.0, queries=20,
                          queries_without_references=0)


def test_retrieval_metrics_exclude_self():
    # identities alternate along the circle: each image's nearest OTHER image is of the other identity
    embeddings, labels = unit_vectors([0, 10, 30, 45]), torch.tensor([0, 1, 0, 1])
    with_self = retrieval_metrics(embeddings, labels, embeddings, labels)
    assert with_self["precision_at_1"] == 1.0  # every query finds itself first
    without_self = retrieval_metrics(embeddings, labels, embeddings, labels, exclude_self=True)
    assert without_self == dict(precision_at_1=0.0, r_precision=0.0, map_at_r=0.0, queries=4,
                                queries_without_references=0)
    alone = retrieval_metrics(embeddings[:3], [0, 1, 0], embeddings[:3], [0, 1, 0], exclude_self=True)
    assert alone["queries_without_references"] == 1  # identity 1 has no other image
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics(embeddings, labels, embeddings[:3], labels[:3], exclude_self=True)


def test_identification_accuracy_top5():
    gallery_classes = [f"c{i}" for i in range(7)]
    gallery = torch.eye(7)  # one image per class: centroid i is the unit vector e_i
    probes = torch.tensor([[5.0, 4, 3, 0, 0, 0, 0],  # truth c2, ranked 3rd: top-5 only
                           [6, 5, 4, 3, 2, 1, 0.5],  # truth c6, ranked 7th: neither
                           [1, 0, 0, 0, 0, 0, 0],  # truth c0: both
                           [0, 0, 0, 0, 0, 0, 1]])  # identity not in the gallery: left out
    probe_classes = ["c2", "c6", "c0", "stranger"]
    result = identification_accuracy(gallery, torch.arange(7), gallery_classes, probes, torch.arange(4),
                                     probe_classes)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(2 / 3)
    assert result["top_k"] == 5
    assert result["truth"].tolist() == [2, 6, 0, -1] and result["predicted"].tolist() == [0, 0, 0, 6]
    few = identification_accuracy(gallery[:3, :3], torch.arange(3), gallery_classes[:3], probes[:3, :3],
                                  torch.arange(3), ["c2", "c1", "c0"])
    assert few["accuracy"] == pytest.approx(1 / 3)
    assert few["top_k"] == 3 and few["top5"] == 1.0  # with 3 classes every probe is in the top 3
