# Pair classifier: a siamese ResNet18 embedding, |e1 - e2| and e1 * e2 into a small MLP that outputs one logit
# (same person or not), trained with binary cross-entropy on every pair of P x K batches (8 people x 4 images: 48
# pairs of one person and 448 of two a batch, each kind weighing half the loss, so the decision is that of balanced
# pairs); reports precision, recall and F1 on balanced valid pairs every epoch (when valid/ has two images of a
# person). One random same and different pair per image (mining = "none") taught the embedding less: a lower
# identification top-1 (docs/results.md). Epochs that tie on the checkpoint's metric (the embedding's) are told
# apart by the valid loss, so that a trained pair head is kept rather than an untrained one.
#   python train.py configs/pair_classifier.py
image_size = (112, 96)
backbone = "resnet18"
zero_init_residual = True
embedding_dim = 128
loss = "pair_bce"
mining = "batch_all"
pair_hidden_dim = 64
batch_size = 32
images_per_identity = 4
optimizer = "adam"
lr = 3e-4
lr_schedule = "cosine"
epochs = 80
